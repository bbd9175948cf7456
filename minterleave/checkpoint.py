"""Writing checkpoints: llava-hf-layout folders (atomic), the training state for --resume, the training log.

weights.py is the one reader of model weights; this module is the one writer. A checkpoint folder holds

    config.json  model.safetensors  tokenizer.json ...    what any loader needs (the llava-hf layout, so
                                                          transformers' LlavaForConditionalGeneration reads it)
    train_log.jsonl                                       one JSON object per logged step (training runs)
    train_state/state.json                                step, samples consumed, args
    train_state/optimizer.safetensors                     AdamW moments and the torch RNG state (no pickle)

The sidecar lives in a subfolder because loaders take every top-level *.safetensors as weights.

Saving is atomic: everything is written to OUT.tmp, the previous checkpoint is renamed to OUT.old, OUT.tmp
to OUT, and OUT.old is deleted last. So at every instant OUT or OUT.old is a complete checkpoint, and
`find_latest` returns whichever is.
"""

import copy
import json
import os
import shutil

import torch

from .config import to_llava_hf_dict
from .weights import save_weights

STATE_DIR, LOG = "train_state", "train_log.jsonl"
STATE_JSON, STATE_TENSORS = os.path.join(STATE_DIR, "state.json"), os.path.join(STATE_DIR, "optimizer.safetensors")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


def copy_assets(src, dst):
    """Copy a checkpoint's non-weight files (tokenizer, processor and generation configs) from src to dst,
    leaving out config.json (it is written from the model's config), weights, logs and training state."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        path = os.path.join(src, f)
        if os.path.isfile(path) and not f.endswith(WEIGHT_FILES) and f not in (
                LOG, "config.json", "model.safetensors.index.json"):
            shutil.copy2(path, os.path.join(dst, f))


def save(out, model, assets, dtype=None, optimizer=None, state=None, log_file=None):
    """Write model (+ optimizer/state when given) as a complete checkpoint folder `out`, atomically.

    assets: a folder with the tokenizer/processor files to include. dtype: cast the saved weights
    (e.g. torch.bfloat16 for export; the model itself is untouched). log_file: a train_log.jsonl to include."""
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    copy_assets(assets, tmp)
    conf = to_llava_hf_dict(model.cfg)
    conf["torch_dtype"] = "bfloat16" if (dtype or model.dtype) == torch.bfloat16 else "float32"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    save_weights(model if dtype in (None, model.dtype) else copy.deepcopy(model).to(dtype), tmp, model.cfg)
    if log_file and os.path.isfile(log_file):
        shutil.copy2(log_file, os.path.join(tmp, LOG))
    if optimizer is not None:
        os.makedirs(os.path.join(tmp, STATE_DIR))
        save_file(optimizer_tensors(model, optimizer), os.path.join(tmp, STATE_TENSORS))
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(state or {}, f, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def optimizer_tensors(model, optimizer):
    """{"<state key>/<parameter name>": tensor} for every optimizer state entry, plus the torch RNG."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {"rng/torch": torch.get_rng_state()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"{k}/{names[id(p)]}"] = v.detach().cpu().contiguous()
    return tensors


def find_latest(out):
    """The checkpoint folder to resume from: out, or out.old if a crash hit between the two renames; None
    if neither holds a training state."""
    for d in (out, out.rstrip("/") + ".old"):
        if os.path.isfile(os.path.join(d, STATE_JSON)) and os.path.isfile(os.path.join(d, "model.safetensors")):
            return d
    return None


def load_state(ckpt, model, optimizer):
    """Restore the optimizer moments and the RNG saved with `ckpt` into `optimizer`; returns state.json."""
    from safetensors.torch import load_file
    params = dict(model.named_parameters())
    for key, v in load_file(os.path.join(ckpt, STATE_TENSORS)).items():
        kind, _, name = key.partition("/")
        if kind == "rng":
            torch.set_rng_state(v)
        else:
            p = params[name]
            optimizer.state.setdefault(p, {})[kind] = v.to(p.device) if kind != "step" else v
    with open(os.path.join(ckpt, STATE_JSON)) as f:
        return json.load(f)


def append_log(out, record):
    """One JSON line in out/train_log.jsonl."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOG), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out, step):
    """Drop log lines written after `step` (a crash between two saves leaves some behind)."""
    path = os.path.join(out, LOG)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)
