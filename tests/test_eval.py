"""Scoring (minterleave/scoring.py) on fixtures with known answers, and eval.py, the CLI over it.

A stub model whose generate returns chosen replies makes every score computable by hand; the bundled
model checks the CLI end to end against the table weights/README.md states.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

import minterleave as mi
from minterleave import bench_scoring, scoring, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")
needs_bundled = pytest.mark.skipif(not os.path.isfile(os.path.join(BUNDLED, "model.safetensors")),
                                   reason="bundled checkpoint missing")


@pytest.fixture(scope="module")
def proc():
    return mi.Processor.from_pretrained(BUNDLED)


class StubModel:
    """Stands in for mi.Model in the scoring loops: generate answers reply(prompt) for each row, the
    reply's ids then an end-of-turn id then junk (which the caller must cut off), right-padded."""

    def __init__(self, proc, reply):
        self.proc, self.reply, self.device, self.training = proc, reply, torch.device("cpu"), True
        self.prompts, self.images = [], []  # what each generate call saw

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, eos_token_id=None,
                 pad_token_id=None):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.proc.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
            self.prompts.append(prompt)
            rows.append((self.proc.encode(self.reply(prompt)) + [eos_token_id[0]] + self.proc.encode(" junk"))
                        [:max_new_tokens])
        self.images.append(0 if pixel_values is None else len(pixel_values))
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def expanded(proc, question):
    """The documented inference layout of a question, each <image> expanded to its image tokens."""
    prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return prompt.replace("<image>", "<image>" * proc.tokens_per_image)


# ------------------------------------------------------------------------------------ judging
def test_normalize_and_option_letters():
    assert scoring.normalize("  Red.\n") == "red"
    assert scoring.normalize("The top-left") == "top-left"
    assert scoring.normalize("two  blue\tcircles!\nmore") == "two blue circles"
    # records are judged by Interleave-Bench's rules (bench_scoring, tested in test_interleave_bench.py)
    assert scoring.mcq_acc("(B) a cat", "B")
    assert scoring.mcq_acc("Answer: b", "B")
    assert scoring.mcq_acc("The answer is C.", "C")
    assert not scoring.mcq_acc("A", "B")
    assert not scoring.mcq_acc("Blue", "B")  # a word that starts with the letter is no option
    assert scoring.mcq_acc("Yes.", "yes")
    assert scoring.score("B", "B", "multi-choice") == 1.0 and scoring.score("B", "B", "whatever") == 1.0
    assert scoring.count_options("Which? (A) red (B) blue (C) green") == 3
    assert scoring.count_options("Which?\nA. x\nB. y") == 2
    assert scoring.count_options("What colour is it?") is None


def test_rouge_l():
    """The records' ROUGE-L is Interleave-Bench's (the `rouge` package's, case-sensitive, distinct words)."""
    assert scoring.rouge_l is bench_scoring.rouge_l
    assert scoring.rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert scoring.rouge_l("", "a b") == 0.0
    assert scoring.rouge_l("x y", "z") == 0.0
    # distinct words {the, cat, sat, on, mat} and {The, cat, was, the, mat}; LCS words {cat, the, mat}
    assert scoring.rouge_l("the cat sat on the mat", "The cat was the mat") == pytest.approx(0.6)
    assert scoring.score("two cats", "two cats", "open-ended") == pytest.approx(1.0)


def test_tables_average_per_question_and_per_category():
    table = scoring.tally([("a", 1, 0.5), ("a", 0, 0.5), ("a", 1, 0.5), ("a", 1, 0.5), ("b", 0.2, 0.25)])
    assert table == {"a": {"n": 4, "correct": 3, "chance": 0.5}, "b": {"n": 1, "correct": 0.2, "chance": 0.25}}
    n, acc, chance = scoring.overall(table)
    assert (n, acc, chance) == (5, pytest.approx(3.2 / 5), pytest.approx((4 * 0.5 + 0.25) / 5))
    assert scoring.macro(table) == pytest.approx((0.75 + 0.2) / 2)  # each category counts once
    assert scoring.overall(scoring.tally([("a", 1, 0.5), ("a", 1, None)]))[2] is None  # one unknown: unknown
    cats = scoring.category_scores(table, {"both": ["a", "b", "absent"], "none": ["absent"]})
    assert cats == {"both": pytest.approx((0.75 + 0.2) / 2)}


# ------------------------------------------------------------------------------------ loops, stub model
def test_synthetic_eval_scores_known_answers(proc):
    n, seed = 6, 3
    smps = [tasks.make_sample("video", tasks.sample_seed(seed, i), proc.image_size) for i in range(n)]
    right = {0, 2, 5}
    replies = iter(f"The {s.answer.upper()}." if i in right else "xyzzy" for i, s in enumerate(smps))
    model = StubModel(proc, lambda prompt: next(replies))
    res = scoring.evaluate_synthetic(model, proc, "video", n, seed, batch_size=4)
    assert model.training  # restored
    assert res["accuracy"] == pytest.approx(len(right) / n) and res["n"] == n
    assert res["chance"] == pytest.approx(sum(s.chance for s in smps) / n)
    per = {}
    for i, s in enumerate(smps):
        per.setdefault(s.qtype, {"n": 0, "correct": 0, "chance": pytest.approx(s.chance)})
        per[s.qtype]["n"] += 1
        per[s.qtype]["correct"] += i in right
    assert res["per_qtype"] == per
    assert model.prompts == [expanded(proc, s.question) for s in smps]  # the chat layout, nothing else
    assert model.images == [4 * len(smps[0].images), 2 * len(smps[0].images)]  # batches of 4 and 2


def write_records(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / name)

    def rec(i, images, question, answer, dataset, qtype, **extra):
        return {"id": i, "image": images, "conversations": [{"from": "human", "value": question},
                                                             {"from": "gpt", "value": answer}],
                "metadata": {"dataset": dataset, "question_type": qtype}, **extra}

    recs = [rec(0, ["a.png"], "<image>\nWhich colour? (A) red (B) blue (C) green", "B", "DS1", "multi-choice"),
            rec(1, ["a.png", "b.png"], "Which one?\nA. the first\nB. the second", "A", "DS1", "multi-choice"),
            rec(2, ["c.png"], "<image> Where is it?", "the red circle is left", "DS2", "open-ended"),
            rec(3, [], "How many cats?", "two cats", "DS2", "open-ended"),
            rec(4, ["a.png"], "<image>\nIs it red?", "yes", "DS3", "multi-choice", multi_patch=True)]
    # prompt marker -> reply, and its score by hand
    replies = {"Which colour": "(B) blue",           # option letter B: 1
               "Which one": "B",                     # 0
               "Where is it": "red circle on the left",  # LCS "red circle left" 3 of 5 and 5: F1 0.6
               "How many cats": "two cats",          # 1.0 (ROUGE-L is case-sensitive)
               "Is it red": "Yes."}                  # 1
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(recs))
    return path, replies


def test_records_eval_scores_known_answers(proc, tmp_path):
    path, replies = write_records(tmp_path)
    model = StubModel(proc, lambda prompt: next(r for k, r in replies.items() if k in prompt))
    res = scoring.evaluate_records(model, proc, str(path), str(tmp_path), batch_size=8)
    assert res["per_group"] == {
        "DS1/multi-choice": {"n": 2, "correct": 1.0, "chance": pytest.approx((1 / 3 + 1 / 2) / 2)},
        "DS2/open-ended": {"n": 2, "correct": pytest.approx(1.6), "chance": None},
        "DS3/multi-choice": {"n": 1, "correct": 1.0, "chance": None}}
    assert res["n"] == 5 and res["accuracy"] == pytest.approx(3.6 / 5) and res["chance"] is None
    assert res["macro"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert res["domain"] == "bench.json"
    # the two-image record without placeholders gets them in front of its question; the multi-patch
    # record is asked alone (overview + tiles: more than one picture for its one image)
    assert expanded(proc, "<image><image>\nWhich one?\nA. the first\nB. the second") in model.prompts
    assert model.images[0] == 4 and model.images[1] > 1 and len(model.images) == 2
    table = scoring.format_table(res, "per_group")
    assert re.search(r"DS1/multi-choice\s+2\s+0\.500\s+0\.417", table)
    assert re.search(r"DS2/open-ended\s+2\s+0\.800\s+-", table)
    assert re.search(r"overall\s+5\s+0\.720\s+-", table)
    assert re.search(r"mean of categories\s+3\s+0\.767", table)
    limited = scoring.evaluate_records(model, proc, str(path), str(tmp_path), limit=2)
    assert limited["n"] == 2 and limited["accuracy"] == 0.5


# ------------------------------------------------------------------------------------ eval.py
def run(args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")] + args, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@needs_bundled
def test_eval_cli_reproduces_the_weights_readme_table():
    """The command and table in weights/README.md, through the CLI. Margin: one question per domain
    (the run is deterministic; the margin absorbs a near-tie argmax flipping on another CPU)."""
    with open(os.path.join(ROOT, "weights", "README.md")) as f:
        readme = f.read()
    cmd = re.search(r"python eval\.py (--model weights/minterleave-tiny --domain all --n (\d+) --seed \d+)", readme)
    assert cmd, "weights/README.md should give the eval command of its table"
    names = {"multi-image": "multi_image", "video": "video", "3D": "3d", "multi-patch": "multi_patch"}
    table = {names[r[0]]: (float(r[1]), float(r[2]))
             for r in re.findall(r"^\| (multi-image|video|3D|multi-patch) \| ([\d.]+) \| ([\d.]+) \|", readme, re.M)}
    assert set(table) == set(tasks.DOMAINS)
    n = int(cmd.group(2))
    out = run(cmd.group(1).split())
    res = json.loads(out.strip().splitlines()[-1])
    assert set(res) == {"domain", "accuracy", "chance", "n", "per_domain"} and res["n"] == n * len(table)
    for d, (acc, chance) in table.items():
        got = res["per_domain"][d]
        assert got["n"] == n and abs(got["accuracy"] - acc) <= 1 / n + 1e-9, (d, got, acc)
        assert round(got["chance"], 3) == chance, (d, got)
    from test_docs import accuracy_table  # the question types' columns of the same table
    qtypes = {q: v for acc, chance, per in accuracy_table(readme).values() for q, v in per.items()}
    for qtype in (q for d in tasks.DOMAINS for q in tasks.QTYPES[d]):  # one table row per question type
        row = re.search(rf"^  {qtype}\s+(\d+)\s+([\d.]+)\s+[\d.]+$", out, re.M)
        assert row, qtype
        assert abs(float(row.group(2)) - qtypes[qtype]) <= 1 / int(row.group(1)) + 1e-9, (qtype, row.group(0))
    assert len(re.findall(r"^  overall ", out, re.M)) == len(table)


def test_eval_refuses_training_seeds():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--seed", "100"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--seed must be in [0, 100)" in r.stderr


def test_eval_help_shows_every_default():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    blocks = re.split(r"\n  (?=-)", out.split("options:", 1)[1])[1:]
    assert len(blocks) >= 14
    missing = [b.split()[0] for b in blocks if not b.startswith("-h") and "default" not in b]
    assert not missing, missing
    assert "(default: 200)" in out and "(default: float32)" in out


@needs_bundled
def test_bench_format_eval_cli_is_the_library(proc, tmp_path):
    recs = tasks.write_dataset(str(tmp_path / "bench.json"), "all", 4, seed=1, out_dir=str(tmp_path))
    for i, r in enumerate(recs):
        r["metadata"]["question_type"] = "open-ended" if i % 2 else "multi-choice"
    (tmp_path / "bench.json").write_text(json.dumps(recs))
    out = run(["--data", str(tmp_path / "bench.json"), "--image-root", str(tmp_path), "--max-new-tokens", "3"])
    res = json.loads(out.strip().splitlines()[-1])
    model = mi.Model.from_pretrained(BUNDLED)
    ref = scoring.evaluate_records(model, proc, str(tmp_path / "bench.json"), str(tmp_path), max_new_tokens=3)
    assert res == {k: (round(ref[k], 4) if isinstance(ref[k], float) else ref[k])
                   for k in ("domain", "accuracy", "macro", "chance", "n")}
    assert res["n"] == 4
    assert "minterleave-synthetic/open-ended" in out and "minterleave-synthetic/multi-choice" in out
