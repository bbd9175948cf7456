"""LLaVA-Interleave Bench: the release read as it is, asked in batches, predictions kept line by line.

    from minterleave import interleave_bench as ib
    sources = ib.find_splits("LLaVA-NeXT-Interleave-Bench", "all")   # {split: parquet shards or JSON file}
    preds = ib.evaluate(model, proc, sources, out="preds.jsonl")      # {split: [prediction line, ...]}
    tables = ib.tables(preds)                                         # bench_scoring.bench_table per split

The data (hub dataset lmms-lab/LLaVA-NeXT-Interleave-Bench; docs/interleave-bench.md): three configurations,
`in_domain`, `out_of_domain`, `multi_view_in_domain`, each a folder of parquet shards `<split>/*.parquet`
(read with pyarrow, the `eval` extra), or the original JSON release (`multi_image_in_domain.json`,
`multi_image_out_domain.json`, `multi_view_in_domain.json`, image paths relative to the JSON's folder).
A parquet row has sample_id, sub_task, question_type and image_0..image_N (null or a {bytes, path} struct;
whatever image columns exist are read, in index order); the question and answer are its `question`/`answer`
columns or, for multi_view_in_domain, the first human and first gpt turn of `conversations`.

Prompting follows lmms-eval's LLaVA model: the question's `<image>` placeholders take the images in order;
without any, all images go first, "<image> <image>\\n" + question. One user turn in the checkpoint's chat
layout, greedy decoding, at most 16 new tokens. Each image is one view (no multi-patch tiling); with
aspect="pad" (the original evaluation's image_aspect_ratio) a non-square image is first centred on a square
of the processor's mean colour, with "resize" it is handed to the processor as it is (squashed, as the
llava-hf processor does).

Predictions: one JSON line per sample, written as it is answered ({"sample_id", "split", "sub_task",
"question_type", "answer", "pred", "score", "aspect"}). Given the same `out` again, the samples already in it
are not asked again (a torn last line is dropped first); a sample is keyed by split, sample_id and how many
times that id came before it in the split (ids restart per configuration and are not promised unique).
"""

import glob
import io
import json
import os
import re
import sys
import time
from collections import Counter

from PIL import Image

from . import bench_scoring, media
from .data import DataError, load_records
from .scoring import answer_batch

SPLITS = bench_scoring.SPLITS
JSON_FILES = {"in_domain": "multi_image_in_domain.json", "out_of_domain": "multi_image_out_domain.json",
              "multi_view_in_domain": "multi_view_in_domain.json"}
META = ("sample_id", "sub_task", "question_type")
IMAGE_COLUMN = re.compile(r"image_(\d+)")
ASPECTS = ("pad", "resize")


# ---------------------------------------------------------------------------------------- finding the data
def find_splits(path, split="all"):
    """{split: ("parquet", [shard files]) or ("json", file)} for `split` ("all": every split present)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such benchmark folder or file")
    wanted = SPLITS if split == "all" else (split,)
    found = {}
    if os.path.isfile(path):  # one JSON file of the release: its name says the split, else --split must
        by_name = {v: k for k, v in JSON_FILES.items()}.get(os.path.basename(path))
        s = by_name if split == "all" else split
        if s is None:
            raise ValueError(f"{path}: not one of the release's JSON files ({', '.join(JSON_FILES.values())}); "
                             "name the split with --split")
        return {s: ("json", path)}
    for s in wanted:
        shards = sorted(glob.glob(os.path.join(path, s, "*.parquet")))
        if shards:
            found[s] = ("parquet", shards)
        elif os.path.isfile(os.path.join(path, JSON_FILES[s])):
            found[s] = ("json", os.path.join(path, JSON_FILES[s]))
        elif split != "all":
            raise FileNotFoundError(f"{path}: no {s} split ({s}/*.parquet or {JSON_FILES[s]})")
    if not found:
        raise FileNotFoundError(f"{path}: no Interleave-Bench split found (expected <split>/*.parquet for "
                                f"{', '.join(SPLITS)}, or the release's JSON files)")
    return found


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading the benchmark's parquet shards needs pyarrow: pip install -e '.[eval]'") from None
    return pq


def _parquet_file(file):
    try:
        return _pyarrow().ParquetFile(file)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{file}: not a readable parquet file ({e})") from None


def count(source, limit=None):
    """Samples in a split (from the parquet footers or the JSON), at most `limit`; checks the shards' columns."""
    kind, where = source
    if kind == "parquet":
        files = [(f, _parquet_file(f)) for f in where]
        for f, pf in files:
            _columns(pf, f)  # a shard without the needed columns is refused before any model is loaded
        n = sum(pf.metadata.num_rows for _, pf in files)
    else:
        n = len(load_records(where))
    return n if limit is None else min(n, limit)


# ---------------------------------------------------------------------------------------- reading samples
def _turns(conversations, where):
    turns = [(t.get("from"), t.get("value") or "") for t in conversations or [] if isinstance(t, dict)]
    q = next((v for r, v in turns if r in ("human", "user")), None)
    a = next((v for r, v in turns if r in ("gpt", "assistant")), None)
    if q is None or a is None:
        raise DataError(f"{where}: conversations hold no human turn and gpt turn")
    return q, a


def _columns(pf, file):
    """(question/answer columns, image columns in index order) of a shard; DataError if it lacks any needed."""
    names = pf.schema_arrow.names
    # multi_view_in_domain holds conversations instead of question + answer
    qa = ("conversations",) if "conversations" in names and not {"question", "answer"} <= set(names) else (
        "question", "answer")
    missing = [c for c in META + qa if c not in names]
    if missing:
        raise DataError(f"{file}: not an Interleave-Bench shard: no column(s) {', '.join(missing)} (needed: "
                        f"{', '.join(META)}, and question + answer or conversations)")
    return qa, sorted((c for c in names if IMAGE_COLUMN.fullmatch(c)), key=lambda c: int(c[6:]))


def _parquet_samples(split, shards):
    for file in shards:
        pf = _parquet_file(file)
        qa, images = _columns(pf, file)
        for batch in pf.iter_batches(batch_size=16, columns=list(META + qa) + images):
            for row in batch.to_pylist():
                where = f"{file}: {split} sample_id {row['sample_id']}"
                q, a = (row["question"], row["answer"]) if len(qa) == 2 else _turns(row["conversations"], where)
                yield _sample(split, row, q, a, [row[c] for c in images if row[c] is not None], where,
                              os.path.dirname(file))


def _json_samples(split, file):
    root = os.path.dirname(os.path.abspath(file))
    for i, r in enumerate(load_records(file)):
        meta = r.get("metadata") or {}
        row = {"sample_id": r.get("sample_id", r.get("id", i)),
               "sub_task": meta.get("dataset") or r.get("sub_task"),
               "question_type": meta.get("question_type") or r.get("question_type")}
        where = f"{file}: record {i} (sample_id {row['sample_id']})"
        paths = r.get("image") or []
        q, a = _turns(r.get("conversations"), where)
        yield _sample(split, row, q, a, [paths] if isinstance(paths, str) else list(paths), where, root)


def _sample(split, row, question, answer, images, where, root):
    if row["question_type"] not in bench_scoring.QUESTION_TYPES:
        raise DataError(f"{where}: question_type {row['question_type']!r} is neither "
                        f"{' nor '.join(bench_scoring.QUESTION_TYPES)}")
    return {"split": split, "sample_id": row["sample_id"], "sub_task": str(row["sub_task"]),
            "question_type": row["question_type"], "question": question or "", "answer": answer or "",
            "images": images, "where": where, "root": root}


def samples(split, source, limit=None):
    """The split's samples in file order (images still encoded), the first `limit` only if given."""
    kind, where = source
    it = _parquet_samples(split, where) if kind == "parquet" else _json_samples(split, where)
    for i, s in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield s


# ---------------------------------------------------------------------------------------- prompts and images
def load_image(raw, sample):
    """An image cell ({bytes, path} struct, or a path relative to the sample's root) → PIL RGB."""
    if isinstance(raw, dict) and raw.get("bytes"):
        try:
            return media.to_rgb(Image.open(io.BytesIO(raw["bytes"])))
        except OSError as e:
            raise media.MediaError(f"{sample['where']}: cannot read an image ({e})") from None
    path = raw.get("path") if isinstance(raw, dict) else raw
    if not path:
        raise DataError(f"{sample['where']}: an image cell holds neither bytes nor a path")
    return media.to_rgb(os.path.join(sample["root"], path))


def expand_to_square(image, fill):
    """The image centred on a square of colour `fill` (the original LLaVA evaluation's expand2square)."""
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, fill)
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def prompt(proc, sample, n_images):
    """The chat prompt of a sample (module docstring: where its images go)."""
    q = sample["question"]
    if n_images and proc.image_token not in q:
        q = " ".join([proc.image_token] * n_images) + "\n" + q
    if q.count(proc.image_token) != n_images:
        raise DataError(f"{sample['where']}: the question has {q.count(proc.image_token)} <image> placeholder(s) "
                        f"but the sample has {n_images} image(s)")
    return proc.apply_chat_template([{"role": "user", "content": q}])


def images_for(proc, sample, aspect="pad"):
    imgs = [load_image(r, sample) for r in sample["images"]]
    if aspect == "pad":  # the processor's mean colour in 0..255, as LLaVA's expand2square is given it
        fill = tuple(int(m * 255) for m in proc.pixel_kwargs["mean"])
        imgs = [expand_to_square(im, fill) for im in imgs]
    return imgs


# ---------------------------------------------------------------------------------------- predictions file
def _key(rec, seen):
    k = (rec["split"], json.dumps(rec["sample_id"]))
    seen[k] += 1
    return k + (seen[k],)


class Progress:
    """done/total, samples/s and ETA on stderr: rewritten in place on a terminal, else a line every `every` s."""

    def __init__(self, label, total, done=0, every=30.0, stream=None):
        self.label, self.total, self.start_done, self.done = label, total, done, done
        self.stream = stream or sys.stderr
        self.tty, self.every = self.stream.isatty(), every
        self.t0 = self.last = time.time()

    def update(self, n, final=False):
        self.done += n
        now = time.time()
        if not (final or self.tty or now - self.last >= self.every):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "-" if left == float("inf") else f"{int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        msg = f"{self.label}: {self.done}/{self.total} samples, {rate:.2f} samples/s, ETA {eta}"
        self.stream.write(("\r" + msg + ("\n" if final else "")) if self.tty else msg + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------- the evaluation
def evaluate(model, proc, sources, batch_size=8, limit=None, out=None, aspect="pad", max_new_tokens=16,
             progress=True):
    """{split: [prediction line]} for each split of `sources` (find_splits), resuming from `out`."""
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    old = bench_scoring.read_predictions(out, repair=True) if out and os.path.exists(out) else []
    other = sorted({r.get("aspect") for r in old} - {aspect}, key=str)
    if other:
        raise ValueError(f"{out}: holds predictions made with --aspect {other[0]}, not {aspect}: "
                         "use another --out file")
    seen, done = Counter(), {}
    for r in old:
        done[_key(r, seen)] = r
    f = open(out, "a", encoding="utf-8") if out else None
    was_training = model.training
    model.eval()
    results = {}
    try:
        for split, source in sources.items():
            total, seen = count(source, limit), Counter()
            rows, todo = [], []
            bar = Progress(split, total, min(total, sum(k[0] == split for k in done))) if progress else None
            for s in samples(split, source, limit):
                k = _key(s, seen)
                if k in done:
                    rows.append(done[k])
                    continue
                todo.append(s)
                if len(todo) == batch_size:
                    rows += _answer(model, proc, todo, aspect, max_new_tokens, f, bar)
                    todo = []
            if todo:
                rows += _answer(model, proc, todo, aspect, max_new_tokens, f, bar)
            if bar:
                bar.update(0, final=True)
            results[split] = rows
    finally:
        model.train(was_training)
        if f:
            f.close()
    return results


def _answer(model, proc, batch, aspect, max_new_tokens, f, bar):
    prompts, images = [], []
    for s in batch:
        imgs = images_for(proc, s, aspect)
        prompts.append(prompt(proc, s, len(imgs)))
        images += imgs
    preds = answer_batch(model, proc, prompts, images, False, max_new_tokens)
    recs = []
    for s, p in zip(batch, preds):
        recs.append({k: s[k] for k in ("sample_id", "split", "sub_task", "question_type", "answer")}
                    | {"pred": p, "score": bench_scoring.score(p, s["answer"], s["question_type"]), "aspect": aspect})
        if f:
            f.write(json.dumps(recs[-1], ensure_ascii=False) + "\n")
    if f:
        f.flush()
    if bar:
        bar.update(len(batch))
    return recs
