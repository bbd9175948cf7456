"""Benchmark kernels/flash_attention.py against torch's scaled_dot_product_attention.

    python -m minterleave.kernels.bench_attention              # CUDA, bf16, the model's shapes
    python -m minterleave.kernels.bench_attention --interpret  # CPU smoke run of one tiny shape

FLOP convention (as in the FlashAttention papers): forward = 4 * B * H * Tq * Tk * D
(two matmuls, 2 flops per multiply-add), halved when causal; backward = 2.5x forward
(five matmuls instead of two), so forward+backward = 3.5x forward. Times are medians of
CUDA-event timings; "speedup" is SDPA time / our time (> 1 means we are faster).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# (name, B, H, T, D, causal): SigLIP tower over 8 images; decoder prefill of 6144 tokens
SHAPES = [
    ("vit (8 images)", 8, 16, 729, 72, False),
    ("0.5B prefill", 1, 16, 6144, 64, True),
    ("7B prefill", 1, 32, 6144, 128, True),
]
TINY = [("tiny (interpreter)", 1, 2, 48, 40, True)]


def _timer(fn, repeats, warmup, device):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(device="cuda", dtype=torch.bfloat16, repeats=20, warmup=5, shapes=None):
    """Time fwd and fwd+bwd of flash_attention and SDPA; returns one dict per (shape, pass)."""
    from .flash_attention import flash_attention

    shapes = SHAPES if shapes is None else shapes
    rows = []
    for name, B, H, T, D, causal in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
                       for _ in range(4))
        for x in (q, k, v):
            x.requires_grad_()
        ours = lambda: flash_attention(q, k, v, causal=causal)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        with torch.no_grad():
            max_diff = (ours().float() - sdpa().float()).abs().max().item()
        fwd_flops = 4 * B * H * T * T * D / (2 if causal else 1)
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            def step(f):
                if mode == "fwd":
                    with torch.no_grad():
                        return f()
                return torch.autograd.grad(f(), (q, k, v), do)
            ms = _timer(lambda: step(ours), repeats, warmup, device)
            ms_sdpa = _timer(lambda: step(sdpa), repeats, warmup, device)
            flops = fwd_flops * mult
            rows.append(dict(shape=name, B=B, H=H, T=T, D=D, causal=causal, mode=mode,
                             dtype=str(dtype).replace("torch.", ""), ms=ms, sdpa_ms=ms_sdpa,
                             tflops=flops / ms / 1e9, sdpa_tflops=flops / ms_sdpa / 1e9,
                             speedup=ms_sdpa / ms, max_abs_diff_fwd=max_diff))
    return rows


def to_markdown(rows):
    lines = ["| shape | B x H x T x D | causal | pass | ours ms | SDPA ms | ours TFLOP/s "
             "| SDPA TFLOP/s | speedup | max abs diff |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['B']}x{r['H']}x{r['T']}x{r['D']} | {r['causal']} "
                     f"| {r['mode']} | {r['ms']:.3f} | {r['sdpa_ms']:.3f} | {r['tflops']:.1f} "
                     f"| {r['sdpa_tflops']:.1f} | {r['speedup']:.2f} | {r['max_abs_diff_fwd']:.2e} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="q, k, v dtype (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per case, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before them (default: %(default)s)")
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: run one tiny shape on CPU under TRITON_INTERPRET=1 (smoke test)")
    args = p.parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret: triton was already imported without TRITON_INTERPRET=1; "
                  "run `TRITON_INTERPRET=1 python -m minterleave.kernels.bench_attention --interpret`")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`
        rows = run("cpu", torch.float32, repeats=1, warmup=0, shapes=TINY)
        print("CPU interpreter smoke run: timings are meaningless, only checks that it runs.")
    elif not torch.cuda.is_available():
        print("bench_attention: CUDA is not available, nothing to benchmark "
              "(use --interpret for a CPU smoke run of the kernel).")
        return 0
    else:
        from .flash_attention import is_available
        if not is_available():
            print("bench_attention: triton is not installed or misconfigured (TRITON_INTERPRET?)")
            return 1
        print(f"{torch.cuda.get_device_name()}, {args.dtype}, median of {args.repeats}; "
              "fwd+bwd flops = 3.5x fwd, causal flops halved; speedup = SDPA ms / ours ms")
        rows = run("cuda", getattr(torch, args.dtype), args.repeats, args.warmup)
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
