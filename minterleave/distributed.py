"""Training across processes and machines: DDP, or FSDP2 (fully sharded data parallel) for models that do not fit.

    torchrun --nproc_per_node 2 train.py ... --fsdp        # 2 processes, each holding half of every weight

DDP keeps a whole copy of the model, its gradients and its AdamW moments on every process (16 bytes per fp32
parameter). FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps 1/world of each: every decoder and vision layer is
its own unit whose weights are all-gathered just before its forward (and again in backward) and dropped right
after, and whose gradients are reduce-scattered so each process updates only its shard. An untied head and the
embeddings are units too; the rest (projector, norms, a tied embedding) is the root unit, sharded last. The
parameters become DTensors (a shard plus the layout); the model's code does not change. Mixed precision is
FSDP's own: bf16 weights all-gathered and computed with, fp32 shards updated and gradients reduced in fp32.

Two rules follow from the collectives (every process must issue the same ones in the same order):
  * every process runs every unit in every micro-batch: a batch without images still runs the vision tower (on one
    blank image whose output is multiplied by zero, Model.always_run_vision);
  * saving gathers each tensor with a collective on all processes; rank 0 alone writes the ordinary checkpoint
    (safetensors, llava-hf layout or a PEFT adapter), so a run resumes under any number of processes, FSDP or not.
Reference: PyTorch's FSDP2 tutorial and torchtitan (per-block fully_shard, root last).
"""

import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn as nn


def setup(device=None):
    """(rank, world, device): under torchrun, the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def shard(model, device, bf16=False):
    """FSDP2 in place: each vision and decoder layer a unit, then the root; the shards on `device`. bf16: weights
    all-gathered and used in bfloat16, gradients reduced in float32 (the optimizer's shards keep their dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    units = [*model.vision.layers, *model.decoder.layers]
    if model.decoder.lm_head is not None:  # untied (7B): the two 152k-row matrices are a fifth of the model; each
        units += [model.decoder.embed_tokens, model.decoder.lm_head]  # gathered only while used, not all along
    for unit in units:  # (a tied head is read as embed_tokens.weight outside that module's forward: root it stays)
        fully_shard(unit, mp_policy=mp)
    # A frozen tied embedding (LoRA on the 0.5B model: 36% of it) is kept whole on every process instead: gathering
    # it would hold it twice over for the whole step (root units stay gathered from forward to backward).
    embed = model.decoder.embed_tokens.weight
    frozen = {embed} if model.decoder.lm_head is None and not embed.requires_grad else set()
    fully_shard(model, mp_policy=mp, ignored_params=frozen)
    for p in frozen:
        p.data = p.data.to(device)
    model.always_run_vision = True
    return model


def is_sharded(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(t):
    """The whole tensor of a (possibly sharded) parameter or optimizer state. Collective on sharded ones: every
    process must call it, in the same order."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(value, param):
    """A full tensor `value` cut to this process's shard of `param` (no communication: every process holds value)."""
    if not is_sharded(param):
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.detach().to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def grad_norm(model, max_norm):
    """clip_grad_norm_ over all parameters; the total norm as a plain tensor (FSDP returns a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return full(norm)


def full_state(model, optimizer, master, trainable_only=False):
    """({name: full parameter}, {"<moment>/<name>": full optimizer state}) on rank 0, gathered one tensor at a time
    (a non-master process holds one full tensor at most, and returns two empty dicts). trainable_only: leave the
    frozen parameters out (a LoRA run saves the adapter alone: its base need not be gathered)."""
    params, moments = {}, {}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = full(p.detach())
        if master:
            params[name] = t.cpu()
        for k, v in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
            v = full(v)
            if master:
                moments[f"{k}/{name}"] = v.detach().cpu().contiguous()
    return params, moments


@contextlib.contextmanager
def swapped(model, params):
    """Within the block, `model`'s parameters are the plain tensors `params` ({name: tensor}), so the ordinary
    writers (checkpoint.save, lora.save_adapter) see a whole model; the shards are put back after."""
    saved = []
    for name, t in params.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        saved.append((module, attr, module._parameters[attr]))
        module._parameters[attr] = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
    try:
        yield model
    finally:
        for module, attr, p in saved:
            module._parameters[attr] = p
