"""Int4 weight-only linear layers with per-group scales, through PyTorch's own CPU kernel.

A decode step reads every decoder weight once, so 4 bits a weight reads a quarter of bf16's bytes.
Scheme (gpt-fast's / torchao's "int4 weight-only", the layout `torch._weight_int4pack_mm_for_cpu` reads):
each row is cut into groups of `group_size` (32, 64 or 128) input columns; a group with minimum lo and
maximum hi gets s = (hi - lo) / 15 and z = lo + 8 s, and each weight q = round((w - z) / s + 8) in [0, 15],
so that w ~ (q - 8) s + z. s and z are held in the activation dtype; q is rounded against the values
of s and z the kernel will see (after that cast), so the only error is the rounding of q.
Storage: `_convert_weight_to_int4pack_for_cpu` reorders (N, K) nibbles into blocks the kernel walks
(on this build [N/64, K, 32], the low nibble row j and the high nibble row j + 32 of each block of 64
rows). That layout belongs to the build, so checkpoints hold the plain form instead, two columns a
byte (low nibble = even column), and loading converts it (`to_plain` checks the layout it inverts).
The kernel wants N a multiple of 16: rows are padded to a multiple of 64 and the output sliced back.
Reference: gpt-fast (pytorch-labs) quantize.py, WeightOnlyInt4Linear; aten/src/ATen/native/cpu/int4mm_kernel.cpp.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128)
PREFILL_ROWS = 32  # from this many input rows on, a matmul dequantises its weights and runs as a float one
DEQUANT_MAX = 1 << 24  # ...if they are at most this many bytes packed (every decoder matrix; not a 152k-row head)
ROWS = 4096  # rows quantized/packed at a time: fp32 and int32 temporaries stay ~15 MB even for a 151k-row head
BLOCK = 64  # the kernel's block of rows; a multiple of it packs the same whether packed alone or in the whole


def check_group_size(group_size, in_features, what="weight"):
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} is not supported; use one of {GROUP_SIZES}")
    if in_features % group_size:
        raise ValueError(f"{what}: {in_features} input features are not a multiple of the int4 group size {group_size}")


def quantize_groups(w, group_size, dtype):
    """w (n, K) float -> q (n, K) int32 in [0, 15], scales and zeros (n, K / group_size) in `dtype`."""
    n, K = w.shape
    wg = w.to(torch.float32, copy=True).reshape(n, K // group_size, group_size)  # (n, G, g): worked on in place
    lo, hi = torch.aminmax(wg, dim=-1)
    s = ((hi - lo) / 15).clamp_(min=1e-6).to(dtype)
    z = (lo.to(dtype).float() + 8 * s.float()).to(dtype)
    # in place: a third of the time of the same formula with temporaries (quantizing is most of an int4 load)
    q = wg.sub_(z.float()[..., None]).div_(s.float()[..., None]).add_(8).round_().clamp_(0, 15).to(torch.int32)
    return q.reshape(n, K), s, z


def pack(q):
    """(n, K) int32 nibbles, n a multiple of BLOCK -> the kernel's (n, K / 2) uint8 layout."""
    return torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


_layout_known = None


def layout_known():
    """Whether this build packs the [n/64, K, 32] layout that `_unblock` inverts (checked once, on a probe)."""
    global _layout_known
    if _layout_known is None:
        probe = ((torch.arange(BLOCK * 4).reshape(BLOCK, 4) * 7 + torch.arange(BLOCK)[:, None]) % 16).to(torch.int32)
        _layout_known = torch.equal(_unblock(pack(probe)), probe)
    return _layout_known


def to_plain(packed):
    """The kernel's layout -> (n, K / 2) uint8, column 2i in the low nibble and 2i + 1 in the high one."""
    if not layout_known():
        raise RuntimeError("this torch build packs int4 weights in a layout minterleave does not know; "
                           "int4 models cannot be saved with it")
    rows = [_unblock(packed[i:i + ROWS]) for i in range(0, packed.shape[0], ROWS)]
    return torch.cat([nibbles_to_bytes(r) for r in rows])


def _unblock(packed):
    """(n, K / 2) uint8 in the kernel's layout -> (n, K) int32 nibbles."""
    n, K = packed.shape[0], packed.shape[1] * 2
    b = packed.view(n // BLOCK, K, BLOCK // 2).to(torch.int32)  # (n/64, K, 32)
    q = torch.cat([b & 15, b >> 4], dim=-1)  # (n/64, K, 64): rows j and j + 32 of each block
    return q.permute(0, 2, 1).reshape(n, K)


def nibbles_to_bytes(q):
    """(n, K) values in [0, 15] -> (n, K / 2) uint8, even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def bytes_to_nibbles(b):
    """(n, K / 2) uint8 -> (n, K) int32."""
    b = b.to(torch.int32)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)


class Int4Linear(nn.Module):
    """y = x W^T (+ b), W held as packed nibbles plus one scale and zero per group of input columns."""

    def __init__(self, in_features, out_features, group_size, bias=None, dtype=torch.bfloat16, device=None):
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        rows = -(-out_features // BLOCK) * BLOCK  # padded to whole blocks
        self.register_buffer("weight", torch.empty(rows, in_features // 2, dtype=torch.uint8, device=device))
        # (K / g, rows, 2): scale and zero, as the kernel reads them; padding rows stay 0 (their output is 0)
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, rows, 2, dtype=dtype,
                                                             device=device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, w, group_size, bias=None, dtype=None):
        """Quantize the float matrix w (out, in), ROWS rows at a time."""
        dtype = dtype or w.dtype
        check_group_size(group_size, w.shape[1], f"a ({w.shape[0]}, {w.shape[1]}) weight")
        m = cls(w.shape[1], w.shape[0], group_size, bias, dtype)
        for a in range(0, w.shape[0], ROWS):
            q, s, z = quantize_groups(w[a:a + ROWS], group_size, dtype)
            m._set_rows(a, q, s, z)
        return m

    @torch.no_grad()
    def load_plain(self, qweight, scales, zeros):
        """Fill from a checkpoint's plain form: qweight (out, in / 2) uint8, scales/zeros (out, in / g)."""
        for a in range(0, self.out_features, ROWS):
            self._set_rows(a, bytes_to_nibbles(qweight[a:a + ROWS]), scales[a:a + ROWS], zeros[a:a + ROWS])
        return self

    def plain(self):
        """{qweight, scales, zeros}: the checkpoint form (see load_plain)."""
        n = self.out_features
        sz = self.scales_and_zeros[:, :n]  # (G, n, 2)
        return {"qweight": to_plain(self.weight)[:n], "scales": sz[..., 0].t().contiguous(),
                "zeros": sz[..., 1].t().contiguous()}

    def _set_rows(self, a, q, s, z):
        n = q.shape[0]
        if n % BLOCK:  # the last rows of an out_features that is not a multiple of 64: pad with zero weights
            q = torch.cat([q, q.new_full((BLOCK - n % BLOCK, q.shape[1]), 8)])
        self.weight[a:a + q.shape[0]] = pack(q)
        self.scales_and_zeros[:, a:a + n, 0] = s.t()
        self.scales_and_zeros[:, a:a + n, 1] = z.t()

    def dequantized(self):
        """(out, in) float weights in the activation dtype: (q - 8) s + z."""
        rows, K, g = self.weight.shape[0], self.in_features, self.group_size
        if not layout_known():
            raise RuntimeError("this torch build packs int4 weights in a layout minterleave does not know")
        b = self.weight.view(rows // BLOCK, K, BLOCK // 2)  # the [n/64, K, 32] layout, as _unblock reads it
        # in uint8, then in place in the float dtype: 5x faster than through int32 (it was slower than the matmul)
        q = torch.cat([b & 15, b >> 4], dim=-1).transpose(1, 2).reshape(rows, K // g, g)  # (rows, G, g)
        sz = self.scales_and_zeros.transpose(0, 1)  # (rows, G, 2)
        w = q.to(sz.dtype).sub_(8).mul_(sz[..., :1]).add_(sz[..., 1:])
        return w.view(rows, K)[:self.out_features]

    def forward(self, x):
        shape = x.shape
        # (B*T, in); contiguous: the kernel reads rows densely, and h[:, -1:] of a batch is not
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.shape[0] >= PREFILL_ROWS and self.weight.numel() <= DEQUANT_MAX and layout_known() \
                and not torch.is_grad_enabled():
            # a prompt: the kernel is built for a few rows (it was ~2.5x slower than F.linear at 758); dequantise
            # this one matrix for one call instead (a temporary of out x in values, never the head's)
            y = F.linear(x2, self.dequantized())
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        if y.shape[-1] != self.out_features:
            y = y[:, :self.out_features]
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
