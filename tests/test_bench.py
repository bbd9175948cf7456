"""bench.py runs end to end on a tiny checkpoint and reports every metric for both implementations.

Speed is never asserted here (the machine is shared and numbers are noisy); only that every
number is there, finite and positive, and that the side-by-side bookkeeping adds up.
"""

import json
import math
import os
import subprocess
import sys

from tiny_model import hf_model, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (["load_s", "load_rss_gb", "peak_rss_gb", "ttft_s", "decode_tok_s", "decode_gbs", "decode_bw_frac"]
           + [f"vision_{k}img_s" for k in (1, 4, 8)] + [f"prefill_{k}img_tok_s" for k in (1, 4, 8)])


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_on_tiny_checkpoint(tmp_path):
    path = save_checkpoint(hf_model(seed=1), str(tmp_path / "ckpt"))
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--model", path, "--quick",
                          "--fp32-images", "1,4,8", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| dtype | metric |" in run.stdout  # the markdown table
    res = json.loads(out.read_text())
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"] and res["machine"]["transformers"]
    assert positive(res["bandwidth"]["read_gbs"])
    assert set(res["results"]) == {"bfloat16", "float32"}
    for dtype, r in res["results"].items():
        for impl in ("minterleave", "transformers"):
            missing = [m for m in METRICS if m not in r[impl]]
            assert not missing, f"{dtype} {impl}: no {missing}"
            bad = {m: r[impl][m] for m in METRICS if not positive(r[impl][m])}
            assert not bad, f"{dtype} {impl}: not positive numbers: {bad}"
            assert r[impl]["peak_rss_gb"] >= r[impl]["load_rss_gb"]
            assert math.isclose(r[impl]["decode_bw_frac"] * res["bandwidth"]["read_gbs"], r[impl]["decode_gbs"])
        for m in METRICS:
            assert math.isclose(r["ratio"][m], r["minterleave"][m] / r["transformers"][m])
        assert isinstance(r["same_greedy_tokens"], bool)
    assert res["results"]["float32"]["same_greedy_tokens"]  # same weights, greedy, same count of tokens


def test_bench_only_minterleave(tmp_path):
    path = save_checkpoint(hf_model(seed=2), str(tmp_path / "ckpt"))
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--model", path, "--quick",
                          "--only", "minterleave", "--dtypes", "bfloat16", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())["results"]["bfloat16"]
    assert "transformers" not in r and "ratio" not in r
    assert all(positive(r["minterleave"][m]) for m in METRICS)


def test_bench_attention_forwards_to_the_kernel_benchmark():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "attention", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "--interpret" in run.stdout  # kernels/bench_attention.py's own options


def test_tune_attention_interpreter_smoke(tmp_path):
    """The tuner's sweep logic runs on a CPU (tiny shape, two candidates per kernel, interpreter)."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "minterleave.kernels.tune_attention", "--interpret", "--repeats", "1",
                          "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == {"fwd", "dkdv", "dq"}
    assert all(r["ok"] and positive(r["ms"]) for r in results)  # every candidate agrees with the current one
    assert "suggested CONFIGS" in run.stdout
