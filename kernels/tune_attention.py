"""Choose the Triton kernel's launch settings on a GPU (fills flash_attention.CONFIGS).

    python -m minterleave.kernels.tune_attention [--dtype bfloat16] [--budget-s 300] [--json tune.json]
    python -m minterleave.kernels.tune_attention --interpret   # CPU smoke run: tiny shape, two candidates each

For each of the benchmark's shapes (kernels/bench_attention.py) and each kernel, every candidate
(BLOCK_M, BLOCK_N, num_warps, num_stages) is timed (median of CUDA-event timings):
- fwd: flash_attention under no_grad;
- dkdv, dq: forward + backward with the other backward kernel at its current setting; the
  forward is the same for all candidates, so the differences are this kernel's.
Every candidate's results are compared with those of the current setting (a wrong one is shown
as such, never chosen). Candidates that do not fit in shared memory are skipped. The suggested
setting per padded head dim minimises the sum over its shapes of time / best time for the shape.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    "fwd": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))),
    "dkdv": list(itertools.product((32, 64), (64, 128), (4, 8), (2, 3))),
    "dq": list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3))),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                   help="q, k, v dtype (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=300,
                   help="stop starting new kernels' sweeps after this many seconds (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per candidate, median used (default: %(default)s)")
    p.add_argument("--json", help="write every timing to this file (default: print only)")
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: run the sweep's logic on CPU under TRITON_INTERPRET=1 (timings meaningless)")
    args = p.parse_args(argv)
    from .bench_attention import SHAPES, TINY, _timer
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first `import triton`
        device, dtype, shapes, n_cand = "cpu", torch.float32, TINY, 2
    elif torch.cuda.is_available():
        device, dtype, shapes, n_cand = "cuda", getattr(torch, args.dtype), SHAPES, None
    else:
        print("tune_attention: CUDA is not available (use --interpret for a CPU smoke run)")
        return 1
    import triton
    from . import flash_attention as fa
    if args.interpret and not fa.INTERPRET:
        print("--interpret: triton was already imported without TRITON_INTERPRET=1")
        return 1
    if fa.INTERPRET:  # the interpreter uses its own small tiles; clear them so CONFIGS is used
        fa.INTERPRET_CONFIG = None

    t0, results = time.time(), []
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU interpreter"
    print(f"{name}, {str(dtype)[6:]}; current CONFIGS: {fa.CONFIGS}", flush=True)
    for kernel in ("fwd", "dkdv", "dq"):
        if time.time() - t0 > args.budget_s:
            print(f"budget spent: {kernel} not tuned", flush=True)
            break
        for name, B, H, T, D, causal in shapes:
            block_d = max(64, triton.next_power_of_2(D))
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                if kernel == "fwd":
                    with torch.no_grad():
                        return (fa.flash_attention(q, k, v, causal=causal),)
                return torch.autograd.grad(fa.flash_attention(q, k, v, causal=causal), (q, k, v), do)

            current = fa.CONFIGS[block_d][kernel]
            ref = [t.float() for t in step()]
            cands = [current] + [c for c in CANDIDATES[kernel][:n_cand] if c != current]
            for cand in cands:
                fa.CONFIGS[block_d][kernel] = cand
                try:
                    out = step()
                    err = max((a.float() - r).abs().max().item() / (r.abs().max().item() + 1e-6)
                              for a, r in zip(out, ref))
                    ms = _timer(step, args.repeats, 3, device)
                except Exception as e:  # mostly out of shared memory
                    err, ms = None, None
                    print(f"  {kernel} {name} {cand}: skipped ({type(e).__name__})", flush=True)
                finally:
                    fa.CONFIGS[block_d][kernel] = current
                if ms is not None:
                    ok = err < 2e-2
                    results.append(dict(kernel=kernel, shape=name, block_d=block_d, config=list(cand),
                                        ms=ms, rel_err=err, ok=ok))
                    print(f"  {kernel} {name} {cand}: {ms:.3f} ms{'' if ok else f'  WRONG (rel err {err:.1e})'}",
                          flush=True)
            mine = [r for r in results if r["kernel"] == kernel and r["shape"] == name and r["ok"]]
            best = min(mine, key=lambda r: r["ms"])
            cur = next((r for r in mine if tuple(r["config"]) == tuple(current)), None)
            print(f"{kernel} {name}: best {tuple(best['config'])} {best['ms']:.3f} ms; current {current} "
                  f"{cur['ms'] if cur else float('nan'):.3f} ms  [{time.time() - t0:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    # suggestion per (padded head dim, kernel): lowest sum over shapes of ms / best ms of that shape
    print("\nsuggested CONFIGS (sum over shapes of time / best time):")
    for (block_d, kernel) in sorted({(r["block_d"], r["kernel"]) for r in results}):
        rows = [r for r in results if r["block_d"] == block_d and r["kernel"] == kernel and r["ok"]]
        shapes = {r["shape"] for r in rows}
        best = {s: min(r["ms"] for r in rows if r["shape"] == s) for s in shapes}
        score = {}
        for cand in {tuple(r["config"]) for r in rows}:
            mine = [r for r in rows if tuple(r["config"]) == cand]
            if len(mine) == len(shapes):
                score[cand] = sum(r["ms"] / best[r["shape"]] for r in mine)
        if score:
            cand = min(score, key=score.get)
            print(f"  {block_d} {kernel}: {cand}  score {score[cand]:.3f} (1.0 per shape is the best)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
