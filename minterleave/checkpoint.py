"""Writing checkpoints: llava-hf-layout folders (atomic), the training state for --resume, the training log.

weights.py is the one reader of model weights; this module is the one writer. A checkpoint folder holds

    config.json  model.safetensors  tokenizer.json ...    what any loader needs (the llava-hf layout, so
                                                          transformers' LlavaForConditionalGeneration reads it)
    train_log.jsonl                                       one JSON object per logged step (training runs)
    train_state/optimizer.safetensors                     AdamW moments and the torch RNG state (no pickle)
    train_state/state.json                                step, samples consumed, args, and the size of every
                                                          other file: written last, it marks the folder complete

The sidecar lives in a subfolder because loaders take every top-level *.safetensors as weights. A LoRA run
(train.py --lora-r) saves its adapter instead of config.json + model.safetensors: adapter_config.json and
adapter_model.safetensors in PEFT's format (lora.py), whose base is the run's --init.

Saving never destroys the last good checkpoint: every file is written (and fsynced) into OUT.tmp, the manifest
last; then OUT is renamed to OUT.old, OUT.tmp to OUT, and OUT.old is deleted. A crash between any two of these
steps leaves at least one complete folder among OUT, OUT.tmp and OUT.old, and `recover` finds the newest
complete one and puts it back at OUT (tests/test_faults.py injects a crash after every step).
"""

import copy
import json
import os
import shutil

import torch

from . import lora
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
                LOG, "config.json", "model.safetensors.index.json", "adapter_config.json"):
            shutil.copy2(path, os.path.join(dst, f))


def _step(name):
    """Called after each step of `save` (a no-op; tests/test_faults.py makes it raise to simulate a crash)."""


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out, model, assets, dtype=None, optimizer=None, state=None, log_file=None, optimizer_state=None):
    """Write model (+ optimizer/state when given) as a complete checkpoint folder `out`, atomically.

    assets: a folder with the tokenizer/processor files to include. dtype: cast the saved weights
    (e.g. torch.bfloat16 for export; the model itself is untouched). log_file: a train_log.jsonl to include.
    optimizer_state: instead of `optimizer`, its tensors already gathered ({"<moment>/<parameter>": tensor}, what
    optimizer_tensors gives; FSDP's shards are gathered by distributed.full_state).
    Refuses (ValueError, nothing written) a model with a NaN or Inf weight: it never replaces a good one."""
    from safetensors.torch import save_file
    adapter = bool(lora.lora_layers(model))  # a LoRA run saves (and so checks) its trainable parameters alone
    bad = next((n for n, p in model.named_parameters()
                if (p.requires_grad or not adapter) and not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise ValueError(f"{out}: not saved, parameter {bad} holds NaN/Inf (the previous checkpoint is kept)")
    out = os.path.abspath(out)
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    _step("clear tmp")
    copy_assets(assets, tmp)
    _step("assets")
    if adapter:  # a LoRA run: the adapter alone, in PEFT's format (its base is --init)
        lora.save_adapter(model, tmp)
        _step("config")
        _step("weights")
    else:
        conf = to_llava_hf_dict(model.cfg)
        conf["torch_dtype"] = "bfloat16" if (dtype or model.dtype) == torch.bfloat16 else "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(conf, f, indent=2)
        _step("config")
        save_weights(model if dtype in (None, model.dtype) else copy.deepcopy(model).to(dtype), tmp, model.cfg)
        _step("weights")
    if log_file and os.path.isfile(log_file):
        shutil.copy2(log_file, os.path.join(tmp, LOG))
        _step("log")
    if optimizer is not None or optimizer_state is not None:  # a training checkpoint: its state, then the manifest
        os.makedirs(os.path.join(tmp, STATE_DIR))
        tensors = optimizer_tensors(model, optimizer) if optimizer_state is None else {
            "rng/torch": torch.get_rng_state(), **optimizer_state}
        save_file(tensors, os.path.join(tmp, STATE_TENSORS))
        _step("optimizer")
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                path = os.path.join(root, name)
                _fsync(path)
                if name != LOG:  # the log keeps growing in the live folder; resume cuts it back to the step
                    files[os.path.relpath(path, tmp)] = os.path.getsize(path)
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(dict(state or {}, files=files), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _step("manifest")
    shutil.rmtree(old, ignore_errors=True)
    _step("clear old")
    if os.path.isdir(out):
        os.rename(out, old)
        _step("out -> old")
    os.rename(tmp, out)
    _fsync(os.path.dirname(out))
    _step("tmp -> out")
    shutil.rmtree(old, ignore_errors=True)
    _step("remove old")


def optimizer_tensors(model, optimizer):
    """{"<state key>/<parameter name>": tensor} for every optimizer state entry, plus the torch RNG."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {"rng/torch": torch.get_rng_state()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                tensors[f"{k}/{names[id(p)]}"] = v.detach().cpu().contiguous()
    return tensors


def read_state(folder):
    """state.json of a complete checkpoint folder (every file its manifest lists is there, at its size), else
    None: a folder a crash cut short is never taken for a checkpoint."""
    try:
        with open(os.path.join(folder, STATE_JSON)) as f:
            state = json.load(f)
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    return state


def find_latest(out):
    """The newest complete training checkpoint among out, out.tmp and out.old (what a crash during a save
    leaves; see the module docstring), or None."""
    out = os.path.abspath(out)
    found = [(s.get("step", 0), d) for d in (out, out + ".tmp", out + ".old") if (s := read_state(d)) is not None]
    return max(found)[1] if found else None


def prepare(out, resume):
    """Before any training work: refuse an --out that cannot be written (PermissionError) or that already holds a
    run when not resuming (ValueError); when resuming, `recover` it (FileNotFoundError if nothing is there)."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        raise PermissionError(f"--out {out}: cannot write there")
    if resume and recover(out) is None:
        raise FileNotFoundError(f"--resume: no complete training checkpoint in {out} (nor {out}.tmp / {out}.old)")
    if not resume and find_latest(out):
        raise ValueError(f"--out {out} already holds a training checkpoint: add --resume, or choose another --out")


def recover(out):
    """Put the newest complete checkpoint back at `out` after a crash during a save (out.tmp finished but not
    yet renamed, or out moved to out.old); remove the leftovers. Returns out, or None if there is none."""
    out = os.path.abspath(out)
    best = find_latest(out)
    if best is None:
        return None
    if best != out:
        aside = out + ".broken"
        shutil.rmtree(aside, ignore_errors=True)
        if os.path.isdir(out):
            os.rename(out, aside)  # incomplete: never deleted before the good one is in place
        os.rename(best, out)
        shutil.rmtree(aside, ignore_errors=True)
    for d in (out + ".tmp", out + ".old"):
        shutil.rmtree(d, ignore_errors=True)
    return out


def load_state(ckpt, model, optimizer):
    """Restore the optimizer moments and the RNG saved with `ckpt` into `optimizer`; returns state.json. Under FSDP
    each process keeps its shard of every moment, whatever the number of processes that saved them."""
    from safetensors.torch import load_file
    from .distributed import shard_like
    params = dict(model.named_parameters())
    for key, v in load_file(os.path.join(ckpt, STATE_TENSORS)).items():
        kind, _, name = key.partition("/")
        if kind == "rng":
            torch.set_rng_state(v)
        else:
            p = params[name]
            optimizer.state.setdefault(p, {})[kind] = shard_like(v.to(p.device), p) if kind != "step" else v
    return read_state(ckpt)


def append_log(out, record):
    """One JSON line in out/train_log.jsonl."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOG), "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out, step):
    """Keep the log lines up to `step`: drop those written after it (a crash between two saves leaves some
    behind) and a torn line (a crash in the middle of writing one). Returns how many lines were dropped."""
    path = os.path.join(out, LOG)
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                good = json.loads(line).get("step", 0) <= step
            except ValueError:  # torn
                good = False
            if good:
                keep.append(line.rstrip("\n") + "\n")
            dropped += not good
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return dropped
