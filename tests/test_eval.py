"""eval.py: scoring helpers, the synthetic table + JSON line, and Interleave-Bench-format JSON."""

import json
import os
import subprocess
import sys

import pytest

from minterleave import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import train  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "ckpt")
    train.main(["--preset", "test", "--domain", "all", "--max-steps", "1", "--batch-size", "4", "--out", out])
    return out


def test_normalize_and_option_letters():
    assert ev.normalize("  Red.\n") == "red"
    assert ev.normalize("The top-left") == "top-left"
    assert ev.multi_choice_correct("(B) a cat", "B")
    assert ev.multi_choice_correct("Answer: b", "B")
    assert not ev.multi_choice_correct("A", "B")
    assert ev.multi_choice_correct("Yes.", "yes")


def test_rouge_l():
    assert ev.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert ev.rouge_l("", "a b") == 0.0
    # LCS "the cat the mat" (4) of 6 and 5 tokens
    assert ev.rouge_l("the cat sat on the mat", "the cat was the mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert ev.rouge_l("x " * 400, "x") < ev.rouge_l("x", "x")  # long predictions are cut at 512 characters


def run(args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py")] + args, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_synthetic_eval_prints_table_and_json_line(ckpt):
    out = run(["--model", ckpt, "--domain", "video", "--n", "6", "--seed", "3", "--batch-size", "3"])
    lines = out.strip().splitlines()
    res = json.loads(lines[-1])
    assert set(res) == {"domain", "accuracy", "chance", "n"}
    assert res["domain"] == "video" and res["n"] == 6 and 0 <= res["accuracy"] <= 1
    # 6 consecutive seeds: 2 per question type; chances 1/4, 1/2, 1/2
    assert res["chance"] == pytest.approx((0.25 + 0.5 + 0.5) / 3, abs=1e-4)
    for qtype in tasks.QTYPES["video"]:
        assert any(line.strip().startswith(qtype) for line in lines)
    assert any(line.strip().startswith("overall") for line in lines)


def test_eval_refuses_training_seeds(ckpt):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", ckpt, "--seed", "100"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--seed" in r.stderr


def test_bench_format_eval(ckpt, tmp_path):
    recs = tasks.write_dataset(str(tmp_path / "bench.json"), "all", 4, seed=1, out_dir=str(tmp_path))
    for i, r in enumerate(recs):
        r["metadata"]["question_type"] = "open-ended" if i % 2 else "multi-choice"
    (tmp_path / "bench.json").write_text(json.dumps(recs))
    out = run(["--model", ckpt, "--data", str(tmp_path / "bench.json"), "--image-root", str(tmp_path),
               "--max-new-tokens", "3"])
    res = json.loads(out.strip().splitlines()[-1])
    assert res["domain"] == "bench.json" and res["n"] == 4 and 0 <= res["accuracy"] <= 1
    assert "minterleave-synthetic/open-ended" in out and "minterleave-synthetic/multi-choice" in out
