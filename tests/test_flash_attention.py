"""kernels/flash_attention.py against a naive reference (CPU: Triton interpreter, fp32)
and against torch SDPA at the model's real shapes (GPU, marked `gpu`).

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported in the
process. If another module imported triton earlier (or CUDA is present, where the kernels
are compiled for the GPU), the CPU checks re-run this file in a fresh subprocess.
"""
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must come before the first `import triton`

import pytest

pytest.importorskip("triton")
import minterleave.kernels.flash_attention as fa  # noqa: E402

IN_PROCESS = fa.INTERPRET and not fa._MIXED  # the CPU checks can run in this process
cpu_only = pytest.mark.skipif(not IN_PROCESS, reason="interpreter unavailable in-process; "
                              "covered by test_interpreter_subprocess")


def reference(q, k, v, causal, scale=None):
    """Naive attention in fp32: GQA by repeat_interleave, bottom-right causal mask,
    rows that see no key output 0."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    Tq, Tk = q.shape[2], k.shape[2]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(Tk - Tq)  # query i sees keys j <= i + (Tk - Tq)
    any_visible = visible.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~(visible | ~any_visible), float("-inf")), -1)
    return (p * any_visible) @ v


def make(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(device, dtype).requires_grad_()
               for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    do = torch.randn(B, Hq, Tq, D, generator=g).to(device, dtype)
    return q, k, v, do


def check(q, k, v, do, causal, scale=None, atol=1e-4):
    out = fa.flash_attention(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = reference(q, k, v, causal, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.float())
    errs = [(a.float() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
    assert all(e <= atol for e in errs), f"max abs err out/dq/dk/dv = {errs}"
    return errs


# (B, Hq, Hkv, Tq, Tk, D, causal); interpreter tiles are 16 x 16, so 37/50 leave ragged blocks
CASES = [
    (2, 4, 2, 37, 37, 64, True),    # decoder-like: GQA, causal, B > 1
    (2, 4, 2, 37, 37, 64, False),
    (1, 4, 1, 50, 50, 72, True),    # SigLIP head dim (72 -> 128-wide padded tile), MQA
    (1, 2, 2, 50, 50, 72, False),   # ViT-like: plain MHA, non-causal
    (2, 4, 2, 20, 50, 40, True),    # prefill after a cached 30-token prefix
    (1, 4, 4, 20, 50, 24, False),   # Tq < Tk, odd head dim
    (2, 4, 1, 1, 37, 64, True),     # single-token decode
    (1, 2, 1, 1, 50, 72, False),
    (1, 4, 2, 50, 20, 40, True),    # Tq > Tk causal: first 30 rows see no key -> output 0
    (1, 2, 2, 32, 32, 128, True),   # 7B head dim, lengths a multiple of the tile
    (1, 2, 1, 100, 130, 64, True),  # many tiles: key blocks above the diagonal are skipped
    (3, 2, 2, 65, 65, 8, False),    # tiny head dim (tile padded to 16), B = 3
]


@cpu_only
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", CASES)
def test_matches_reference(B, Hq, Hkv, Tq, Tk, D, causal):
    check(*make(B, Hq, Hkv, Tq, Tk, D), causal)


@cpu_only
def test_strided_inputs_and_scale():
    # (B, T, H, D) projections viewed as (B, H, T, D): non-contiguous, strides passed through
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, 4, 40, generator=g).transpose(1, 2).requires_grad_()
    kv = torch.randn(2, 45, 2, 2, 40, generator=g)
    k, v = kv[:, :, 0].transpose(1, 2).requires_grad_(), kv[:, :, 1].transpose(1, 2).requires_grad_()
    do = torch.randn(2, 37, 4, 40, generator=g).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    check(q, k, v, do, causal=True, scale=0.3)


@cpu_only
@pytest.mark.parametrize("tiles", [(32, 16, 1, 1), (16, 32, 1, 1)])
def test_unequal_tiles(monkeypatch, tiles):
    # GPU settings have BLOCK_M != BLOCK_N: the split into masked and unmasked blocks must hold
    monkeypatch.setattr(fa, "INTERPRET_CONFIG", tiles)
    for case in [(1, 4, 2, 70, 70, 24, True), (1, 2, 1, 33, 97, 40, True), (1, 2, 2, 70, 40, 24, True),
                 (1, 2, 2, 45, 45, 24, False)]:
        check(*make(*case[:6]), causal=case[6])


@cpu_only
def test_half_precision_interpreter():
    # fp16 runs in the kernel; bf16 is upcast to fp32 under the interpreter (no bf16 there)
    for dtype in (torch.float16, torch.bfloat16):
        check(*make(1, 2, 1, 37, 37, 64, dtype=dtype), causal=True, atol=2e-2)


def test_interpreter_subprocess():
    """Run the CPU checks in a fresh process where TRITON_INTERPRET=1 precedes `import triton`."""
    if IN_PROCESS:
        pytest.skip("CPU checks already ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-m", "not gpu and not slow", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


# ---------------------------------------------------------------- GPU: real model shapes
GPU_SHAPES = [  # (B, Hq, Hkv, Tq, Tk, D, causal)
    (2, 16, 16, 729, 729, 72, False),   # SigLIP vision tower (B images x 16 heads)
    (1, 16, 16, 2048, 2048, 64, True),  # 0.5B decoder prefill
    (1, 32, 32, 2048, 2048, 128, True),  # 7B decoder prefill
    (1, 14, 2, 300, 2348, 64, True),    # GQA prefill after a 2048-token cache
    (4, 14, 2, 1, 777, 64, True),       # GQA decode
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", GPU_SHAPES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa.INTERPRET, reason="needs CUDA")
def test_gpu_vs_sdpa(B, Hq, Hkv, Tq, Tk, D, causal, dtype):
    q, k, v, do = make(B, Hq, Hkv, Tq, Tk, D, dtype=dtype, device="cuda")
    out = fa.flash_attention(q, k, v, causal=causal)
    ours = (out, *torch.autograd.grad(out, (q, k, v), do))
    # reference: SDPA in fp32; baseline: SDPA in the same low precision. As in the
    # FlashAttention repo's tests, our error must be within 2x the baseline's (+ slack).
    # SDPA's is_causal is top-left aligned, so pass the bottom-right mask explicitly.
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device="cuda").tril(Tk - Tq) if causal else None

    def sdpa(dt):
        q2, k2, v2 = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
        g = Hq // Hkv
        o = torch.nn.functional.scaled_dot_product_attention(
            q2, k2.repeat_interleave(g, 1), v2.repeat_interleave(g, 1), attn_mask=mask)
        return (o, *torch.autograd.grad(o, (q2, k2, v2), do.to(dt)))

    ref, base = sdpa(torch.float32), sdpa(dtype)
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, base):
        err = (a.float() - r).abs().max().item()
        base_err = (b.float() - r).abs().max().item()
        assert err <= 2 * base_err + 1e-3, f"{name}: max abs err {err}, SDPA {dtype} {base_err}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa.INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,causal", [(2, 4, 4, 300, 300, 72, False), (1, 4, 2, 200, 260, 128, True)])
def test_gpu_fp32(B, Hq, Hkv, Tq, Tk, D, causal):
    """fp32 inputs use their own (smaller) tiles: they must fit in shared memory and be right."""
    check(*make(B, Hq, Hkv, Tq, Tk, D, device="cuda"), causal=causal, atol=2e-2)  # tl.dot: tf32
