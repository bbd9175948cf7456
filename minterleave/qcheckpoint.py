"""Quantized models without their float weights: quantizing while loading, and quantized checkpoints.

`Model.from_pretrained(path, quantize="int8" | "int4", group_size=...)` on a float checkpoint builds the
model on the meta device, loads everything but the decoder's matrices and embedding as usual, then reads
those one at a time, quantizes each (quantize.py, int4.py) and frees it: peak memory is the quantized
model plus one float matrix, never the float decoder (quantizing a loaded model held both).
The float tensors are read with `read_param` (a fused matrix from its q/k/v or gate/up blocks) and
`row_reader` (a block of rows of the embedding or head at a time).
`save_quantized(model, folder, source)` writes the quantized model: model.safetensors under minterleave's
own parameter names, int4 weights in a plain form (int4.py: two columns a byte, scales and zeros per
group), config.json with the scheme under "minterleave_quantization", and the source folder's tokenizer
and processor files. Loading such a folder reads the quantized tensors straight into their modules.
The format is minterleave's own (transformers does not read it); float checkpoints stay in llava-hf layout.
"""

import json
import os
import shutil

import torch

from . import safetensors_io, weights
from .int4 import ROWS, Int4Linear, quantize_groups
from .quantize import Int8Embedding, Int8Linear, check_scheme, quantize_rows, quantized_linear, targets

KEY = "minterleave_quantization"


def saved_scheme(path):
    """{"scheme", "group_size"} when `path` holds a quantized checkpoint, else None."""
    with open(os.path.join(path, "config.json")) as f:
        q = json.load(f).get(KEY)
    if q is not None:
        check_scheme(q.get("scheme"), q.get("group_size"))
    return q


def read_param(cfg, where: dict, ours: str, out: torch.Tensor, check_finite=True, headers=None):
    """Fill `out` with our parameter `ours` (all its row blocks: q/k/v or gate/up) from the checkpoint files
    `where` ({tensor: file}). headers: a dict caching each file's parsed header between calls."""
    headers = {} if headers is None else headers
    layout = weights.detect_layout(cfg, where)
    tmap = weights.tensor_map(cfg, layout, cfg.vision_layers_used)
    parts = [(ck, rows) for ck, (name, rows) in tmap.items() if name == ours]
    assert parts, f"no checkpoint tensor fills {ours}"  # (load_weights has checked that none is missing)
    with torch.no_grad():
        for ck, rows in parts:
            if where[ck] not in headers:
                headers[where[ck]] = safetensors_io.read_header(where[ck])
            start, header = headers[where[ck]]
            target = out if rows is None else out[rows[0]:rows[1]]
            if tuple(header[ck]["shape"]) != tuple(target.shape):
                raise safetensors_io.WeightsError(f"{where[ck]}: tensor {ck} has shape {header[ck]['shape']}, "
                                                  f"expected {list(target.shape)}")
            with open(where[ck], "rb") as f:
                safetensors_io.load_tensor(f, start, header[ck], ck, target, check_finite=check_finite)
    return out


def row_reader(cfg, where: dict, ours: str, dtype, check_finite: bool = True):
    """(read, shape) for our whole-tensor parameter `ours`: read(a, b) returns its rows a..b in `dtype`, read from
    the file, so that a large matrix (the embedding, an untied head) can be quantized without holding it all."""
    layout = weights.detect_layout(cfg, where)
    tmap = weights.tensor_map(cfg, layout, cfg.vision_layers_used)
    ck = next(ck for ck, (name, rows) in tmap.items() if name == ours)
    start, header = safetensors_io.read_header(where[ck])
    info = header[ck]
    shape, row_bytes = info["shape"], info["shape"][1] * safetensors_io.DTYPES[info["dtype"]].itemsize
    begin = info["data_offsets"][0]

    def read(a, b):
        out = torch.empty(b - a, shape[1], dtype=dtype)
        part = {"dtype": info["dtype"], "shape": list(out.shape),
                "data_offsets": [begin + a * row_bytes, begin + b * row_bytes]}
        with open(where[ck], "rb") as f:
            safetensors_io.read_into(f, start, part, out)
            if check_finite and not safetensors_io.is_finite(out):
                raise safetensors_io.nonfinite_error(f, start, info, ck, dtype)
        return out
    return read, tuple(shape)


def _detach_matrices(model):
    """Drop the (meta) weights of every matrix that gets quantized, so that to_empty allocates none;
    returns {name: (module, attribute, shape)} under `decoder.`."""
    dec, out = model.decoder, {}
    for parent, attr, name in targets(dec):
        lin = getattr(parent, attr)
        out[name] = (parent, attr, tuple(lin.weight.shape))
        lin.register_parameter("weight", None)
    out["embed_tokens"] = (dec, "embed_tokens", tuple(dec.embed_tokens.weight.shape))
    dec.embed_tokens.register_parameter("weight", None)
    if dec.lm_head is not None:
        out["lm_head"] = (dec, "lm_head", tuple(dec.lm_head.weight.shape))
        dec.lm_head.register_parameter("weight", None)
    return out


@torch.no_grad()
def load_quantizing(model, path, cfg, where, check_finite, scheme, group_size, device):
    """Fill `model` (built on meta) from a float checkpoint, quantizing the decoder matrix by matrix."""
    group_size = check_scheme(scheme, group_size)
    dtype = model.decoder.norm.weight.dtype
    mats = _detach_matrices(model)
    model.to_empty(device=device)
    weights.load_weights(model, path, cfg, where, check_finite, skip={f"decoder.{n}.weight" for n in mats})
    headers = {}

    def read(name):
        return read_param(cfg, where, f"decoder.{name}.weight", torch.empty(mats[name][2], dtype=dtype),
                                  check_finite, headers)

    for parent, attr, name in targets(model.decoder):
        lin = getattr(parent, attr)
        setattr(parent, attr, quantized_linear(read(name), lin.bias, scheme, group_size, dtype))
    # the embedding and an untied head (152k rows: as large as a third of the decoder) a block of rows at a time
    rows = {n: row_reader(cfg, where, f"decoder.{n}.weight", dtype, check_finite)
            for n in ("embed_tokens", "lm_head") if n in mats}
    dec = model.decoder
    dec.embed_tokens = Int8Embedding(*_int8_rows(*rows["embed_tokens"]), dtype)
    if "lm_head" not in mats and scheme == "int8":
        dec.lm_head = Int8Linear(dec.embed_tokens.weight, dec.embed_tokens.scales, None, dtype)  # tied: one table
    else:
        read_head, (n, k) = rows.get("lm_head", rows["embed_tokens"])
        if scheme == "int8":
            dec.lm_head = Int8Linear(*_int8_rows(read_head, (n, k)), None, dtype)
        else:
            dec.lm_head = Int4Linear(k, n, group_size, None, dtype)
            for a in range(0, n, ROWS):
                dec.lm_head._set_rows(a, *quantize_groups(read_head(a, min(n, a + ROWS)), group_size, dtype))
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model


def _int8_rows(read, shape):
    """int8 rows and scales of a (n, k) matrix read ROWS rows at a time."""
    q, s = torch.empty(shape, dtype=torch.int8), torch.empty(shape[0])
    for a in range(0, shape[0], ROWS):
        b = min(shape[0], a + ROWS)
        q[a:b], s[a:b] = quantize_rows(read(a, b))
    return q, s


def _tensors(model, values=True):
    """{name: tensor} of the quantized model in the checkpoint form; values=False: int4 parts are None
    (their names only, without unpacking anything)."""
    skip, out = set(), {}
    emb = model.decoder.embed_tokens
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            parts = m.plain() if values else dict.fromkeys(("qweight", "scales", "zeros"))
            out.update({f"{name}.{k}": v for k, v in parts.items()})
        elif isinstance(m, Int8Linear) and name == "decoder.lm_head" and m.weight is getattr(emb, "weight", None):
            pass  # the tied int8 head is the embedding's table: stored once
        elif isinstance(m, (Int8Linear, Int8Embedding)):
            out.update({f"{name}.weight": m.weight, f"{name}.scales": m.scales})
        else:
            continue
        if getattr(m, "bias", None) is not None:
            out[f"{name}.bias"] = m.bias.detach()
        skip.add(name + ".")
    for k, v in model.state_dict().items():
        if not any(k.startswith(p) for p in skip):
            out[k] = v
    return {k: v if v is None else v.detach().contiguous() for k, v in out.items()}


def save_quantized(model, folder, source=None):
    """Write the quantized `model` to `folder` (see the module docstring). source: the checkpoint it came
    from, whose config.json (plus the scheme) and tokenizer/processor files are copied."""
    from safetensors.torch import save_file
    q = getattr(model, "quantization", None)
    if q is None:
        raise ValueError("the model is not quantized; load it with quantize='int8' or 'int4' first")
    os.makedirs(folder, exist_ok=True)
    if source is not None:
        for f in os.listdir(source):
            if not f.endswith(".safetensors") and f != "model.safetensors.index.json" and f != "config.json" \
                    and os.path.isfile(os.path.join(source, f)):
                shutil.copy(os.path.join(source, f), os.path.join(folder, f))
        with open(os.path.join(source, "config.json")) as f:
            config = json.load(f)
    else:
        from .config import to_llava_hf_dict
        config = to_llava_hf_dict(model.cfg)
    tied = model.decoder.lm_head.weight is getattr(model.decoder.embed_tokens, "weight", None)
    config[KEY] = {**q, "dtype": str(model.dtype)[6:], "head_shares_embedding": bool(tied)}
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(_tensors(model), tmp, metadata={"format": "pt", "minterleave": json.dumps(config[KEY])})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


@torch.no_grad()
def load_saved(model, path, where, check_finite, device):
    """Fill `model` (built on meta) from a quantized checkpoint: the modules are swapped for empty quantized
    ones of the right shapes, then every tensor is read straight into its place."""
    q = saved_scheme(path)
    scheme, group_size = q["scheme"], q.get("group_size")
    dtype = model.decoder.norm.weight.dtype
    mats = _detach_matrices(model)
    model.to_empty(device=device)
    dec, headers, plain = model.decoder, {}, {}
    for name, (parent, attr, shape) in mats.items():
        if name == "lm_head" or name == "embed_tokens":
            continue
        bias = getattr(parent, attr).bias
        if scheme == "int8":
            setattr(parent, attr, Int8Linear(torch.empty(shape, dtype=torch.int8), torch.empty(shape[0]), bias, dtype))
        else:
            setattr(parent, attr, Int4Linear(shape[1], shape[0], group_size, bias, dtype))
    vocab, hidden = mats["embed_tokens"][2]
    dec.embed_tokens = Int8Embedding(torch.empty(vocab, hidden, dtype=torch.int8), torch.empty(vocab), dtype)
    if q.get("head_shares_embedding"):
        dec.lm_head = Int8Linear(dec.embed_tokens.weight, dec.embed_tokens.scales, None, dtype)
    elif scheme == "int8":
        dec.lm_head = Int8Linear(torch.empty(vocab, hidden, dtype=torch.int8), torch.empty(vocab), None, dtype)
    else:
        dec.lm_head = Int4Linear(hidden, vocab, group_size, None, dtype)
    expected = _tensors(model, values=False)  # None: an int4 part, read as stored and converted below
    int4 = [name for name, m in model.named_modules() if isinstance(m, Int4Linear)]
    missing = sorted(set(expected) - set(where))
    extra = sorted(set(where) - set(expected))
    if missing or extra:
        file = where[next(iter(where))]
        raise safetensors_io.WeightsError(
            f"{file}: not a {scheme} minterleave checkpoint of this configuration: "
            + (f"tensor {missing[0]} is missing ({len(missing)} in all)" if missing else f"unexpected tensor {extra[0]}"))
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, target in expected.items():
        file = where[key]
        if file not in headers:
            headers[file] = safetensors_io.read_header(file)
        start, header = headers[file]
        info = header[key]
        target = state[key] if target is not None else None
        if target is not None and tuple(info["shape"]) != tuple(target.shape):
            raise safetensors_io.WeightsError(f"{file}: tensor {key} has shape {info['shape']}, "
                                              f"expected {list(target.shape)}")
        # as weights.load_weights, a float parameter (the vision tower, norms, biases) is mapped, not read: resident
        # only once used. Not the quantized buffers: a map is only 8-byte aligned, and _weight_int8pack_mm crashed
        # on such an int8 matrix. int4's plain form is converted, so it is only read through its map
        may_map = torch.device(device).type == "cpu" and (target is None or isinstance(target, torch.nn.Parameter))
        with open(file, "rb") as f:
            value = safetensors_io.load_tensor(f, start, info, key, target, may_map, check_finite)
        if target is None:
            plain[key] = value
        elif value is not target:
            target.data = value  # the parameter now lies in the map
    for name in int4:
        module = model.get_submodule(name)
        module.load_plain(*(plain.pop(f"{name}.{k}") for k in ("qweight", "scales", "zeros")))
    model.quantization = {"scheme": scheme, "group_size": group_size}
    return model
