"""Decoder weights in oneDNN's packed layout, for fast bf16 decoding on a CPU.

A decode step multiplies one activation row by every decoder matrix. In bf16, torch's default
path for such a matrix-vector product reaches about half the memory bandwidth on the CPUs we
measured; the same product with the weight reordered once into oneDNN's blocked layout
reaches about twice that, with bit-identical results (it is the same oneDNN kernel family,
fed a layout it does not have to convert). The packed weight is opaque, so this is for
inference only: `Model.prepare_for_inference()` swaps the layers, nothing else needs to know.
fp32 is left alone (there the packed kernels round differently from F.linear, which would
cost exact parity). A tied head stays unpacked: the embedding lookup needs the plain rows.
"""

import torch
import torch.nn as nn


def can_pack(weight):
    ops = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and ops is not None and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features = linear.out_features
        # reordered for a batch of 1 (decode); larger batches (prefill) run as fast as F.linear
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


@torch.no_grad()
def pack_decoder(decoder):
    """Swap the decoder's bf16 linear layers for packed ones, in place; returns how many."""
    if not can_pack(decoder.norm.weight):
        return 0
    n = 0
    for block in decoder.layers:
        for parent, name in ((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"),
                             (block.mlp, "gate_up_proj"), (block.mlp, "down_proj")):
            if isinstance(getattr(parent, name), nn.Linear):
                setattr(parent, name, PackedLinear(getattr(parent, name)))
                n += 1
    if isinstance(decoder.lm_head, nn.Linear):
        decoder.lm_head = PackedLinear(decoder.lm_head)
        n += 1
    return n
