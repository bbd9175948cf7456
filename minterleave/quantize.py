"""Int8 weight-only quantisation of the decoder (gpt-fast style), for faster CPU decoding.

Decoding one token reads every decoder weight once, so its speed is set by memory bandwidth:
storing weights as int8 (one byte) with one scale per output row halves the bytes of bf16.
Activations stay in the model's dtype; torch's `_weight_int8pack_mm` multiplies bf16/fp32
activations by int8 weights without materialising a dequantised copy. The vision tower and the
projector (run once per image) and the norms stay as they are.
Per-row symmetric scheme: w ≈ q * s, s = max|w_row| / 127, q = round(w / s) in [-127, 127].
Reference: gpt-fast (pytorch-labs), quantize.py "int8 weight-only".

Training on a frozen int8 base (LoRA, QLoRA-style): the kernel has no derivative, so Int8Linear runs it
inside a small autograd Function whose backward gives the input gradient dy @ (q * s), dequantised on the
fly in dy's dtype a block of input columns at a time; the int8 weights and scales get no gradient.

`quantize(model, "int8" | "int4", group_size)` swaps the decoder's matrices in place (int4: int4.py, groups
of 32/64/128 input columns, the embedding lookup kept in int8 rows); qcheckpoint.py quantizes while
loading (no float copy of the decoder resident) and saves/loads quantized checkpoints.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def quantize_rows(w, rows=4096):
    """w (out, in) float -> (q int8 (out, in), scales float (out,)). `rows` rows at a time: the fp32
    temporaries of a whole 152k-row embedding would be 1.2 GB, more than the int8 model."""
    q, scales = torch.empty(w.shape, dtype=torch.int8, device=w.device), torch.empty(w.shape[0], device=w.device)
    for a in range(0, w.shape[0], rows):
        wf = w[a:a + rows].float()
        s = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[a:a + rows] = (wf / s[:, None]).round_().clamp_(-127, 127)
        scales[a:a + rows] = s
    return q, scales


class Int8MatMul(torch.autograd.Function):
    """y = x (q * s)^T by `_weight_int8pack_mm` (x 2-D); backward: dx = dy (q * s), no gradient for q, s.

    dx is computed a block of its columns (W's input features) at a time, so no more than about
    BLOCK elements of W are dequantised at once (the untied head of a 0.5B model is 136M); each block
    is a whole reduction over the outputs, so the blocks change nothing but the peak memory."""

    BLOCK = 1 << 24

    @staticmethod
    def forward(x, q, scales):
        return torch._weight_int8pack_mm(x, q, scales)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        q, scales = ctx.saved_tensors
        s = scales.to(dy.dtype)[:, None]
        step = max(1, Int8MatMul.BLOCK // q.shape[0])
        if step >= q.shape[1]:
            return dy @ (q.to(dy.dtype) * s), None, None
        dx = dy.new_empty(dy.shape[0], q.shape[1])
        for i in range(0, q.shape[1], step):
            dx[:, i:i + step] = dy @ (q[:, i:i + step].to(dy.dtype) * s)
        return dx, None, None


PREFILL_ROWS = 32  # from this many input rows on (no gradient wanted), a matmul dequantises its weights first
DEQUANT_MAX = 1 << 25  # ...if they are at most this many int8 values (every decoder matrix; not a 152k-row head)


class Int8Linear(nn.Module):
    def __init__(self, q, scales, bias, dtype):
        super().__init__()
        self.register_buffer("weight", q)                     # (out, in) int8
        self.register_buffer("scales", scales.to(dtype))      # (out,)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        q, s = quantize_rows(linear.weight.detach())
        return cls(q, s, linear.bias, linear.weight.dtype)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] >= PREFILL_ROWS and self.weight.numel() <= DEQUANT_MAX and not torch.is_grad_enabled():
            # a prompt, not training: the kernel is built for a few rows (~4x slower than F.linear at 758 rows);
            # dequantise this one matrix for one call (a temporary of out x in values, never the head's)
            y = F.linear(x2, self.weight.to(x2.dtype) * self.scales[:, None])
        else:  # decoding needs no gradient: call the kernel itself (no autograd Function on the decode step)
            y = Int8MatMul.apply(x2, self.weight, self.scales) if x.requires_grad else \
                torch._weight_int8pack_mm(x2, self.weight, self.scales)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Rows looked up in int8 and scaled back; shares its int8 table with a tied output head."""

    def __init__(self, q, scales, dtype):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight).to(self.scales.dtype) * self.scales[ids, None]


SCHEMES = ("int8", "int4")


def check_scheme(scheme, group_size=None):
    """The group size to use: int8 is per row (no groups: PyTorch's int8 CPU kernel takes one scale per
    output row), int4 per group of 32 by default (llama.cpp's q4_0 block)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {SCHEMES}")
    if scheme == "int8":
        if group_size not in (None, 0):
            raise ValueError(f"int8 is per output row (torch._weight_int8pack_mm has no group scales); "
                             f"got group size {group_size}")
        return None
    from .int4 import GROUP_SIZES
    group_size = group_size or 32
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
    return group_size


def quantized_linear(weight, bias, scheme, group_size, dtype):
    """An Int8Linear or Int4Linear computing weight (out, in) in `dtype`."""
    if scheme == "int8":
        q, s = quantize_rows(weight)
        return Int8Linear(q, s, bias, dtype)
    from .int4 import Int4Linear
    return Int4Linear.from_weight(weight, group_size, bias, dtype)


def targets(decoder):
    """(module holding it, attribute, parameter name under `decoder.`) of every decoder matrix that a
    decode step reads: the four per layer; the embedding (and untied head) are handled apart."""
    out = []
    for i, block in enumerate(decoder.layers):
        for part, attr in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                           ("mlp", "down_proj")):
            out.append((getattr(block, part), attr, f"layers.{i}.{part}.{attr}"))
    return out


@torch.no_grad()
def install_embedding(decoder, emb_weight, head_weight, scheme, group_size, dtype):
    """Embedding (int8 rows) and output head from float matrices; head_weight None = tied. A tied int8
    head shares the embedding's int8 table; a tied int4 head is its own packed copy (a quarter of bf16)."""
    q, s = quantize_rows(emb_weight)
    decoder.embed_tokens = Int8Embedding(q, s, dtype)
    if head_weight is None and scheme == "int8":
        decoder.lm_head = Int8Linear(q, s, None, dtype)
    else:
        decoder.lm_head = quantized_linear(emb_weight if head_weight is None else head_weight, None, scheme,
                                           group_size, dtype)


@torch.no_grad()
def quantize(model, scheme="int8", group_size=None):
    """Replace the decoder's linear layers, embedding and head by weight-only quantized ones, in place;
    each float matrix is freed as soon as its replacement exists. Returns the model."""
    group_size = check_scheme(scheme, group_size)
    dec = model.decoder
    dtype = dec.norm.weight.dtype
    for parent, attr, _ in targets(dec):
        lin = getattr(parent, attr)
        setattr(parent, attr, quantized_linear(lin.weight, lin.bias, scheme, group_size, dtype))
        del lin
    head = None if dec.lm_head is None else dec.lm_head.weight
    install_embedding(dec, dec.embed_tokens.weight, head, scheme, group_size, dtype)
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def quantize_int8(model):
    """Int8 weight-only decoder (per-row scales), in place: `quantize(model, "int8")`."""
    return quantize(model, "int8")
