"""M4-Instruct-style records → training batches (prompt tokens masked, answer tokens supervised).

    proc = Processor.from_pretrained(ckpt)
    ds = JsonDataset("m4_instruct_annotations.json", image_root="M4-Instruct-Data", processor=proc)
    batch = collate([ds[0], ds[1]], proc.pad_token_id)   # input_ids, attention_mask, labels, pixel_values

A record: {"id", "image": [relative paths], "conversations": [{"from": "human"|"gpt", "value": "...<image>..."},
...], "metadata": {...}}; optional "video": a relative path, "multi_patch": true.

This module only turns a record into a conversation and its media; the chat layout and the label mask are the
processor's (`Processor.encode_chat`, the one place they live). Each turn's value is the message content as a
string, which the processor renders verbatim, as LLaVA's training code (`preprocess_qwen`, without its system
turn) does:

    <|im_start|>user\n{human value}<|im_end|>\n<|im_start|>assistant\n{gpt value}<|im_end|>\n ...

so the prompt up to `<|im_start|>assistant\n` is exactly the inference prompt (`prompt_for`), and the answer
starts where generation starts. Supervised: every assistant value and its closing `<|im_end|>`.

* Each `<image>` in a turn is where the next image of the record goes (the processor expands it to
  tokens_per_image image tokens, or to 1 + n_tiles images for multi-patch).
* A record with images but no `<image>` in any human turn gets "<image>" * n + "\n" prepended to its first
  human turn (as LLaVA's training code does); any other count mismatch is an error naming the record.
* Roles: "human"/"user" → user, "gpt"/"assistant" → assistant, "system" → system. Leading non-user turns
  other than a system turn are dropped (some M4-Instruct rows start with "gpt"); a record must end up with at
  least one user turn followed by an assistant turn.
* Image paths are relative to `image_root`; absolute paths and paths that leave the root (`..`) are refused
  (DataError naming the record and the path), and missing files are reported by path.
* Multi-patch: `"multi_patch": true` (or metadata.domain == "multi_patch") sends the record's images through
  the processor's AnyRes tiling (overview + tiles).
* Video: a record with "video" (a file under image_root) is decoded through the processor's video path
  (`<image>`/`<video>` placeholder → K frames) when it has no "image" list or when video_mode="video";
  otherwise its "image" list (the frames as PNGs) is used.

Synthetic training data (train.py's default) needs no disk: `encode_sample` encodes a `tasks.Sample` directly,
with the same layout. Sample seeds: evaluation uses tasks.sample_seed(S, i) = S * 10_000_000 + i with S <
EVAL_SEED_LIMIT (so seeds < 1e9); training uses train_seed(S, k) = TRAIN_SEED_BASE + S * 100_000_000 + k, i.e.
seeds >= 1e9. The two ranges never meet.
"""

import json
import os

import torch

from .config import IGNORE_INDEX
TRAIN_SEED_BASE = 1_000_000_000
EVAL_SEED_LIMIT = 100  # eval --seed S < 100 → sample seeds < 1e9 = TRAIN_SEED_BASE
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    pass


def train_seed(seed, k):
    """Sample seed of the k-th training sample (per domain) of training run `seed`."""
    if not 0 <= k < 100_000_000:
        raise ValueError(f"training sample index {k} out of range")
    return TRAIN_SEED_BASE + seed * 100_000_000 + k


def record_name(record, index=None):
    rid = record.get("id", record.get("sample_id")) if isinstance(record, dict) else None
    if rid is not None:
        return f"record {rid!r}" + (f" (#{index})" if index is not None else "")
    return f"record #{index}" if index is not None else "record"


def safe_path(root, rel, name="record"):
    """root/rel, refusing absolute paths, paths that leave root, and symlinks that resolve outside it."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"{name}: image path {rel!r} is not a non-empty string")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise DataError(f"{name}: image path {rel!r} is absolute; paths must be relative to the image root")
    norm = os.path.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        raise DataError(f"{name}: image path {rel!r} escapes the image root")
    full = os.path.join(root, norm)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(full), real_root]) != real_root:
        raise DataError(f"{name}: image path {rel!r} is a link that resolves outside the image root")
    return full


def conversation(record, name="record"):
    """The record's turns as [(role, text)], roles normalised (see the module docstring)."""
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{name}: no 'conversations' list")
    turns = []
    for t in convs:
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower()) if isinstance(t, dict) else None
        if role is None:
            raise DataError(f"{name}: turn {t!r} has no known 'from' (human/gpt/user/assistant/system)")
        text = t.get("value", t.get("content"))
        if not isinstance(text, str):
            raise DataError(f"{name}: a {role} turn has no text 'value'")
        turns.append((role, text))
    system = [t for t in turns[:1] if t[0] == "system"]
    rest = turns[len(system):]
    while rest and rest[0][0] != "user":
        rest = rest[1:]
    if not any(r == "assistant" for r, _ in rest):
        raise DataError(f"{name}: no user turn followed by an assistant turn")
    return system + rest


def check_turns(turns, n_images, n_videos, name="record", image_token="<image>"):
    """The turns with the placeholder rules of the module docstring applied (media in front when the text
    has no placeholder); DataError when the counts disagree or an assistant turn holds a placeholder."""
    vid_tok = "<video>"
    n_ph = sum(t.count(image_token) for r, t in turns if r == "user")
    n_vph = sum(t.count(vid_tok) for r, t in turns if r == "user")
    if n_ph == 0 and n_vph == 0 and (n_images or n_videos):
        k = next(i for i, (r, _) in enumerate(turns) if r == "user")
        turns = list(turns)
        turns[k] = ("user", image_token * n_images + vid_tok * n_videos + "\n" + turns[k][1])
        n_ph, n_vph = n_images, n_videos
    if n_ph != n_images or n_vph != n_videos:
        raise DataError(f"{name}: the text has {n_ph} <image> and {n_vph} <video> placeholder(s) but the record "
                        f"has {n_images} image(s) and {n_videos} video(s)")
    if any(r == "assistant" and (image_token in t or vid_tok in t) for r, t in turns):
        raise DataError(f"{name}: an assistant turn contains an image/video placeholder")
    return turns


def encode_conversation(proc, turns, images=(), videos=(), multi_patch=False, num_frames=None, name="record"):
    """[(role, text)] + media → {"input_ids" (T,), "labels" (T,), "pixel_values" (N,3,S,S) or None}
    (Processor.encode_chat, after the record-level placeholder rules of check_turns)."""
    images, videos = list(images), list(videos)
    turns = check_turns(turns, len(images), len(videos), name, proc.image_token)
    try:
        return proc.encode_chat([{"role": r, "content": t} for r, t in turns], images, videos, num_frames,
                                multi_patch)
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None
    except OSError as e:  # a missing or unreadable file keeps its type (FileNotFoundError, ...), plus the record
        raise type(e)(f"{name}: {e}") from None


def is_multi_patch(record):
    meta = record.get("metadata") or {}
    return bool(record.get("multi_patch") or meta.get("multi_patch") or meta.get("domain") == "multi_patch")


def plan_record(record, image_root=".", video_mode="frames", index=None, image_token="<image>"):
    """Every check of a record that needs no decoding → (name, turns, image files, video files, multi_patch).
    DataError (naming the record) for bad turns, unsafe or missing paths and placeholder counts."""
    name = record_name(record, index)
    if not isinstance(record, dict):
        raise DataError(f"{name}: not a JSON object")
    turns = conversation(record, name)
    paths = record.get("image") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    video, videos = record.get("video"), []
    if video and (video_mode == "video" or not paths):
        # the video replaces the frame list: its placeholder is <video>, or the record's single <image>
        videos = [safe_path(image_root, video, name)]
        n_img = sum(t.count(image_token) for r, t in turns if r == "user")
        if n_img == max(len(paths), 1) and not any("<video>" in t for _, t in turns):
            done, new = False, []
            for r, t in turns:
                if r == "user" and not done and image_token in t:
                    head, _, rest = t.partition(image_token)
                    t, done = head + "<video>" + rest.replace(image_token, ""), True
                elif r == "user":
                    t = t.replace(image_token, "")
                new.append((r, t))
            turns = new
        paths = []
    files = [safe_path(image_root, p, name) for p in paths]
    for f in files + videos:
        if os.path.isdir(f):
            raise DataError(f"{name}: {f} is a directory, not an image or video file")
    missing = [f for f in files + videos if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{name}: file(s) not found: {', '.join(missing)}")
    turns = check_turns(turns, len(files), len(videos), name, image_token)
    return name, turns, files, videos, is_multi_patch(record)


def encode_record(proc, record, image_root=".", video_mode="frames", num_frames=None, index=None):
    """One M4-Instruct record (paths relative to image_root) → encoded tensors plus its "id"."""
    name, turns, files, videos, multi_patch = plan_record(record, image_root, video_mode, index, proc.image_token)
    item = encode_conversation(proc, turns, files, videos, multi_patch, num_frames, name)
    item["id"] = str(record.get("id", record.get("sample_id", f"#{index}")))
    return item


def sample_turns(sample):
    """A tasks.Sample as [(role, text)]: its question (with <image> placeholders) and its answer."""
    return [("user", sample.question), ("assistant", sample.answer)]


def encode_sample(proc, sample, sample_id=None):
    """A synthetic tasks.Sample (in-memory images) → encoded tensors, same layout as a record, plus its "id"."""
    item = encode_conversation(proc, sample_turns(sample), sample.images, (),
                               multi_patch=sample.multi_patch, name=f"{sample.domain} sample")
    item["id"] = sample_id or sample.domain
    return item


def prompt_for(proc, sample_or_question):
    """The inference prompt (up to `<|im_start|>assistant\\n`) for a sample / question text: the same
    string the training layout has before the answer."""
    q = getattr(sample_or_question, "question", sample_or_question)
    return proc.apply_chat_template([{"role": "user", "content": q}])


def record_question(proc, record, image_root=".", index=None):
    """An evaluation record (Interleave-Bench JSON: first human turn = question, first gpt turn = answer)
    → (prompt text with placeholders, image paths, answer, multi_patch). Paths are checked as for training."""
    name = record_name(record, index)
    turns = conversation(record, name)
    q = next(t for r, t in turns if r == "user")
    k = next(i for i, (r, _) in enumerate(turns) if r == "user")
    a = next((t for r, t in turns[k:] if r == "assistant"), record.get("answer", ""))
    paths = record.get("image") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    files = [safe_path(image_root, p, name) for p in paths]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{name}: image file(s) not found: {', '.join(missing)}")
    image_token = proc.image_token
    if files and image_token not in q:
        q = image_token * len(files) + "\n" + q
    if q.count(image_token) != len(files):
        raise DataError(f"{name}: the question has {q.count(image_token)} <image> placeholder(s) but the record "
                        f"has {len(files)} image(s)")
    return prompt_for(proc, q), files, a, is_multi_patch(record)


def collate(items, pad_token_id, with_ids=False):
    """Right-padded batch: input_ids (B,T), attention_mask (B,T), labels (B,T) (-100 on padding),
    pixel_values (N,3,S,S) with the images of row 0 first, then row 1, ... (the model fills image
    positions in row-major order) — or no pixel_values key if no row has images. So `model(**batch)` works.
    with_ids: also "ids", the items' sample/record ids (train.py names them when a loss diverges)."""
    width = max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_ids:
        out["ids"] = [it.get("id") for it in items]
    pix = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    if pix:
        out["pixel_values"] = torch.cat(pix)
    return out


def load_records(path):
    """A JSON array (or JSON lines) of records; DataError naming the file and the line of a syntax error."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a JSON file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        recs = json.loads(text)
    except json.JSONDecodeError as array_error:
        if text.lstrip().startswith("["):
            raise DataError(f"{path}: line {array_error.lineno}, column {array_error.colno}: invalid JSON "
                            f"({array_error.msg})") from None
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n} (record #{len(recs)}): invalid JSON ({e.msg}); "
                                    "expected a JSON array or one JSON object per line") from None
    if isinstance(recs, dict):
        recs = [recs]
    if not isinstance(recs, list):
        raise DataError(f"{path}: expected a JSON array of record objects")
    return recs


class JsonDataset:
    """M4-Instruct-style JSON + image root. Every record is checked when the file is loaded — its turns, its
    paths (unsafe, escaping, missing, directories), its placeholder counts — without decoding any image, and
    all problems are reported together as one DataError (the first 20, then how many more), so a bad record
    is never discovered in the middle of training."""

    def __init__(self, path, image_root=None, processor=None, video_mode="frames", num_frames=None):
        self.path = path
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f"{self.image_root}: image root folder not found")
        self.records = load_records(path)
        self.processor = processor
        self.video_mode, self.num_frames = video_mode, num_frames
        image_token = processor.image_token if processor is not None else "<image>"
        problems = []
        for i, rec in enumerate(self.records):
            try:
                plan_record(rec, self.image_root, video_mode, i, image_token)
            except DataError as e:
                problems.append(str(e))
        if not self.records:
            problems.append("no records")
        if problems:
            more = f"; ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{path}: {len(problems)} bad record(s): " + "; ".join(problems[:20]) + more)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return encode_record(self.processor, self.records[i], self.image_root, self.video_mode,
                             self.num_frames, index=i)
