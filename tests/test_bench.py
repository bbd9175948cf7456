"""bench.py runs end to end on a tiny checkpoint and its numbers are consistent with each other.

Speed is never asserted (the machine is shared and numbers are noisy). What is checked would be wrong if
the bookkeeping were: every metric the README table reads is in the JSON; ratios are the quotients of the
medians; prefill tok/s x time to first token is the prompt's token count (images included); bytes read per
decoded token are the decoder's parameter bytes counted from the checkpoint file; GB/s = bytes x tok/s
/ 1e9; the printed table shows the JSON's numbers on rows labelled with the right units.
"""

import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import minterleave as mi
from tiny_model import hf_model, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = (["load_s", "load_rss_gb", "peak_rss_gb", "ttft_s", "decode_tok_s", "decode_gbs", "decode_bw_frac"]
           + [f"vision_{k}img_s" for k in (1, 4, 8)] + [f"prefill_{k}img_tok_s" for k in (1, 4, 8)])
TEXT_TOKENS = 25  # bench.py's prompt: 5 text tokens, the images, 20 text tokens
# metric -> the label (with its unit) of its row in the printed table, as the README quotes them
LABELS = {"decode_tok_s": "decode, 8 greedy tokens (tok/s)", "decode_gbs": "decode parameter bandwidth (GB/s)",
          "ttft_s": f"time to first token, 1 image + {TEXT_TOKENS} text tokens (s)",
          "prefill_1img_tok_s": "prefill, 1 image(s) (tok/s)", "prefill_8img_tok_s": "prefill, 8 image(s) (tok/s)",
          "vision_1img_s": "vision tower + projector, 1 image(s) (s)",
          "vision_4img_s": "vision tower + projector, 4 image(s) (s)",
          "peak_rss_gb": "peak RSS after all measurements (GB)", "load_s": "load time (s)"}


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def bench(path, out, *args):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--model", path, "--quick",
                          "--json", str(out), *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout, json.loads(out.read_text())


def decoder_bytes_per_token(path, dtype):
    """What one decode step reads, counted from the file: every decoder layer, the final norm and the
    output head (the embedding matrix when tied); not the vision tower, projector or embedding lookup."""
    tensors = load_file(os.path.join(path, "model.safetensors"))
    head = next(n for n in ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")
                if n in tensors)
    read = [n for n in tensors if n.startswith("language_model.model.layers.")]
    numel = sum(tensors[n].numel() for n in read + ["language_model.model.norm.weight", head])
    return numel * torch.finfo(getattr(torch, dtype)).bits // 8


def table_row(stdout, dtype, label):
    """(minterleave, transformers, ratio) cells of the printed row."""
    rows = [line for line in stdout.splitlines() if line.startswith(f"| {dtype} | {label} |")]
    assert len(rows) == 1, (dtype, label, rows)
    return tuple(c.strip() for c in rows[0].split("|")[3:6])


def test_bench_quick_on_tiny_checkpoint(tmp_path):
    # GQA (4 query heads, 2 key/value heads) and a tied head: both change the bytes per token
    path = save_checkpoint(hf_model(seed=1), str(tmp_path / "ckpt"))
    stdout, res = bench(path, tmp_path / "out.json", "--fp32-images", "1,4,8")
    assert "| dtype | metric | minterleave | transformers | ratio mi/tf | better |" in stdout
    m = res["machine"]
    assert (m["cores"], m["torch"], m["transformers"]) == (os.cpu_count(), torch.__version__,
                                                          transformers.__version__)
    assert res["model"] == path and res["args"]["new_tokens"] == 8 and res["args"]["repeats"] == 1  # --quick
    assert positive(res["bandwidth"]["read_gbs"])
    assert res["bandwidth"]["read_gbs"] == max(res["bandwidth"]["sum_fp32_gbs"], res["bandwidth"]["gemv_bf16_gbs"])
    with open(os.path.join(path, "config.json")) as f:
        vision = json.load(f)["vision_config"]
    prompt_tokens = TEXT_TOKENS + (vision["image_size"] // vision["patch_size"]) ** 2  # "full": every patch
    assert set(res["results"]) == {"bfloat16", "float32"}
    for dtype, r in res["results"].items():
        nbytes = res["decode_bytes_per_token"][dtype]
        assert nbytes == decoder_bytes_per_token(path, dtype), dtype
        for impl in ("minterleave", "transformers"):
            x = r[impl]
            missing = [k for k in METRICS if k not in x]
            assert not missing, f"{dtype} {impl}: no {missing}"
            bad = {k: x[k] for k in METRICS if not positive(x[k])}
            assert not bad, f"{dtype} {impl}: not positive numbers: {bad}"
            assert x["peak_rss_gb"] >= x["load_rss_gb"]
            # one sample each with --quick, from the same request: the median is that sample
            assert math.isclose(x["prefill_1img_tok_s"] * x["ttft_s"], prompt_tokens), (dtype, impl)
            assert math.isclose(x["decode_gbs"], nbytes * x["decode_tok_s"] / 1e9)
            assert math.isclose(x["decode_bw_frac"] * res["bandwidth"]["read_gbs"], x["decode_gbs"])
        assert set(r["ratio"]) == set(r["minterleave"])
        for k in METRICS:
            assert math.isclose(r["ratio"][k], r["minterleave"][k] / r["transformers"][k])
        for k, label in LABELS.items():
            assert table_row(stdout, dtype, label) == (f"{r['minterleave'][k]:.3g}", f"{r['transformers'][k]:.3g}",
                                                       f"{r['ratio'][k]:.2f}x"), (dtype, k)
        assert isinstance(r["same_greedy_tokens"], bool)
        assert f"| {dtype} | same greedy tokens | {r['same_greedy_tokens']} |" in stdout
    assert res["results"]["float32"]["same_greedy_tokens"]  # same weights, greedy, same count of tokens


def test_bench_only_minterleave(tmp_path):
    path = save_checkpoint(hf_model(seed=2), str(tmp_path / "ckpt"))
    stdout, res = bench(path, tmp_path / "out.json", "--only", "minterleave", "--dtypes", "bfloat16")
    assert set(res["results"]) == {"bfloat16"}
    r = res["results"]["bfloat16"]
    assert set(r) == {"minterleave"}  # no transformers, no ratio, no token comparison
    assert all(positive(r["minterleave"][k]) for k in METRICS)
    assert table_row(stdout, "bfloat16", LABELS["decode_tok_s"]) == (f"{r['minterleave']['decode_tok_s']:.3g}",
                                                                     "-", "-")
    assert "same greedy tokens" not in stdout


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


def test_bench_finetune_on_tiny_checkpoint(tmp_path):
    """bench.py finetune: both implementations train, the ratios are the medians' quotients, and the first step
    (untrained adapter, B = 0) gives both the base model's loss on the same batch (would differ with another
    batch, image or base)."""
    path = save_checkpoint(hf_model(seed=3), str(tmp_path / "ckpt"))
    out = tmp_path / "ft.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "finetune", "--model", path, "--steps", "1",
                          "--rounds", "2", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(out.read_text())
    assert res["args"]["steps"] == 1 and res["args"]["rounds"] == 2
    assert set(res["results"]) == {"lora", "full"}
    with open(os.path.join(path, "config.json")) as f:
        vision = json.load(f)["vision_config"]
    tokens = 256 + (vision["image_size"] // vision["patch_size"]) ** 2  # one image + 256 text tokens
    for mode, r in res["results"].items():
        for impl in ("minterleave", "transformers"):
            x = r[impl]
            assert len(x["step_s"]) == 2 and all(positive(t) for t in x["step_s"]), (mode, impl)
            assert x["median_step_s"] == statistics.median(x["step_s"])
            assert positive(x["peak_rss_gb"]) and x["tokens"] == tokens
            assert math.isfinite(x["first_loss"]) and x["last_loss"] != x["first_loss"]  # it trained
        for k in ("median_step_s", "peak_rss_gb"):
            assert math.isclose(r["ratio"][k], r["minterleave"][k] / r["transformers"][k])
        assert r["first_loss_diff"] == abs(r["minterleave"]["first_loss"] - r["transformers"]["first_loss"])
        assert r["first_loss_diff"] <= 1e-3, (mode, r["minterleave"]["first_loss"], r["transformers"]["first_loss"])
        assert f"| {mode} | step time, median (s) | {r['minterleave']['median_step_s']:.3g} |" in run.stdout
    # the same adapter: r = 16 on the seven decoder projections, A (16, in) + B (out, 16) each, in both
    with open(os.path.join(path, "config.json")) as f:
        t = json.load(f)["text_config"]
    c = t["hidden_size"]
    kv = t["num_key_value_heads"] * c // t["num_attention_heads"]
    per_layer = 16 * ((c + c) * 2 + (c + kv) * 2 + (c + t["intermediate_size"]) * 3)  # q o, k v, gate up down
    lora = res["results"]["lora"]
    assert lora["minterleave"]["trainable_params"] == lora["transformers"]["trainable_params"] \
        == t["num_hidden_layers"] * per_layer
    assert lora["minterleave"]["trainable_params"] < res["results"]["full"]["minterleave"]["trainable_params"]


def test_bench_decode_quick_on_tiny_checkpoint(tmp_path, capsys):
    """bench.py decode: every worker's numbers, the bandwidth arithmetic and the ratios are consistent."""
    path = save_checkpoint(hf_model(seed=3, inter=128), str(tmp_path / "ckpt"))  # int4 groups need K % 32 == 0
    import bench_decode
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--model", path, "--quick", "--modes", "int4", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    r, bw = res["results"], res["bandwidth"]
    assert set(r) == {"minterleave int4", "transformers bf16"}  # (bf16 and int8 run the same code; fewer workers)
    assert bw["read_gbs"] == max(bw["sum_gbs"], bw["copy_gbs"]) and positive(bw["read_gbs"])
    bf16 = decoder_bytes_per_token(path, "bfloat16")
    assert r["transformers bf16"]["bytes_per_token"] == bf16
    assert bench_decode.decode_bytes(mi.Model.from_pretrained(path, dtype=torch.bfloat16).decoder) == bf16
    assert r["minterleave int4"]["bytes_per_token"] < 0.5 * bf16  # 4 bits + a bf16 scale and zero per 32 weights
    for name, x in r.items():
        assert all(positive(x[k]) for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_gb", "load_s")), name
        assert math.isclose(x["decode_gbs"], x["bytes_per_token"] * x["decode_tok_s"] / 1e9)
        assert math.isclose(x["bw_frac"], x["decode_gbs"] / bw["read_gbs"])
        row = next(line for line in stdout.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {x['decode_tok_s']:.1f} | {x['prefill_tok_s']:.0f} | {x['peak_rss_gb']:.2f} |" in row
    # the matrix products and the attention alone, timed after each run, are parts of a step: below its time
    mi_int4 = r["minterleave int4"]
    assert 0 < mi_int4["matrix_ms"] + mi_int4["attention_ms"] < mi_int4["step_ms"]
    assert positive(mi_int4["attention_ms"]) and "matrix_ms" not in r["transformers bf16"]
    assert math.isclose(mi_int4["step_ms"], 1000 / mi_int4["decode_tok_s"])
    row = next(line for line in stdout.splitlines() if line.startswith("| minterleave int4 |") and "- | - |" in line)
    assert row == (f"| minterleave int4 | {mi_int4['step_ms']:.1f} | {mi_int4['matrix_ms']:.1f} | "
                   f"{mi_int4['attention_ms']:.1f} | - | - |")
    tf = r["transformers bf16"]
    for mode in ("int4",):
        ratios = r[f"minterleave {mode}"]["vs_transformers_bf16"]
        for k, v in ratios.items():
            assert math.isclose(v, r[f"minterleave {mode}"][k] / tf[k]), (mode, k)
    with pytest.raises(FileNotFoundError, match=r"none.gguf: no such GGUF file \(--gguf q4_0\)"):
        bench_decode.main(["--model", path, "--gguf", f"q4_0={tmp_path / 'none.gguf'}"])


def test_the_parts_table_sets_each_mode_against_llama_cpp_at_the_same_bits():
    """bench.py decode's second table: a mode with llama.cpp at its bits gets llama.cpp's step and the ratio, one
    without gets dashes, and a run whose parts were not timed prints no table at all."""
    import bench_decode
    results = {
        "minterleave bf16": dict(step_ms=60.0, matrix_ms=48.0, attention_ms=7.0, floor_vs_llama_cpp_step=55 / 40),
        "minterleave int8": dict(step_ms=50.0, matrix_ms=38.5, attention_ms=6.5),
        "transformers bf16": dict(step_ms=120.0),
        "llama.cpp bf16": dict(step_ms=40.0),
    }
    lines = bench_decode.parts_table(results)
    assert lines[3:] == ["| minterleave bf16 | 60.0 | 48.0 | 7.0 | 40.0 | 1.38x |",
                         "| minterleave int8 | 50.0 | 38.5 | 6.5 | - | - |"]
    assert bench_decode.parts_table({"transformers bf16": dict(step_ms=120.0)}) == []
