"""FlashAttention-2 in Triton: a readable reference kernel (forward + backward).

    out = softmax(scale * q @ k^T + mask) @ v     q: (B, Hq, Tq, D), k/v: (B, Hkv, Tk, D)

Forward (Dao 2023, Alg. 1). The outer loop runs over query blocks (one program per
BLOCK_M rows of one (batch, head)); the inner loop streams BLOCK_N keys/values through
on-chip memory, so the Tq x Tk score matrix never reaches HBM. Per query row we carry
    m   the running max of the scores seen so far,
    l   the running softmax denominator sum_j exp(s_j - m),
    acc the running unnormalised output sum_j exp(s_j - m) v_j,
and for every new key block S = q k^T:
    m_new = max(m, rowmax(S));  alpha = exp(m - m_new);  P = exp(S - m_new)
    l     = alpha * l + rowsum(P);  acc = alpha * acc + P @ v;  m = m_new
and finally out = acc / l. We work in base 2 (exp2 is the native instruction), folding
the softmax scale into qk_scale = scale * log2(e). Only the log-sum-exp
lse = m + log2(l) (one fp32 per row) is saved for the backward pass.

Backward (Dao 2023, Alg. 2): recompute P from the saved lse, then dQ, dK, dV; its three kernels
are in kernels/flash_attention_bwd.py.

Conventions: grouped-query attention maps q head h to kv head h // (Hq // Hkv) (no K/V
copies). Causal masking is bottom-right aligned: query i sees keys j <= i + (Tk - Tq),
which is right for prefill after a cached prefix and for one-token decode. Key blocks
wholly above the diagonal are skipped, not just masked. Query rows that see no key
(causal with Tq > Tk) get output 0 and zero gradients. Any D <= 128 (the block is padded
to a power of two, loads/stores masked on d < D) and any lengths. Accumulation is fp32;
note that on GPU tl.dot rounds fp32 inputs to tf32. Plain pointer arithmetic (no block
pointers / TMA), so everything also runs on CPU under TRITON_INTERPRET=1, which must be
set before triton is first imported (@triton.jit picks interpreter vs compiler when a
function is decorated, and triton.language's helpers are decorated at `import triton`).

References: T. Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023 (arXiv:2307.08691); the Triton tutorial "Fused Attention"
(python/tutorials/06-fused-attention.py).
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # keep the module importable; calling the kernel raises
    triton = None

__all__ = ["flash_attention", "is_available"]


def is_available():
    """True if triton imports and kernels can run: CUDA is present or we are interpreted."""
    return triton is not None and not _MIXED and (torch.cuda.is_available() or INTERPRET)


if triton is None:
    INTERPRET = _MIXED = False
else:
    @triton.jit
    def _fwd_step(q, K, V, acc, l_i, m_i, start_n, offs_m, offs_n, offs_d, d_ok, skt, skd, svt, svd,
                  Tk, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        # one key block of the online softmax. Only MASKED blocks (those that straddle the
        # causal diagonal or the end of the keys) pay for the masking arithmetic.
        cols = start_n + offs_n
        kv_mask = d_ok
        if MASKED:
            kv_mask = kv_mask & (cols[:, None] < Tk)
        k = tl.load(K + cols[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # scores in log2 units, (BLOCK_M, BLOCK_N)
        if MASKED:  # out-of-range and future keys get -inf
            keep = cols[None, :] < Tk
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # new running max
        m_use = m_new
        if MASKED:
            # a row with no visible key so far keeps m = -inf: use a finite stand-in to
            # avoid (-inf) - (-inf) = NaN (its p and alpha are then 0)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)      # rescales the old l and acc to the new max
        p = tl.math.exp2(s - m_use[:, None])   # unnormalised probabilities of this block
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                  sob, soh, sot, sod, Hq, GROUP, Tq, Tk, D, qk_scale,
                  CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // Hq, pid_bh % Hq
        kvh = h // GROUP  # GQA: this query head reads kv head h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        Q += b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        K += b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        V += b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
        d_ok = offs_d[None, :] < D
        q = tl.load(Q + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=(offs_m[:, None] < Tq) & d_ok, other=0.0)
        # running statistics of the online softmax (base 2), one per query row
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
        l_i = tl.zeros([BLOCK_M], tl.float32)                # running denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)       # running numerator @ V
        diag = Tk - Tq  # bottom-right causal: row i sees keys j <= i + diag
        # keys [0, full) are visible to every row of this block: no masks. Keys [full, hi)
        # need them; beyond hi every key is in the future of every row: skipped.
        full = Tk // BLOCK_N * BLOCK_N
        hi = Tk
        if CAUSAL:
            full = tl.minimum(full, tl.maximum(0, pid_m * BLOCK_M + diag + 1) // BLOCK_N * BLOCK_N)
            hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + diag)
        for start_n in range(0, full, BLOCK_N):
            acc, l_i, m_i = _fwd_step(q, K, V, acc, l_i, m_i, start_n, offs_m, offs_n, offs_d, d_ok,
                                      skt, skd, svt, svd, Tk, diag, qk_scale, False, CAUSAL)
        for start_n in range(full, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_step(q, K, V, acc, l_i, m_i, start_n, offs_m, offs_n, offs_d, d_ok,
                                      skt, skd, svt, svd, Tk, diag, qk_scale, True, CAUSAL)
        # normalise; rows that saw no key: l = 0 -> output 0 and lse = +inf (so P = 0 later)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        acc = acc / l_safe[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
        tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=offs_m < Tq)
        O += b.to(tl.int64) * sob + h.to(tl.int64) * soh
        tl.store(O + offs_m[:, None] * sot + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < Tq) & d_ok)

    from .flash_attention_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess

    # @triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 at decoration time.
    # triton.language's own helpers (tl.zeros, tl.sum, tl.max) are decorated when triton is
    # imported, so the variable must be set before the first `import triton` anywhere.
    INTERPRET = not isinstance(_attn_fwd, triton.runtime.JITFunction)
    _MIXED = INTERPRET and isinstance(tl.zeros, triton.runtime.JITFunction)


# Launch settings per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages), by padded head dim,
# for fp16/bf16, measured on an H200 with `python -m minterleave.kernels.tune_attention` (README, "The Triton
# kernel"). fp32 tiles take twice the shared memory: at head dim 128 the tuned ones would need
# 458 KB (the H200 has 227 KB per block), so fp32 gets smaller ones there (they fit; not tuned).
CONFIGS = {
    64: {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3)},
    128: {"fwd": (128, 128, 8, 3), "dkdv": (64, 64, 4, 2), "dq": (128, 32, 4, 3)},
}
CONFIGS_FP32 = {128: {"fwd": (64, 64, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}}
INTERPRET_CONFIG = (16, 16, 1, 1)  # numpy on CPU: small tiles keep each program (and the tests) quick


def _config(kernel, block_d, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel 'fwd', 'dkdv' or 'dq'."""
    if INTERPRET and INTERPRET_CONFIG:  # (tune_attention.py --interpret clears it to try CONFIGS)
        return INTERPRET_CONFIG
    block_d = max(64, block_d)
    if dtype == torch.float32 and block_d in CONFIGS_FP32:
        return CONFIGS_FP32[block_d][kernel]
    return CONFIGS[block_d][kernel]


def _strides(x):
    return (x.stride(0), x.stride(1), x.stride(2), x.stride(3))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        BLOCK_D = max(16, triton.next_power_of_2(D))
        BM, BN, warps, stages = _config("fwd", BLOCK_D, q.dtype)
        o = torch.empty(B, Hq, Tq, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(Tq, BM), B * Hq)
        _attn_fwd[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                        Hq, Hq // Hkv, Tq, Tk, D, scale * math.log2(math.e), CAUSAL=causal,
                        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BLOCK_D, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        BLOCK_D = max(16, triton.next_power_of_2(D))
        BM1, BN1, warps1, stages1 = _config("dkdv", BLOCK_D, q.dtype)
        BM2, BN2, warps2, stages2 = _config("dq", BLOCK_D, q.dtype)
        qk_scale = ctx.scale * math.log2(math.e)
        delta = torch.empty_like(lse)
        _attn_bwd_preprocess[(triton.cdiv(Tq, 64), B * Hq)](
            o, do, delta, *_strides(o), *_strides(do), Hq, Tq, D, BLOCK_M=64, BLOCK_D=BLOCK_D)
        dq = torch.empty(B, Hq, Tq, D, device=q.device, dtype=q.dtype)
        dk = torch.empty(B, Hkv, Tk, D, device=k.device, dtype=k.dtype)
        dv = torch.empty(B, Hkv, Tk, D, device=v.device, dtype=v.dtype)
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
        _attn_bwd_dkdv[(triton.cdiv(Tk, BN1), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, *common, Hq, Hkv, Hq // Hkv, Tq, Tk, D, ctx.scale,
            qk_scale, CAUSAL=ctx.causal, BLOCK_M=BM1, BLOCK_N=BN1, BLOCK_D=BLOCK_D,
            num_warps=warps1, num_stages=stages1)
        _attn_bwd_dq[(triton.cdiv(Tq, BM2), B * Hq)](
            q, k, v, do, lse, delta, dq, *common, Hq, Hq // Hkv, Tq, Tk, D, ctx.scale, qk_scale,
            CAUSAL=ctx.causal, BLOCK_M=BM2, BLOCK_N=BN2, BLOCK_D=BLOCK_D,
            num_warps=warps2, num_stages=stages2)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=False, scale=None):
    """softmax(scale * q k^T [+ bottom-right causal mask]) v with GQA.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D), Hq % Hkv == 0, D <= 128; any strides.
    Returns (B, Hq, Tq, D) in q's dtype; differentiable w.r.t. q, k, v.
    """
    if triton is None:
        raise RuntimeError("flash_attention needs triton (pip install triton; Linux only)")
    if _MIXED:
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton had been imported; "
                           "set it before the first `import triton` (e.g. in conftest.py)")
    if not INTERPRET and q.device.type != "cuda":
        raise RuntimeError("flash_attention: tensors must be on CUDA, or set TRITON_INTERPRET=1 "
                           "before triton is first imported to run on CPU")
    B, Hq, Tq, D = q.shape
    assert k.dim() == 4 and k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, (q.shape, k.shape, v.shape)
    assert Hq % k.shape[1] == 0, f"Hq={Hq} must be a multiple of Hkv={k.shape[1]}"
    assert D <= 128, f"head dim {D} > 128 is not supported"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if INTERPRET and q.dtype == torch.bfloat16:
        # the interpreter stores bf16 as uint16 and does not support bf16 arithmetic
        # (tl.dot multiplies the bit patterns, triton-lang/triton#11584): run in fp32
        return _FlashAttention.apply(q.float(), k.float(), v.float(), bool(causal), scale).to(q.dtype)
    return _FlashAttention.apply(q, k, v, bool(causal), scale)
