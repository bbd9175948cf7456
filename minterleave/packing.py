"""Decoder weights in oneDNN's packed layout, for fast decoding on a CPU (inference only).

A decode step multiplies one activation row by every decoder matrix, so its speed is memory
bandwidth: how fast each weight byte can be streamed through the cores. torch's default path for
such a matrix-vector product streams ~17 GB/s (fp32) on the machine we measured, and bf16 about
half of what it could; with each weight reordered once into oneDNN's blocked layout for a batch
of one, the same products stream at 40-50 GB/s in fp32 on two threads and about twice as fast
in bf16. bf16 results are bit-identical to F.linear (the same kernel family, fed a layout it does
not have to convert); fp32 ones differ in the last bits (~1e-6 relative: the sums run in another
order), so in fp32 tests and bench.py compare greedy tokens. `PackedLinear`.
A tied head is the embedding matrix itself. Packing it would need a second, plain copy for the
embedding lookup (311 MB in bf16 for the 0.5B model), so when the checkpoint file still holds
exactly the embedding in memory (checked when packing), the lookup reads its few rows from that
file instead (`FileEmbedding`) and the packed head holds the only copy in memory.
`Model.prepare_for_inference(checkpoint)` swaps the layers; nothing else needs to know.
"""

import numpy as np
import torch
import torch.nn as nn

from .safetensors_io import page_out


def can_pack(weight):
    ops = getattr(torch.ops, "mkldnn", None)
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
            and torch.backends.mkldnn.is_available()
            and ops is not None and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W in oneDNN's packed layout. block_rows: pack W in blocks of that many rows, each
    its own product, outputs concatenated (the same values: every output is one row's dot product). For an
    output head: packing then holds the packed blocks plus one plain block resident, since each plain block's
    pages are given back once packed (a mapped file's pages would otherwise stay until the whole plain matrix
    is freed: the 311 MB head of the 0.5B model twice over, the peak of loading)."""

    def __init__(self, weight=None, bias=None, block_rows=None):
        super().__init__()
        self.out_features, self.n_blocks = 0, 0
        if weight is not None:
            step = block_rows or weight.shape[0]
            for a in range(0, weight.shape[0], step):
                self.append_block(weight[a:a + step], None if bias is None else bias[a:a + step],
                                  give_back=block_rows is not None)

    def append_block(self, weight, bias=None, give_back=False):
        """Pack `weight` (rows of W) as the next block of outputs. give_back: then give back the pages of a
        mapped file under it (safetensors_io.page_out); only worth it while more blocks follow: a matrix packed
        in one piece is unmapped right after, and paging out would also drop the file from the page cache."""
        weight = weight.detach()
        # reordered for a batch of 1 (decode); larger batches (prefill) run as fast as F.linear
        self.register_buffer(f"weight{self.n_blocks}", torch.ops.mkldnn._reorder_linear_weight(weight, 1))
        self.register_buffer(f"bias{self.n_blocks}", None if bias is None else bias.detach())
        if give_back:
            page_out(weight)
        self.n_blocks += 1
        self.out_features += weight.shape[0]

    def forward(self, x):
        if self.n_blocks == 1:  # every layer matrix of a decode step: one call, nothing else on the hot path
            return torch.ops.mkldnn._linear_pointwise(x, self.weight0, self.bias0, "none", [], "")
        return torch.cat([torch.ops.mkldnn._linear_pointwise(x, getattr(self, f"weight{i}"), getattr(self, f"bias{i}"),
                                                             "none", [], "") for i in range(self.n_blocks)], dim=-1)


class FileEmbedding(nn.Module):
    """Embedding rows read from the checkpoint file on lookup (through the page cache: only the
    pages of the looked-up rows become resident)."""

    def __init__(self, source, dtype):
        super().__init__()
        self.file, offset, self.file_dtype, shape = source["file"], source["offset"], source["dtype"], source["shape"]
        self.rows = np.memmap(self.file, dtype=np.uint8, mode="r", offset=offset,
                              shape=(shape[0], shape[1] * self.file_dtype.itemsize))
        self.dtype = dtype

    def forward(self, ids):
        raw = torch.from_numpy(self.rows[ids.cpu().numpy()])  # (..., row_bytes) uint8: a copy of the rows
        # the conversion the loader applied (read_into copies into the parameter's dtype)
        return raw.view(self.file_dtype).to(self.dtype)


def pack_if_file_holds(source, weight, block_rows):
    """The tied head `weight` packed in blocks of rows, or None if the file no longer holds exactly it (after
    the loader's dtype conversion; say, an embedding changed after loading). One pass: each block is read
    from the file with plain reads (no resident pages), compared with the weight's rows, packed, and the
    weight's pages under it given back; so at most one plain block is resident, and the file is read once."""
    if tuple(source["shape"]) != tuple(weight.shape):
        return None
    buf = torch.empty(min(block_rows, weight.shape[0]), weight.shape[1], dtype=source["dtype"])
    raw = buf.view(torch.uint8).numpy()  # (block_rows, row bytes): buf's own memory
    head = PackedLinear()
    try:
        with open(source["file"], "rb") as f:
            f.seek(source["offset"])
            for a in range(0, weight.shape[0], block_rows):
                n = min(block_rows, weight.shape[0] - a)
                if f.readinto(raw[:n].reshape(-1)) != raw[:n].nbytes:
                    return None
                if not torch.equal(buf[:n].to(weight.dtype), weight[a:a + n]):
                    return None
                head.append_block(weight[a:a + n], give_back=True)
    except OSError:
        return None
    return head


HEAD_BLOCK_ROWS = 16384  # 32 MB of a bf16 head of 1,024 columns: 10 blocks for 152k rows


def _linears(decoder):
    for block in decoder.layers:
        for parent, name in ((block.self_attn, "qkv_proj"), (block.self_attn, "o_proj"),
                             (block.mlp, "gate_up_proj"), (block.mlp, "down_proj")):
            yield parent, name


@torch.no_grad()
def pack_decoder(decoder, embedding_source=None):
    """Swap the decoder's linear layers for packed ones, in place; returns how many.

    embedding_source: where the embedding matrix lies in the checkpoint file (weights.embedding_location),
    so that a tied head can be packed too."""
    w = decoder.norm.weight
    if not can_pack(w):
        return 0
    n = 0
    for parent, name in _linears(decoder):
        lin = getattr(parent, name)
        if isinstance(lin, nn.Linear):
            setattr(parent, name, PackedLinear(lin.weight, lin.bias))  # the plain weight is freed with `lin`
            n += 1
    tied = decoder.lm_head is None and isinstance(decoder.embed_tokens, nn.Embedding)
    if isinstance(decoder.lm_head, nn.Linear):
        decoder.lm_head = PackedLinear(decoder.lm_head.weight, None, HEAD_BLOCK_ROWS)
        n += 1
    elif tied and embedding_source is not None:
        head = pack_if_file_holds(embedding_source, decoder.embed_tokens.weight, HEAD_BLOCK_ROWS)
        if head is not None:
            decoder.lm_head = head
            decoder.embed_tokens = FileEmbedding(embedding_source, w.dtype)  # frees the plain matrix
            n += 1
    return n
