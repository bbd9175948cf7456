"""Scaled dot-product attention with interchangeable backends.

One function, `attend`, serves the SigLIP tower (bidirectional) and the Qwen2 decoder (causal,
grouped-query, possibly with a KV cache so that q_len < kv_len). Backends:
- "naive":  the math written out (scores, mask, softmax in fp32, weighted sum): the reference;
- "sdpa":   torch.nn.functional.scaled_dot_product_attention (fused kernels on CPU and GPU);
- "triton": the hand-written FlashAttention-2 kernel in kernels/flash_attention.py (installed as minterleave.kernels).
The default (no backend chosen) is triton on CUDA and sdpa elsewhere, except that CPU decode
steps (one query) use `single_query_attention`, which is faster there.
`set_backend` switches all of them at once; tests use it to compare backends on the same inputs.
Causal masks are bottom-right aligned: query i (of Tq) sees keys j <= i + Tk - Tq, which is what
a query block appended after a cached prefix needs.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

BACKENDS = ("naive", "sdpa", "triton")
_backend = None  # None: the default for the device of the inputs


def set_backend(name):
    """Choose the attention backend for every module (None = default: triton on CUDA, else sdpa)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


@contextlib.contextmanager
def use_backend(name):
    """`with use_backend("naive"): ...` runs the block with that backend, then restores the old one."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _triton_usable(q):
    try:
        from .kernels import flash_attention
    except ImportError:
        return False
    return flash_attention.is_available() and (q.is_cuda or q.device.type == "cpu")


def causal_mask(tq, tk, device):
    """(Tq, Tk) bool, True where query i may see key j: j <= i + (Tk - Tq)."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def naive_attention(q, k, v, causal=False, mask=None, scale=None):
    """The reference. q (B, H, Tq, D), k/v (B, Hkv, Tk, D); mask bool broadcastable to (B, H, Tq, Tk)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    if group > 1:  # grouped-query attention: each kv head serves `group` query heads
        k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (B, H, Tq, D)


def single_query_attention(q, k, v, mask=None, scale=None):
    """A decode step (Tq = 1) as two small fp32 matmuls. On a CPU this is several times faster
    than the fused sdpa kernels, which are built for long query blocks (1.6 ms -> 0.3 ms per
    layer at 800 cached keys, bf16, one thread)."""
    B, H, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    # 3-D views and bmm (what matmul would fold them to, without its expands and views: a decode step
    # is ~70 small ops per layer, so each one saved counts); keys and values in fp32, as the scores
    qg = q.reshape(B * Hkv, H // Hkv, D).float()  # (B Hkv, G, D): the query heads sharing a kv head, as rows
    kf, vf = k.reshape(B * Hkv, Tk, D).float(), v.reshape(B * Hkv, Tk, D).float()
    scores = torch.bmm(qg, kf.transpose(1, 2)).mul_(scale)  # (B Hkv, G, Tk)
    if mask is not None:
        scores.view(B, Hkv, -1, Tk).masked_fill_(~mask.reshape(B, 1, 1, Tk), float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), vf)  # (B Hkv, G, D)
    return out.view(B, H, 1, D).to(q.dtype)


def attend(q, k, v, causal=False, mask=None, scale=None):
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D); returns (B, H, Tq, D).

    mask: optional bool tensor broadcastable to (B, 1, Tq, Tk), True = may attend (padding).
    """
    if causal and q.shape[2] == 1:
        causal = False  # a single query is the newest token: it sees every key (decode steps)
    backend = _backend
    if backend is None:
        if q.shape[2] == 1 and not q.is_cuda:
            return single_query_attention(q, k, v, mask, scale)
        backend = "triton" if q.is_cuda and _triton_usable(q) else "sdpa"
    if backend == "naive":
        return naive_attention(q, k, v, causal, mask, scale)
    if backend == "triton" and mask is None:  # the kernel knows causal masks, not padding masks
        from .kernels.flash_attention import flash_attention
        return flash_attention(q, k, v, causal=causal, scale=scale)
    if mask is not None and causal:
        mask = mask & causal_mask(q.shape[2], k.shape[2], q.device)
    elif causal and q.shape[2] != k.shape[2]:
        # sdpa's is_causal is top-left aligned; build the bottom-right mask ourselves
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])
