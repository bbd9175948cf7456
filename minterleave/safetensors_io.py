"""safetensors files, read tensor by tensor: the header, plain reads at its offsets, copy-on-write maps.

The format: 8 bytes of little-endian header length, a JSON header ({name: dtype, shape, data_offsets}),
then the raw tensor bytes. weights.py and qcheckpoint.py read every tensor through these functions.
A whole parameter whose file dtype is the one asked for is not copied at all: it becomes a copy-on-write
memory map of its bytes in the file (`map_tensor`, as transformers and safetensors do), so pages are read
from the file only when first used. A text-only prompt never touches the vision tower's 0.8 GB (0.5B
model), and writes (training, merging) go to private pages, never to the file. Each tensor has its own
map, so freeing it (packing.py replaces some) unmaps it. Anything else (another dtype, q/k/v and gate/up
stacked into one matrix) is read straight into the parameter, or through one temporary, so loading holds
at most one extra tensor. Each tensor is checked for NaN/Inf right after it is read (`is_finite`): one
min/max reduction; a mapped tensor's pages are released again after the check (they count as resident).
"""

import ctypes
import json
import math
import mmap
import os
import struct
import sys

import torch


class WeightsError(ValueError):
    pass


DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(file: str) -> tuple:
    """(data start offset, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file.
    The format: 8-byte little-endian header length, a JSON header, then the raw tensor bytes."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"tensor {name} has unsupported dtype {info['dtype']}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise WeightsError(f"{file}: not a readable safetensors file ({e})") from None
    return 8 + n, header


def read_into(f, start: int, info: dict, out: torch.Tensor):
    """Read one tensor's bytes from the open file `f` into `out` (converting dtype if needed)."""
    begin, end = info["data_offsets"]
    src_dtype = DTYPES[info["dtype"]]
    direct = src_dtype == out.dtype and out.is_contiguous() and out.device.type == "cpu"
    buf = out if direct else torch.empty(info["shape"], dtype=src_dtype)
    raw = buf.view(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
    f.seek(start + begin)
    if f.readinto(raw) != end - begin or raw.nbytes != end - begin:
        raise WeightsError(f"{f.name}: tensor data is truncated")
    if not direct:
        out.copy_(buf)


def map_tensor(file: str, start: int, info: dict):
    """(tensor, map) viewing one tensor's bytes in `file` through a private (copy-on-write) memory map, or
    None where a map cannot serve (an empty or misaligned tensor, offsets that disagree with the shape, a
    truncated file: read_into reports what is wrong)."""
    begin, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]]
    offset = start + begin
    base = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps start on a page boundary
    if end <= begin or offset % dtype.itemsize or end - begin != math.prod(info["shape"]) * dtype.itemsize:
        return None
    try:
        with open(file, "rb") as f:
            if os.fstat(f.fileno()).st_size < start + end:
                return None
            mapped = mmap.mmap(f.fileno(), start + end - base, access=mmap.ACCESS_COPY, offset=base)
    except (OSError, ValueError):
        return None
    # the tensor holds a reference to the map: it is unmapped when the tensor is freed
    t = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset - base)
    return t.view(info["shape"]), mapped


def release_pages(mapped):
    """Drop a map's resident pages (never written yet, so they are the file's and come back on use)."""
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


def page_out(t: torch.Tensor):
    """Give back the pages of `t` if it views a private map of a file: ask the kernel to reclaim them (madvise
    MADV_PAGEOUT, Linux 5.4+). Clean pages leave this process's resident set and come back from the file when
    read again; nothing is lost (pages written since mapping are anonymous: the kernel keeps them, or writes
    them to swap). Anonymous memory is left alone. The kernel skips a file's pages unless this process owns the
    file or may write it, and pages another process maps too: from a read-only or shared checkpoint nothing
    is given back before the map is freed. A no-op off Linux."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return
    begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    lo, hi = -(-begin // page) * page, end // page * page  # whole pages inside the tensor only
    if hi > lo and _in_private_file_map(begin, end):
        _libc().madvise(lo, hi - lo, MADV_PAGEOUT)


MADV_PAGEOUT = 21  # <linux/mman.h>


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _in_private_file_map(begin: int, end: int) -> bool:
    """Whether the addresses [begin, end) lie inside one private file mapping of this process (Linux's
    /proc/self/maps: a line per mapping, `start-end perms offset dev inode path`; inode 0 is anonymous
    memory, perms end in p or s)."""
    try:
        with open("/proc/self/maps", "rb") as f:  # bytes: a path need not be UTF-8
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split(b"-"))
                if lo <= begin < hi:
                    return end <= hi and len(fields) >= 6 and fields[4] != b"0" and fields[1].endswith(b"p")
    except (OSError, ValueError, IndexError):
        pass
    return False


def is_finite(t: torch.Tensor) -> bool:
    """No NaN and no Inf in `t`. min and max propagate NaN, so one reduction decides, exactly and with no
    temporary: ~40x faster than torch.isfinite(t).all(), which writes a bool per element, and ~10x faster than
    t.abs().amax() (a sum would be cheap too but can overflow on finite half-precision values)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def nonfinite_error(f, start: int, info: dict, name: str, dtype: torch.dtype) -> WeightsError:
    """The one-line error for a tensor that is not finite once loaded in `dtype`: its NaN and Inf counts
    in the file, or, if the file's values are finite, that they overflow `dtype` (only on failure, so
    re-reading the tensor costs nothing in the normal case)."""
    src = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    read_into(f, start, info, src)
    nan, inf = int(src.isnan().sum()), int(src.isinf().sum())
    if nan or inf:
        return WeightsError(f"{f.name}: tensor {name} holds {nan} NaN and {inf} Inf values (of {src.numel()}); "
                            f"refused (check_finite=False or --no-check-finite loads it anyway)")
    big = src.abs().max().item()
    return WeightsError(f"{f.name}: tensor {name} holds values up to {big:.4g}, beyond {str(dtype)[6:]}'s range "
                        f"(they would load as Inf); load it in float32 or bfloat16")


def load_tensor(f, start: int, info: dict, name: str, out=None, may_map=False, check_finite=True):
    """Tensor `name` of the open safetensors file `f`: a copy-on-write map of its bytes when may_map and
    `out` (if given) has the file's dtype, else read into `out` (converted to its dtype) or into a new
    tensor. A floating tensor is checked for NaN/Inf (check_finite), a map's pages released after."""
    stored = DTYPES[info["dtype"]]
    mapped = map_tensor(f.name, start, info) if may_map and (out is None or out.dtype == stored) else None
    if mapped is not None:
        t, pages = mapped
    else:
        t = torch.empty(info["shape"], dtype=stored) if out is None else out
        read_into(f, start, info, t)
    if check_finite and t.is_floating_point():
        if not is_finite(t):
            raise nonfinite_error(f, start, info, name, t.dtype)
        if mapped is not None:
            release_pages(pages)
    return t
