"""Interleave-Bench: scoring against the reference definitions, reading the release's three configurations,
prompting, batching, resuming and --rescore, end to end on a fixture shaped like the hub dataset.

`make_bench` writes tiny parquet shards as lmms-lab/LLaVA-NeXT-Interleave-Bench lays them out: in_domain (two
shards, image_0..image_3), out_of_domain (image_0..image_4 and its extra columns), multi_view_in_domain
(image_0..image_7, `conversations` instead of question/answer), images as {bytes, path} structs with nulls
between them, ids restarting per configuration, both question types, several categories and one sub-task
that is in no category. The expected scores below are worked out by hand from lmms-eval's utils.py.
"""

import io
import json
import os
import random
import shutil

import pytest
import torch
from PIL import Image

import minterleave as mi
from minterleave import bench_scoring as bs
from minterleave import cli, interleave_bench as ib
from minterleave.data import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")
needs_bundled = pytest.mark.skipif(not os.path.isfile(os.path.join(BUNDLED, "model.safetensors")),
                                   reason="bundled checkpoint missing")


# ------------------------------------------------------------------------------------ scoring
MCQ = [  # (prediction, answer, mcq_acc) by lmms-eval's rules
    ("A", "A", 1), ("A. a red car", "A", 1), ("b. blue", "B", 1),        # "X. text" is its letter
    ("(B)", "B", 1), ("B) blue", "B", 1), ("(C) it is", "C", 1),         # brackets go, the letter stays
    ("The answer is C.", "C", 1), ("Answer: b", "B", 1),                 # the first standalone a-e
    ("a cat", "A", 1),                                                   # ... which an article is too
    ("Blue", "B", 0), ("F", "f", 1), ("F", "A", 0),                      # F is text, compared lower-cased
    ("Yes.", "yes", 1), ("yes", "no", 0), ('"no"', "No", 1),
    ("1,000", "1000", 1), ("3.5", "35", 0), ("3.5", "3.5", 1),           # commas in numbers; a decimal point stays
    ("A.\nsome text", "A", 1), ("Sure!\nThe answer is B", "B", 1),       # multi-line
    ("", "A", 0), ("", "", 1), ("   ", "", 1),                          # empty predictions
]


@pytest.mark.parametrize("pred, answer, expected", MCQ)
def test_mcq_acc_reference_cases(pred, answer, expected):
    assert bs.mcq_acc(pred, answer) == expected
    assert bs.score(pred, answer, "multi-choice") == float(expected)


def test_rouge_l_reference_cases():
    f = lambda p, r: 2 * p * r / (p + r + 1e-8)  # noqa: E731  (the package's F, with its epsilon)
    assert bs.rouge_l("the cat sat", "the cat sat") == pytest.approx(f(1, 1), abs=0)
    assert bs.rouge_l("Two cats", "two cats") == f(0.5, 0.5)        # case-sensitive
    assert bs.rouge_l("", "a b") == 0.0                             # empty prediction
    assert bs.rouge_l("...", "a b") == 0.0                          # the package raises: 0
    assert bs.rouge_l("the the the cat", "the cat") == f(1, 1)      # distinct words
    assert bs.rouge_l("a b. c d", "c d. a b") == f(1, 1)            # sentences at ".", LCS words united
    assert bs.rouge_l("x y", "z") == 0.0
    long = "x " * 256 + "y"                                         # 513 characters: "y" is cut off
    assert bs.rouge_l(long, "y") == 0.0 and bs.rouge_l(long[-3:], "y") == f(0.5, 1)
    assert bs.score("", "anything", "open-ended") == 0.0
    with pytest.raises(ValueError, match="question_type"):
        bs.score("a", "a", "yes-no")


def test_rouge_l_is_the_rouge_package():
    """The `rouge` package (what lmms-eval calls) on the cases above and on random text with periods, spaces,
    repeated words, new lines and case: equal to the last bit."""
    rouge = pytest.importorskip("rouge").Rouge()
    rng = random.Random(0)
    words = ["a", "b", "the", "cat", "The", ".", " ", "x.", "3.5", "\n", "1,000", "c d"]
    cases = [("the cat sat", "the cat sat"), ("Two cats", "two cats"), ("a b. c d", "c d. a b"),
             ("x " * 256 + "y", "y"), ("the the the cat", "the cat")]
    cases += [("".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 14))),
               "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 14))))
              for _ in range(1500)]
    compared = 0
    for pred, answer in cases:
        try:
            ref = rouge.get_scores(pred[:512], answer)[0]["rouge-l"]["f"]
        except ValueError:  # "Collections must contain at least 1 sentence."
            ref = 0.0
        else:
            compared += 1
        assert bs.rouge_l(pred, answer) == ref, (pred, answer)
    assert compared > 1000


def test_categories_and_the_mean_of_category_means():
    assert len(bs.CATEGORIES) == 18 and bs.CATEGORY_OF["NLVR2_Mantis"] == "NLVR2"
    rows = [("Spot-the-Diff", 1.0), ("CLEVR-Change", 0.0), ("Birds-to-Words", 0.5),  # one category, 3 sub-tasks
            ("RAVEN", 1.0), ("Made-Up", 1.0), ("Made-Up", 0.0)]
    t = bs.bench_table(rows)
    assert t["categories"] == {"Spot-the-Diff": {"n": 3, "score": 0.5}, "Puzzle": {"n": 1, "score": 1.0}}
    assert t["unknown"] == {"Made-Up": {"n": 2, "score": 0.5}}  # reported, in no category
    assert t["overall"] == 0.75 and t["n"] == 6  # (0.5 + 1.0) / 2, not the mean over samples (0.583)
    assert bs.bench_table([("Made-Up", 1.0)])["overall"] is None
    text = bs.format_bench_table("in_domain", t, "pad")
    assert "(unknown) Made-Up" in text and "--aspect pad" in text


def test_predictions_file_torn_last_line(tmp_path):
    line = {"sample_id": 1, "split": "in_domain", "sub_task": "RAVEN", "question_type": "multi-choice",
            "answer": "A", "pred": "A", "score": 1.0}
    path = tmp_path / "p.jsonl"
    good = json.dumps(line) + "\n" + json.dumps(dict(line, sample_id=2)) + "\n"
    path.write_text(good + '{"sample_id": 3, "spl')
    assert [r["sample_id"] for r in bs.read_predictions(str(path))] == [1, 2]
    assert path.read_text().endswith('"spl')  # reading alone leaves the file as it is
    bs.read_predictions(str(path), repair=True)
    assert path.read_text() == good
    path.write_text('{"oops": 1}\n' + good)
    with pytest.raises(DataError, match="line 1"):
        bs.read_predictions(str(path))


# ------------------------------------------------------------------------------------ the fixture
def png(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{size[0]}x{size[1]}.png"}


RED, GREEN, BLUE = png((40, 24), (220, 30, 30)), png((24, 40), (30, 200, 30)), png((32, 32), (30, 30, 220))
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_shard(path, rows, n_images, extra=()):
    cols = {"sample_id": pa.array([r["sample_id"] for r in rows], pa.int64()),
            "sub_task": pa.array([r["sub_task"] for r in rows], pa.string())}
    for i in range(n_images):
        cols[f"image_{i}"] = pa.array([(r["images"] + [None] * n_images)[i] for r in rows], IMAGE)
    for name in ("question", "answer", *extra):
        if name in rows[0]:
            cols[name] = pa.array([r[name] for r in rows], pa.string())
    if "conversations" in rows[0]:
        turn = pa.struct([("from", pa.string()), ("value", pa.string())])
        cols["conversations"] = pa.array([r["conversations"] for r in rows], pa.list_(turn))
    cols["question_type"] = pa.array([r["question_type"] for r in rows], pa.string())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(cols), path)


def conv(q, a, *more):
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns + [{"from": f, "value": v} for f, v in zip(["human", "gpt"] * len(more), more)]


IN_DOMAIN = [
    dict(sample_id=0, sub_task="Spot-the-Diff", images=[RED, BLUE], question="What changed?",
         answer="the car is gone", question_type="open-ended"),
    dict(sample_id=1, sub_task="NLVR2_Mantis", images=[RED, None, GREEN],  # a null between two images
         question="Left: <image> right: <image>\nIs the left one red? A. yes B. no", answer="A",
         question_type="multi-choice"),
    dict(sample_id=2, sub_task="RAVEN", images=[RED, GREEN, BLUE], question="Which comes next?\nA. x\nB. y",
         answer="B", question_type="multi-choice"),
    dict(sample_id=3, sub_task="QBench", images=[BLUE], question="Is it blurry?", answer="C. blurry",
         question_type="multi-choice"),
    dict(sample_id=4, sub_task="Mystery-Task", images=[GREEN], question="Describe it.", answer="a green square",
         question_type="open-ended"),
    dict(sample_id=5, sub_task="VIST", images=[RED, GREEN, BLUE, RED], question="Tell the story.",
         answer="it began. then it ended.", question_type="open-ended"),
    dict(sample_id=6, sub_task="MathVerse", images=[], question="What is 2 + 2? A. 3 B. 4", answer="B",
         question_type="multi-choice"),
]
OUT_OF_DOMAIN = [
    dict(sample_id=0, sub_task="BLINK", images=[RED, BLUE], question="Which is bluer?", answer="B",
         choice_list="['A', 'B']", dataset="BLINK", task_instruction="", question_type="multi-choice"),
    dict(sample_id=1, sub_task="Mantis", images=[GREEN], question="What colour?", answer="green",
         choice_list="", dataset="Mantis", task_instruction="", question_type="open-ended"),
]
MULTI_VIEW = [
    dict(sample_id=0, sub_task="ScanQA", images=[RED, GREEN, BLUE], question_type="open-ended",
         conversations=conv("How many chairs?", "two chairs")),
    dict(sample_id=1, sub_task="nuscenes", images=[BLUE, None, RED], question_type="multi-choice",
         conversations=conv("Is there a car? A. yes B. no", "A", "And a bus?", "B")),  # first turn only
]


def make_bench(root):
    """The fixture snapshot under `root` (module docstring); returns root."""
    root = str(root)
    write_shard(os.path.join(root, "in_domain", "test-00000-of-00002.parquet"), IN_DOMAIN[:3], 4)
    write_shard(os.path.join(root, "in_domain", "test-00001-of-00002.parquet"), IN_DOMAIN[3:], 4)
    write_shard(os.path.join(root, "out_of_domain", "test-00000-of-00001.parquet"), OUT_OF_DOMAIN, 5,
                extra=("choice_list", "dataset", "task_instruction"))
    write_shard(os.path.join(root, "multi_view_in_domain", "test-00000-of-00001.parquet"), MULTI_VIEW, 8)
    return root


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_bench(tmp_path_factory.mktemp("bench"))


@pytest.fixture(scope="module")
def proc():
    return mi.Processor.from_pretrained(BUNDLED)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's operations are too small to share out: on a busy 2-core machine two threads wait for
    each other (README, "keep other work off the cores"), one thread runs this file's model tests ~50x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ reading and prompting
def test_reads_the_three_configurations(bench):
    sources = ib.find_splits(bench)
    assert list(sources) == list(ib.SPLITS) and len(sources["in_domain"][1]) == 2
    assert [ib.count(s) for s in sources.values()] == [7, 2, 2]
    got = {split: list(ib.samples(split, src)) for split, src in sources.items()}
    ids = [(s["split"], s["sample_id"]) for ss in got.values() for s in ss]
    assert ids[:7] == [("in_domain", i) for i in range(7)] and ("out_of_domain", 0) in ids  # ids restart
    s1 = got["in_domain"][1]
    assert len(s1["images"]) == 2 and s1["answer"] == "A" and s1["question_type"] == "multi-choice"
    assert [ib.load_image(r, s1).getpixel((0, 0)) for r in s1["images"]] == [(220, 30, 30), (30, 200, 30)]
    assert got["in_domain"][6]["images"] == []
    mv = got["multi_view_in_domain"]
    assert (mv[1]["question"], mv[1]["answer"], len(mv[1]["images"])) == ("Is there a car? A. yes B. no", "A", 2)
    assert [s["sample_id"] for s in ib.samples("in_domain", sources["in_domain"], limit=4)] == [0, 1, 2, 3]
    assert ib.find_splits(bench, "out_of_domain") == {"out_of_domain": sources["out_of_domain"]}


def test_reads_the_json_release(tmp_path, proc):
    """The original release: multi_image_in_domain.json & co. with image paths relative to the JSON's folder."""
    os.makedirs(tmp_path / "Split1")
    for name, img in (("a.png", RED), ("b.png", BLUE)):
        (tmp_path / "Split1" / name).write_bytes(img["bytes"])
    recs = [{"sample_id": 3, "image": ["Split1/a.png", "Split1/b.png"],
             "conversations": [{"from": "human", "value": "Which is red?\nA. first\nB. second"},
                               {"from": "gpt", "value": "A"}],
             "metadata": {"dataset": "MIT-States_StateCoherence", "question_type": "multi-choice"}},
            {"sample_id": 4, "image": ["Split1/b.png"],
             "conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "blue"}],
             "metadata": {"dataset": "Made-Up", "question_type": "open-ended"}}]
    (tmp_path / "multi_image_in_domain.json").write_text(json.dumps(recs))
    sources = ib.find_splits(str(tmp_path))
    assert sources == {"in_domain": ("json", str(tmp_path / "multi_image_in_domain.json"))}
    assert ib.find_splits(str(tmp_path / "multi_image_in_domain.json")) == sources
    got = list(ib.samples("in_domain", sources["in_domain"]))
    assert [(s["sample_id"], s["sub_task"], s["answer"]) for s in got] == [
        (3, "MIT-States_StateCoherence", "A"), (4, "Made-Up", "blue")]
    assert [im.getpixel((0, 0)) for im in ib.images_for(proc, got[0], "resize")] == [(220, 30, 30), (30, 30, 220)]
    assert ib.prompt(proc, got[1], 1).count("<image>") == 1
    with pytest.raises(ValueError, match="name the split with --split"):
        ib.find_splits(str(tmp_path / "Split1" / "a.png"))


def test_prompts_follow_lmms_eval(bench, proc):
    src = ib.find_splits(bench, "in_domain")["in_domain"]
    s = list(ib.samples("in_domain", src))
    chat = lambda q: proc.apply_chat_template([{"role": "user", "content": q}])  # noqa: E731
    assert ib.prompt(proc, s[0], 2) == chat("<image> <image>\nWhat changed?")   # images first, space-joined
    assert ib.prompt(proc, s[1], 2) == chat(s[1]["question"])                   # placeholders kept in place
    assert ib.prompt(proc, s[6], 0) == chat(s[6]["question"])                   # no image, no placeholder
    with pytest.raises(DataError, match="sample_id 1: the question has 2 <image>"):
        ib.prompt(proc, s[1], 3)


def test_pad_centres_each_image_on_the_processor_mean_colour(bench, proc):
    src = ib.find_splits(bench, "in_domain")["in_domain"]
    s0 = next(ib.samples("in_domain", src))
    padded = ib.images_for(proc, s0, "pad")
    fill = tuple(int(m * 255) for m in proc.pixel_kwargs["mean"])
    assert padded[0].size == (40, 40) and padded[0].getpixel((0, 0)) == fill  # 40x24: 8 rows above
    assert padded[0].getpixel((0, 8)) == (220, 30, 30) and padded[0].getpixel((0, 7)) == fill
    assert padded[0].getpixel((0, 32)) == fill and padded[0].getpixel((0, 31)) == (220, 30, 30)
    assert padded[1].size == (32, 32)  # square: as it is
    assert [im.size for im in ib.images_for(proc, s0, "resize")] == [(40, 24), (32, 32)]


# ------------------------------------------------------------------------------------ end to end
class Counting:
    """Counts the prompts a model is asked (to see what a resumed run asks again)."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, input_ids, **kw):
        self.rows += len(input_ids)
        return self.model.generate(input_ids, **kw)


@needs_bundled
def test_batched_resumed_and_rescored_end_to_end(bench, proc, tmp_path, capsys):
    model = mi.Model.from_pretrained(BUNDLED)
    sources = ib.find_splits(bench)
    out = str(tmp_path / "preds.jsonl")
    batched = ib.evaluate(model, proc, sources, batch_size=4, out=out, progress=False)
    single = ib.evaluate(model, proc, sources, batch_size=1, progress=False)
    assert batched == single  # left-padded batches answer as batch 1 does, token for token
    lines = bs.read_predictions(out)
    assert lines == [r for rows in batched.values() for r in rows] and len(lines) == 11
    assert {k for r in lines for k in r} == {"sample_id", "split", "sub_task", "question_type", "answer", "pred",
                                             "score", "aspect"}
    assert all(r["score"] == bs.score(r["pred"], r["answer"], r["question_type"]) for r in lines)

    # interrupted: 5 whole lines and a torn sixth; the rerun asks the other 6 and ends with the same file
    text = open(out).read().splitlines(keepends=True)
    with open(out, "w") as f:
        f.write("".join(text[:5]) + text[5][:20])
    counting = Counting(model)
    resumed = ib.evaluate(counting, proc, sources, batch_size=4, out=out, progress=False)
    assert counting.rows == 6 and resumed == batched and open(out).read() == "".join(text)
    counting.rows = 0
    assert ib.evaluate(counting, proc, sources, out=out, progress=False) == batched and counting.rows == 0
    with pytest.raises(ValueError, match="--aspect pad"):
        ib.evaluate(model, proc, sources, out=out, aspect="resize", progress=False)

    # --rescore: the same tables from the file alone
    import eval as eval_py
    assert eval_py.main(["--rescore", out]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = [json.loads(x) for x in printed[-3:]]
    tables = bs.tables(batched)
    assert summary == [bs.summary_line(s, t) for s, t in tables.items()]
    assert [x["n"] for x in summary] == [7, 2, 2]
    assert set(summary[0]["categories"]) == {"Spot-the-Diff", "NLVR2", "Puzzle", "QBench", "Visual-Story-Telling",
                                             "MathVerse"}
    assert summary[0]["unknown"]["Mystery-Task"]["n"] == 1
    assert summary[0]["overall"] == pytest.approx(
        sum(v["score"] for v in tables["in_domain"]["categories"].values()) / 6, abs=1e-4)


@needs_bundled
def test_eval_py_bench_prints_tables_progress_and_json_lines(bench, tmp_path, capsys):
    import eval as eval_py
    out = tmp_path / "p.jsonl"
    assert eval_py.main(["--bench", bench, "--split", "in_domain", "--limit", "5", "--batch-size", "2",
                         "--out", str(out), "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    stdout = cap.out.strip().splitlines()
    assert stdout[0] == "in_domain  (images: --aspect pad)"
    assert any(x.split()[:2] == ["Spot-the-Diff", "1"] for x in stdout)
    assert any("(unknown) Mystery-Task" in x for x in stdout)
    line = json.loads(stdout[-1])
    assert set(line) == {"split", "overall", "categories", "n", "unknown"} and line["n"] == 5
    assert "in_domain: 5/5 samples" in cap.err and "samples/s, ETA" in cap.err
    assert len(out.read_text().splitlines()) == 5


# ------------------------------------------------------------------------------------ bad input
def eval_error(argv, capsys):
    import eval as eval_py
    assert cli.run(eval_py.main, argv, prog="eval.py") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.py: error: "), err
    return err[0]


def test_bench_missing_path_or_split(tmp_path, capsys, bench):
    # the data is checked first: a model that does not exist is never reached
    nowhere = tmp_path / "nowhere"
    assert f"{nowhere}: no such benchmark folder or file" in eval_error(
        ["--model", str(nowhere), "--bench", str(nowhere)], capsys)
    only = tmp_path / "only"
    os.makedirs(only / "in_domain")
    shutil.copy(os.path.join(bench, "in_domain", "test-00000-of-00002.parquet"), only / "in_domain" / "a.parquet")
    assert "no out_of_domain split" in eval_error(["--model", str(nowhere), "--bench", str(only), "--split",
                                                   "out_of_domain"], capsys)
    assert "--rescore" in eval_error(["--rescore", str(nowhere)], capsys)


def test_bench_parquet_without_the_needed_columns(tmp_path, capsys):
    shard = tmp_path / "b" / "in_domain" / "test-00000-of-00001.parquet"
    os.makedirs(shard.parent)
    pq.write_table(pa.table({"sample_id": [0], "sub_task": ["RAVEN"], "question": ["q"]}), shard)
    msg = eval_error(["--model", str(tmp_path / "no-model"), "--bench", str(tmp_path / "b")], capsys)
    assert str(shard) in msg and "no column(s) question_type, answer" in msg
    shard.write_bytes(b"not parquet at all")
    assert f"{shard}: not a readable parquet file" in eval_error(["--bench", str(tmp_path / "b")], capsys)


def test_bench_bad_out_file(tmp_path, capsys, bench):
    no_model = str(tmp_path / "no-model")  # refused before the model is looked for
    assert "--out" in eval_error(["--model", no_model, "--bench", bench, "--out", str(tmp_path)], capsys)
    missing = tmp_path / "no-such-folder" / "p.jsonl"
    msg = eval_error(["--model", no_model, "--bench", bench, "--out", str(missing)], capsys)
    assert f"--out {missing}: cannot write there" in msg
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n{}\n")
    assert f"{bad}: line 1" in eval_error(["--model", no_model, "--bench", bench, "--out", str(bad)], capsys)
