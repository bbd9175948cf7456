"""Decoder weights laid out for fast decoding on a CPU (inference only, results bit-identical).

A decode step multiplies one activation row by every decoder matrix, so its speed is memory
bandwidth: how fast each weight byte can be streamed through the cores. Two cases:
- bf16: torch's default path for a matrix-vector product reaches about half the bandwidth on
  the CPUs we measured; the same product with the weight reordered once into oneDNN's blocked
  layout reaches about twice that, bit-identically (the same kernel family, fed a layout it does
  not have to convert). `PackedLinear`.
- fp32: MKL runs a one-row product on a single thread. Splitting the output rows into one block
  per thread and running the blocks concurrently uses every core; each output element is still
  the same dot product, so the results are bit-identical (oneDNN's packed fp32 kernels are not:
  they round differently from F.linear, which would cost exact parity). `RowSplitLinear`.
A tied head is the embedding matrix itself. Packing it would need a second, plain copy for the
embedding lookup (311 MB in the 0.5B model), so when the checkpoint file still holds exactly the
embedding in memory (checked when packing), the lookup reads its few rows from that file
instead (`FileEmbedding`) and the packed head holds the only copy in memory.
`Model.prepare_for_inference()` swaps the layers; nothing else needs to know.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def can_pack(weight):
    ops = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and ops is not None and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, weight, bias=None):
        super().__init__()
        self.out_features = weight.shape[0]
        # reordered for a batch of 1 (decode); larger batches (prefill) run as fast as F.linear
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


_pool = {}  # threads -> ThreadPoolExecutor, shared by every RowSplitLinear


class RowSplitLinear(nn.Module):
    """F.linear whose one-row products run as `threads` concurrent blocks of output rows."""

    def __init__(self, weight, bias=None, threads=2):
        super().__init__()
        self.weight, self.bias = weight, bias  # the same tensors (a tied head shares the embedding)
        n = weight.shape[0]
        per_thread = -(-n // threads)
        step = -(-per_thread // 64) * 64  # blocks of whole 64-row panels
        self.blocks = [(a, min(a + step, n)) for a in range(0, n, step)]
        if threads not in _pool:
            _pool[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="minterleave-rows")
        self.pool = _pool[threads]

    @torch.no_grad()  # grad mode is per thread: the pool's threads need it too
    def _block(self, x, out, a, b):
        w = self.weight[a:b]  # (b - a, K) rows: a contiguous view
        if self.bias is None:
            torch.mm(x, w.t(), out=out[:, a:b])
        else:
            torch.addmm(self.bias[a:b], x, w.t(), out=out[:, a:b])

    def forward(self, x):
        if x.numel() != x.shape[-1] or torch.is_grad_enabled():  # prefill (MKL threads it well) or training
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(1, -1)
        out = torch.empty(1, self.weight.shape[0], dtype=x.dtype)  # (1, N): each block a contiguous slice
        jobs = [self.pool.submit(self._block, x2, out, a, b) for a, b in self.blocks[1:]]
        self._block(x2, out, *self.blocks[0])  # this thread takes the first block (ATen frees the GIL)
        for job in jobs:
            job.result()
        return out.view(*x.shape[:-1], -1)


class FileEmbedding(nn.Module):
    """Embedding rows read from the checkpoint file on lookup (through the page cache: only the
    pages of the looked-up rows become resident)."""

    def __init__(self, source, dtype):
        super().__init__()
        self.file, offset, self.file_dtype, shape = source["file"], source["offset"], source["dtype"], source["shape"]
        row_bytes = shape[1] * torch.empty((), dtype=self.file_dtype).element_size()
        self.rows = np.memmap(self.file, dtype=np.uint8, mode="r", offset=offset, shape=(shape[0], row_bytes))
        self.dtype = dtype

    def forward(self, ids):
        raw = torch.from_numpy(self.rows[ids.cpu().numpy()])  # (..., row_bytes) uint8: a copy of the rows
        # the conversion the loader applied (read_into copies into the parameter's dtype)
        return raw.view(self.file_dtype).to(self.dtype)


def file_holds(source, weight, chunk_rows=8192):
    """Whether the file still holds exactly `weight` (after the loader's dtype conversion): checked
    chunk by chunk with plain reads, so that the check adds no resident pages."""
    try:
        if (os.stat(source["file"]).st_size, os.stat(source["file"]).st_mtime_ns) != source["stamp"]:
            return False
        if tuple(source["shape"]) != tuple(weight.shape):
            return False
        buf = torch.empty(chunk_rows, weight.shape[1], dtype=source["dtype"])
        raw = buf.view(torch.uint8).numpy()
        row_bytes = raw.shape[1]
        with open(source["file"], "rb") as f:
            f.seek(source["offset"])
            for a in range(0, weight.shape[0], chunk_rows):
                n = min(chunk_rows, weight.shape[0] - a)
                if f.readinto(raw[:n].reshape(-1)) != n * row_bytes or \
                        not torch.equal(buf[:n].to(weight.dtype), weight[a:a + n]):
                    return False
    except OSError:
        return False
    return True


def _linears(decoder):
    for block in decoder.layers:
        for parent, name in ((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"),
                             (block.mlp, "gate_up_proj"), (block.mlp, "down_proj")):
            yield parent, name


@torch.no_grad()
def pack_decoder(decoder, embedding_source=None):
    """Swap the decoder's linear layers for the decode-friendly ones above, in place; returns how many.

    embedding_source: where the embedding matrix lies in the checkpoint file (weights.load_weights
    records it), so that a tied bf16 head can be packed too."""
    w = decoder.norm.weight
    packed = can_pack(w)
    threads = torch.get_num_threads()
    if packed:
        make = PackedLinear
    elif w.device.type == "cpu" and w.dtype == torch.float32 and threads > 1:
        make = lambda weight, bias: RowSplitLinear(weight, bias, threads)  # noqa: E731
    else:
        return 0
    n = 0
    for parent, name in _linears(decoder):
        lin = getattr(parent, name)
        if isinstance(lin, nn.Linear):
            setattr(parent, name, make(lin.weight, lin.bias))
            n += 1
    tied = decoder.lm_head is None and isinstance(decoder.embed_tokens, nn.Embedding)
    if isinstance(decoder.lm_head, nn.Linear):
        decoder.lm_head = make(decoder.lm_head.weight, None)
        n += 1
    elif tied and not packed:  # fp32: the split head shares the embedding's tensor
        decoder.lm_head = make(decoder.embed_tokens.weight, None)
        n += 1
    elif tied and embedding_source is not None and file_holds(embedding_source, decoder.embed_tokens.weight):
        decoder.lm_head = make(decoder.embed_tokens.weight, None)
        decoder.embed_tokens = FileEmbedding(embedding_source, w.dtype)  # frees the plain matrix
        n += 1
    return n
