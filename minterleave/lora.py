"""LoRA adapters, from scratch, read and written in the PEFT file format.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) freezes a
linear layer W (out, in) and learns a low-rank update beside it:

    y = W x + s * B A dropout(x),    A (r, in), B (out, r),    s = alpha / r

A starts kaiming-uniform (as nn.Linear and PEFT), B at zero, so a fresh adapter changes nothing. rsLoRA
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv 2312.03732) uses
s = alpha / sqrt(r), which keeps the update's scale steady as r grows.

The adapters carry the official projection names. The decoder fuses q/k/v (rows q | k | v of `qkv_proj`) and
gate/up (rows gate | up of `gate_up_proj`); such a layer gets one A/B pair per official projection, applied to
its block of output rows: one base matmul, the low-rank updates concatenated on the output dim. So the files
map one to one onto PEFT's, which adapts transformers' separate q_proj, k_proj, ... layers.

The files are PEFT's (peft_format.py: names, adapter_config.json, transformers 4 and 5 key names); what an
adapter config asks that this module does not do (DoRA, biases, per-layer ranks, ...) is refused, naming the field.

The projector may also train fully beside the adapters (parts=(..., "projector"), as the paper's recipes train the
connector): PEFT's `modules_to_save=["multi_modal_projector"]`, whose whole weights the adapter file carries as
base_model.model.model.multi_modal_projector.linear_1.weight, .bias, linear_2... (the only module_to_save accepted).

    add_lora(model, r=16, alpha=32)   # base frozen; only lora_A / lora_B parameters train
    save_adapter(model, "adapter")    # loads with peft.PeftModel.from_pretrained(hf_model, "adapter")
    load_adapter(model, "adapter")    # a PEFT adapter (or ours) onto a loaded base
    merge_lora(model)                 # fold s * B A into the weights; plain modules again
"""

import json
import math
import os
import re

import torch
import torch.nn as nn

from . import weights
from .peft_format import (KEY_PREFIX, NOT_ADAPTED, PART_PREFIX, PROJECTOR, PROJECTOR_KEYS, check_config, legacy_name,
                          module_of_key, peft_config, read_adapter_config)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the official projection names of each part
PART_TARGETS = {"decoder": DEFAULT_TARGETS, "vision": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")}


class LoRALinear(nn.Module):
    """A frozen linear layer (`base`) plus a low-rank update per official projection it holds.

    slices: [(official name, number of rows)] in row order, e.g. q_proj, k_proj, v_proj for the fused qkv_proj;
    adapted: {official name: the transformers module it stands for} for the slices that get an update.
    The adapter's weights are float32 on a float16/bfloat16 (or int8) base, as PEFT keeps them."""

    def __init__(self, base, slices, adapted, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        self.base, self.slices, self.adapted = base, slices, dict(adapted)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        w = base.weight  # (out, in), for nn.Linear and the int8 layers of quantize.py alike
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        size = {name: n for name, n in slices}
        self.lora_A = nn.ModuleDict({name: nn.Linear(w.shape[1], r, bias=False, device=w.device, dtype=dtype)
                                     for name in self.adapted})  # kaiming-uniform, a = sqrt(5): nn.Linear's init
        self.lora_B = nn.ModuleDict({name: nn.Linear(r, size[name], bias=False, device=w.device, dtype=dtype)
                                     for name in self.adapted})
        for lin in self.lora_B.values():
            nn.init.zeros_(lin.weight)
        # called once per projection, so each gets its own mask, as in PEFT
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def update(self, name, x):
        """s * B A dropout(x) for one projection."""
        return self.scale * self.lora_B[name](self.lora_A[name](self.dropout(x)))

    def forward(self, x):
        y = self.base(x)
        h = x.to(self.lora_A[next(iter(self.adapted))].weight.dtype)
        if len(self.slices) == 1:
            return y + self.update(self.slices[0][0], h).to(y.dtype)
        parts = y.split([n for _, n in self.slices], dim=-1)
        return torch.cat([p + self.update(name, h).to(y.dtype) if name in self.adapted else p
                          for (name, _), p in zip(self.slices, parts)], dim=-1)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, use_rslora={self.use_rslora}, adapted={list(self.adapted)}"


def sites(model):
    """{transformers module name: (part, official projection, our module's path)} of every projection that can
    be adapted. The decoder's rows come from weights.text_block, the one place that knows the fused layout."""
    out, block = {}, weights.text_block(model.cfg)
    for i in range(len(model.decoder.layers)):
        for ck, (ours, _) in block.items():
            if ck.endswith("_proj.weight"):
                out[f"{PART_PREFIX['decoder']}{i}.{ck[:-7]}"] = ("decoder", ck[:-7].split(".")[-1],
                                                                 f"decoder.layers.{i}.{ours[:-7]}")
    for j in range(len(model.vision.layers)):
        for ck in weights.VISION_BLOCK:
            if ck.endswith(".weight") and not ck.startswith("layer_norm"):
                out[f"{PART_PREFIX['vision']}{j}.{ck[:-7]}"] = ("vision", ck[:-7].split(".")[-1],
                                                                f"vision.layers.{j}.{ck[:-7].replace('mlp.', '')}")
    return out


def slices_of(model, path):
    """[(official name, number of rows)] of our module at `path`, in row order (one entry if unfused)."""
    if path.startswith("decoder."):
        fused = path.rsplit(".", 1)[1]
        rows = [(ck.split(".")[-2], r) for ck, (ours, r) in weights.text_block(model.cfg).items()
                if ours.endswith(f".{fused}.weight") and r is not None]
        if rows:
            return [(name, r[1] - r[0]) for name, r in sorted(rows, key=lambda t: t[1][0])]
    return [(path.rsplit(".", 1)[1], model.get_submodule(path).weight.shape[0])]


def lora_layers(model):
    """[(path, LoRALinear)] of the model."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def attach(model, names, r, alpha, dropout, use_rslora):
    """Wrap the layers holding the transformers modules `names` (keys of sites()); freeze the rest."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (merge_lora first, or load a fresh base)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, not {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora_alpha must be positive, not {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), not {dropout!r}")
    where = sites(model)
    by_module = {}
    for name in names:
        part, target, path = where[name]
        by_module.setdefault(path, {})[target] = name
    model.requires_grad_(False)
    for path, adapted in by_module.items():
        parent, attr = path.rsplit(".", 1)
        wrapper = LoRALinear(model.get_submodule(path), slices_of(model, path), adapted, r, alpha, dropout, use_rslora)
        setattr(model.get_submodule(parent), attr, wrapper.train(model.training))
    return model


def matches(target_modules, name):
    """PEFT's rule (tuners_utils.check_target_module_exists): a string is a regex the whole module name must
    match; a list names modules by their full name or its last dotted parts."""
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def targets_for(model, targets, parts, names):
    """adapter_config.json's target_modules for the adapted modules `names`: the list of projection names when
    PEFT's rule picks exactly those (all parts that have the names), else a regex per part."""
    listed = sorted(set(targets))
    if {n for n in sites(model) if matches(listed, n)} == set(names):
        return listed
    key = {"decoder": "language_model", "vision": "vision_tower"}
    return "|".join(rf".*{key[p]}.*\.({'|'.join(t for t in targets if t in PART_TARGETS[p])})" for p in parts
                    if any(t in PART_TARGETS[p] for t in targets))


def add_lora(model, r, alpha, dropout=0.0, targets=DEFAULT_TARGETS, parts=("decoder",), use_rslora=False):
    """Add LoRA adapters (B = 0: a no-op until trained) to the official projections `targets` of the model
    `parts` ("decoder", "vision"); freeze everything else. Returns the model; its trainable parameters are
    the adapters' (names contain lora_A / lora_B). Decoder projections: q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj; vision: q_proj, k_proj, v_proj, out_proj, fc1, fc2.
    Quantize a base (quantize_int8) before, not after, adding adapters. "projector" in parts: the projector trains
    too, fully (in float32; PEFT's modules_to_save), beside the adapters of the other parts."""
    targets, parts = (targets,) if isinstance(targets, str) else tuple(targets), tuple(parts)
    projector = "projector" in parts
    parts = tuple(p for p in parts if p != "projector")
    if not parts:
        raise ValueError("LoRA parts: the projector trains beside adapters; add decoder and/or vision")
    for p in parts:
        if p not in PART_TARGETS:
            raise ValueError(f"LoRA part {p!r} is not supported; use {', '.join(PART_TARGETS)} (and projector)")
    for t in targets:
        if not any(t in PART_TARGETS[p] for p in parts):
            raise ValueError(f"LoRA target {t!r} is not a projection of {' or '.join(parts)} (they are "
                             f"{', '.join(sorted({n for p in parts for n in PART_TARGETS[p]}))})")
    names = [n for n, (part, target, _) in sites(model).items() if part in parts and target in targets]
    attach(model, names, r, alpha, dropout, use_rslora)
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=targets_for(model, targets, parts, names))
    if projector:
        train_projector(model)
    return model


def train_projector(model):
    """Make the projector trainable, in float32 whatever the base's dtype (its AdamW updates need the precision)."""
    model.projector.float().requires_grad_(True)
    model.lora_config["modules_to_save"] = [PROJECTOR]


def adapter_state_dict(model):
    """{PEFT key: tensor} of the model's adapters, e.g.
    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight."""
    out = {}
    for _, layer in lora_layers(model):
        for target, name in layer.adapted.items():
            out[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A[target].weight.detach()
            out[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B[target].weight.detach()
    if getattr(model, "lora_config", {}).get("modules_to_save"):
        params = dict(model.named_parameters())
        out.update({key: params[ours].detach() for key, ours in list(PROJECTOR_KEYS.items())[:4]})
    return out


def save_adapter(model, path, base_model_name_or_path=None):
    """Write the model's adapters to the folder `path` as PEFT does: adapter_config.json and
    adapter_model.safetensors (each written to a temporary file, then renamed into place)."""
    from safetensors.torch import save_file
    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters to save (add_lora or load_adapter first)")
    os.makedirs(path, exist_ok=True)
    tensors = {k: t.contiguous() for k, t in adapter_state_dict(model).items()}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors.tmp"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json.tmp"), "w") as f:
        json.dump(peft_config(model.lora_config, base_model_name_or_path), f, indent=2, sort_keys=True)
        f.write("\n")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
    return path


def load_adapter(model, path):
    """Add the adapter in the folder `path` (PEFT's adapter_config.json + adapter_model.safetensors, or a hub id)
    to the model, unmerged. The modules adapted are those adapter_config.json targets, as PEFT picks them; each
    must have its A and B in the file, and every tensor of the file must belong to one (vision layers after
    the feature layer, never run here, are skipped). Returns the model, base frozen, adapters trainable."""
    from safetensors.torch import load_file
    c, cfg_file, file = read_adapter_config(path)
    r, alpha, dropout, use_rslora = check_config(c, cfg_file)

    where = sites(model)

    def picked(key):  # PEFT's choice of the modules to adapt
        return matches(c["target_modules"], key) and not matches(c.get("exclude_modules"), key)

    for name in NOT_ADAPTED:
        if picked(name) or picked(legacy_name(name)):
            raise ValueError(f"{cfg_file}: target_modules {json.dumps(c['target_modules'])} includes {name}, "
                             f"which minterleave does not adapt (only the decoder's and vision tower's projections)")
    names = [n for n in where if picked(n) or picked(legacy_name(n))]
    if not names:
        raise ValueError(f"{cfg_file}: target_modules {json.dumps(c['target_modules'])} matches none of the "
                         f"projections minterleave adapts ({PART_PREFIX['decoder']}N.self_attn.q_proj, ...)")
    tensors, skip = load_file(file), re.escape(PART_PREFIX["vision"]) + r"(\d+)\."
    found, projector = {}, {}
    for key, t in tensors.items():
        if key in PROJECTOR_KEYS and c.get("modules_to_save"):
            projector[PROJECTOR_KEYS[key]] = t
            continue
        name, ab = module_of_key(key, file)
        m = re.match(skip, name)
        if m and len(model.vision.layers) <= int(m.group(1)) < model.cfg.vision.num_layers:
            continue  # a layer after the feature layer: built by transformers, never run
        if name not in names:
            why = "not one of adapter_config.json's target_modules" if name in where else \
                "not a projection minterleave adapts"
            raise ValueError(f"{file}: unexpected tensor {key} ({why})")
        found[(name, ab)] = t
    for name in names:
        for ab in ("lora_A", "lora_B"):
            if (name, ab) not in found:
                raise ValueError(f"{file}: tensor {KEY_PREFIX}{name}.{ab}.weight is missing (target_modules "
                                 f"{json.dumps(c['target_modules'])} includes that module)")

    if c.get("modules_to_save") and len(projector) != 4:
        raise ValueError(f"{file}: modules_to_save is [\"{PROJECTOR}\"] but the file holds {len(projector)} of the "
                         f"projector's 4 tensors ({KEY_PREFIX}model.{PROJECTOR}.linear_1.weight, ...)")
    attach(model, names, r, alpha, dropout, use_rslora)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for target, name in layer.adapted.items():
                for ab in ("lora_A", "lora_B"):
                    p, t = getattr(layer, ab)[target].weight, found[(name, ab)]
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(f"{file}: tensor {KEY_PREFIX}{name}.{ab}.weight has shape {list(t.shape)}, "
                                         f"expected {list(p.shape)} (r = {r})")
                    p.copy_(t)
    model.lora_config = dict(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=c["target_modules"],
                             base_model_name_or_path=c.get("base_model_name_or_path"))
    if projector:
        train_projector(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for ours, t in projector.items():
                if tuple(t.shape) != tuple(params[ours].shape):
                    raise ValueError(f"{file}: projector tensor for {ours} has shape {list(t.shape)}, expected "
                                     f"{list(params[ours].shape)}")
                params[ours].copy_(t)
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold each adapter into its base weight (W[rows] += s * B A, computed in float32) and put the plain
    layers back, so the parameter names are the base model's again (weights.save_weights, transformers and
    packing/quantizing read them). The parameters stay frozen. Returns the model."""
    for path, layer in lora_layers(model):
        if not isinstance(layer.base, nn.Linear):
            raise ValueError(f"merge_lora: {path} has a {type(layer.base).__name__} base; merging needs float "
                             f"weights (load the base without quantizing)")
        w, start = layer.base.weight, 0
        for name, n in layer.slices:
            if name in layer.adapted:
                delta = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float()
                w[start:start + n] = (w[start:start + n].float() + layer.scale * delta).to(w.dtype)
            start += n
        parent, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, layer.base)
    model.projector.to(model.dtype)  # trained in float32 (train_projector); the merged model is one dtype again
    model.__dict__.pop("lora_config", None)
    return model
