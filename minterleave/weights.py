"""Checkpoint reading: safetensors files in the official layouts -> the modules' parameters.

The map from checkpoint tensor names to our parameter names is written out (`tensor_map`),
one entry per tensor, for three layouts of the same weights:
- "llava-hf": the hub's llava-interleave-*-hf files (language_model.model.*,
  vision_tower.vision_model.*, multi_modal_projector.linear_{1,2}.*, language_model.lm_head.*);
- "hf5": what transformers 5 writes with save_pretrained (vision_tower.* without vision_model.);
- "lmms-lab": the original LLaVA-NeXT files (model.layers.*, model.mm_projector.{0,2}.*,
  model.vision_tower.vision_tower.vision_model.*, lm_head.weight).
Loading is strict, as in nanoGPT's from_pretrained: every parameter must be found with the
right shape, and every tensor of the files must be used or be on the explicit list of
deliberately unused ones (`unused_reason`). Anything else is an error naming tensor and file.
Reading the files (plain reads, or copy-on-write maps of whole tensors) is safetensors_io.py.
"""

import json
import os
import re

import torch

from .config import ModelConfig
from .safetensors_io import DTYPES, WeightsError, load_tensor, read_header  # noqa: F401 (DTYPES, WeightsError: API)

VISION_BLOCK = [f"{m}.{p}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
                                      "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.out_proj") for p in ("weight", "bias")]


def text_block(cfg: ModelConfig) -> dict:
    """{checkpoint name: (our name, rows)} inside one decoder layer. q, k and v (and gate and up)
    are separate tensors in every checkpoint but one matmul here (fewer, larger matmuls decode
    faster), so each fills a block of rows of the fused weight; rows None = the whole tensor."""
    t = cfg.text
    q, kv, inter = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
    block = {"input_layernorm.weight": ("input_layernorm.weight", None),
             "post_attention_layernorm.weight": ("post_attention_layernorm.weight", None),
             "self_attn.o_proj.weight": ("self_attn.o_proj.weight", None),
             "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", (0, inter)),
             "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", (inter, 2 * inter)),
             "mlp.down_proj.weight": ("mlp.down_proj.weight", None)}
    for p in ("weight", "bias"):
        block[f"self_attn.q_proj.{p}"] = (f"self_attn.qkv_proj.{p}", (0, q))
        block[f"self_attn.k_proj.{p}"] = (f"self_attn.qkv_proj.{p}", (q, q + kv))
        block[f"self_attn.v_proj.{p}"] = (f"self_attn.qkv_proj.{p}", (q + kv, q + 2 * kv))
    return block


# (vision tower prefix, text prefix, projector linear_1 / linear_2 prefix, untied head) per layout
PREFIXES = {
    "llava-hf": ("vision_tower.vision_model.", "language_model.model.",
                 ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."), "language_model.lm_head.weight"),
    "hf5": ("vision_tower.", "language_model.model.",
            ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."), "language_model.lm_head.weight"),
    "lmms-lab": ("model.vision_tower.vision_tower.vision_model.", "model.",
                 ("model.mm_projector.0.", "model.mm_projector.2."), "lm_head.weight"),
}


def tensor_map(cfg: ModelConfig, layout: str, vision_layers: int) -> dict:
    """{checkpoint tensor name: (our parameter name, rows)} for every tensor the model loads."""
    vis, txt, (proj1, proj2), head = PREFIXES[layout]
    whole = {
        vis + "embeddings.patch_embedding.weight": "vision.patch_embedding.weight",
        vis + "embeddings.patch_embedding.bias": "vision.patch_embedding.bias",
        vis + "embeddings.position_embedding.weight": "vision.position_embedding.weight",
        proj1 + "weight": "projector.linear_1.weight", proj1 + "bias": "projector.linear_1.bias",
        proj2 + "weight": "projector.linear_2.weight", proj2 + "bias": "projector.linear_2.bias",
        txt + "embed_tokens.weight": "decoder.embed_tokens.weight",
        txt + "norm.weight": "decoder.norm.weight",
    }
    if not cfg.text.tie_word_embeddings:
        whole[head] = "decoder.lm_head.weight"
    for j in range(vision_layers):
        for t in VISION_BLOCK:
            whole[f"{vis}encoder.layers.{j}.{t}"] = f"vision.layers.{j}.{t.replace('mlp.', '')}"
    names = {ck: (ours, None) for ck, ours in whole.items()}
    block = text_block(cfg)
    for i in range(cfg.text.num_layers):
        for ck, (ours, rows) in block.items():
            names[f"{txt}layers.{i}.{ck}"] = (f"decoder.layers.{i}.{ours}", rows)
    return names


def unused_reason(name: str, cfg: ModelConfig, layout: str, vision_layers: int):
    """Why a checkpoint tensor is deliberately not loaded, or None if it should have been used."""
    vis, _, _, head = PREFIXES[layout]
    if name.startswith(vis + "post_layernorm."):
        return "LLaVA takes the features before SigLIP's post_layernorm"
    if name.startswith(vis + "head."):
        return "SigLIP's pooling head is not part of LLaVA"
    if name == "model.image_newline":
        return "image_newline only serves the original anyres merge, which the HF model does not use"
    if name.endswith("rotary_emb.inv_freq"):
        return "RoPE frequencies are recomputed from rope_theta"
    if name == head and cfg.text.tie_word_embeddings:
        return "tie_word_embeddings: the output head is the embedding matrix"
    m = re.match(re.escape(vis) + r"encoder\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= vision_layers:
        return "encoder layers after the feature layer are never run"
    return None


def weight_files(path: str) -> dict:
    """{tensor name: file} for a folder holding model.safetensors or shards with an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights found (and no model.safetensors.index.json)")
    where = {}
    for fname in files:
        file = os.path.join(path, fname)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{index}: lists shard {fname}, which is missing")
        for key in read_header(file)[1]:
            if key in where:
                raise WeightsError(f"{file}: tensor {key} is also in {where[key]}")
            where[key] = file
    return where


def detect_layout(cfg: ModelConfig, where: dict) -> str:
    if cfg.layout == "lmms-lab":
        return "lmms-lab"
    # both llava-hf layouts share config.json; only the vision tower's prefix differs
    return "hf5" if "vision_tower.embeddings.patch_embedding.weight" in where else "llava-hf"


def load_weights(model, path: str, cfg: ModelConfig, where: dict = None, check_finite: bool = True, skip=()):
    """Copy every tensor of the checkpoint at `path` into `model` (converted to its dtype). With check_finite,
    a tensor holding NaN or Inf once loaded is an error naming it and its file. skip: our names of parameters
    not loaded here (qcheckpoint.py reads them one at a time, to quantize each)."""
    where = where if where is not None else weight_files(path)
    layout = detect_layout(cfg, where)
    vision_layers = len(model.vision.layers)
    names = tensor_map(cfg, layout, vision_layers)
    params = dict(model.named_parameters())
    assert {ours for ours, _ in names.values()} - set(skip) == set(params), "key map out of date"

    missing = [ck for ck in names if ck not in where]
    if missing:
        files = ", ".join(sorted({os.path.basename(f) for f in where.values()}))
        raise WeightsError(f"{path}: tensor {missing[0]} is missing from {files} ({len(missing)} missing in all; "
                           f"layout {layout})")
    for key, file in where.items():
        if key not in names and unused_reason(key, cfg, layout, vision_layers) is None:
            raise WeightsError(f"{file}: unexpected tensor {key} (not part of a {layout} LLaVA-Qwen2 checkpoint)")

    by_file = {}
    for ck, (ours, rows) in names.items():
        if ours in skip:
            continue
        target = params[ours].data if rows is None else params[ours].data[rows[0]:rows[1]]  # rows: a view
        by_file.setdefault(where[ck], []).append((ck, target, params[ours] if rows is None else None))
    # One thread while reading: the reads are serial and the tensor ops between them (a dtype conversion, the
    # finite check) memory-bound; with more, OpenMP's idle workers spin between those ops and take the reading
    # thread's core (on 2 busy cores a float32 0.5B load took 3.3 s instead of 0.95 s; the check cost 2.4 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for file, pairs in by_file.items():
                start, header = read_header(file)
                for ck, target, _ in pairs:  # check every shape before reading anything
                    if tuple(header[ck]["shape"]) != tuple(target.shape):
                        raise WeightsError(f"{file}: tensor {ck} has shape {header[ck]['shape']}, "
                                           f"expected {list(target.shape)}")
                with open(file, "rb") as f:
                    for ck, target, whole in sorted(pairs, key=lambda pair: header[pair[0]]["data_offsets"][0]):
                        value = load_tensor(f, start, header[ck], ck, target, check_finite=check_finite,
                                            may_map=whole is not None and target.device.type == "cpu")
                        if value is not target:
                            whole.data = value  # the parameter's storage is now the map
    finally:
        torch.set_num_threads(threads)
    return layout


def embedding_location(path: str, cfg: ModelConfig) -> dict:
    """Where the token-embedding matrix lies in the checkpoint at `path`: {file, offset, dtype, shape}.
    packing.py uses it to pack a tied head and read the embedding's rows from the file instead of keeping
    a second copy in memory."""
    where = weight_files(path)
    layout = detect_layout(cfg, where)
    key = next(ck for ck, (ours, _) in tensor_map(cfg, layout, cfg.vision_layers_used).items()
               if ours == "decoder.embed_tokens.weight")
    start, header = read_header(where[key])
    return dict(file=where[key], offset=start + header[key]["data_offsets"][0], dtype=DTYPES[header[key]["dtype"]],
                shape=tuple(header[key]["shape"]))


def save_weights(model, path: str, cfg: ModelConfig):
    """Write `model`'s tensors to `path/model.safetensors` in the llava-hf layout (atomically:
    a temporary file renamed into place, so a crash never leaves a half-written checkpoint)."""
    from safetensors.torch import save_file
    params = dict(model.named_parameters())
    tensors = {}
    for ck, (ours, rows) in tensor_map(cfg, "llava-hf", len(model.vision.layers)).items():
        t = params[ours].detach()
        tensors[ck] = (t if rows is None else t[rows[0]:rows[1]]).contiguous()
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file private (0600); give it the usual mode
    os.replace(tmp, os.path.join(path, "model.safetensors"))
