"""Train (or fine-tune) a LLaVA-Interleave model, nanoGPT style: one file, one loop.

    python train.py --domain all --preset tiny --max-steps 3000 --out out/tiny        # from scratch
    python train.py --init weights/minterleave-tiny --domain video --max-steps 200 --out out/ft
    python train.py --init llava-interleave-qwen-0.5b-hf --freeze vision \\
        --data m4_instruct_annotations.json --image-root M4-Instruct-Data --out out/m4   # real data
    torchrun --nproc_per_node 2 train.py ...                                           # DDP
    python train.py ... --resume                                   # continue out/... where it stopped

Data: by default synthetic samples (minterleave.tasks) made on the fly from seeds, rendered at the model's
image size: the k-th training sample of a domain has seed data.train_seed(--seed, k) >= 1e9; evaluation
(eval.py, sample.py's demo) uses seeds < 1e9, so the two never meet. --domain all cycles multi_image, video,
3d, multi_patch (--domain-weights repeats some). With --data, an M4-Instruct-style JSON (minterleave/data.py),
reshuffled each epoch from --seed. The batches of step s are a pure function of (seed, s), so --workers,
--resume and DDP all see the same samples (minterleave/streams.py).

Loss: cross-entropy on the assistant answers and their <|im_end|> only (data.py), averaged over every
supervised token of the global batch (all micro-batches, all ranks), so gradient accumulation and DDP give
the loss and update of one big batch. AdamW, linear warmup then cosine decay to lr/10, grad-norm clip 1.0.
Training from scratch uses a GPT-2 style initialisation (init_weights).

Output: --out DIR is a checkpoint folder in the llava-hf layout (config.json, model.safetensors, tokenizer and
processor files), loadable by minterleave.Model.from_pretrained and transformers' LlavaForConditionalGeneration,
plus train_log.jsonl (one JSON object per logged step) and the resume sidecar DIR/train_state/ (state.json:
step, data position, args; optimizer.safetensors: AdamW moments and the RNG state; no pickle anywhere). Every
save writes DIR.tmp and renames it into place (the previous checkpoint is moved to DIR.old first and deleted
last), so DIR, or DIR.old after a crash between the two renames, is always a complete checkpoint.
--export DIR2 writes the final model alone (no optimizer state; --export-dtype) when training ends.

The bundled checkpoint weights/minterleave-tiny: see weights/README.md for the command and its numbers.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import minterleave as mi
from minterleave import data, streams, tasks
from minterleave.config import ModelConfig, TextConfig, VisionConfig, to_llava_hf_dict
from minterleave.tokenizer import write_tokenizer_files
from minterleave.weights import save_weights

DOMAINS = tasks.DOMAINS
# Model presets for training from scratch (--init loads a checkpoint's own architecture instead).
PRESETS = {
    # the bundled model. The synthetic tasks draw 64 px images (multi-patch: 128 px, tiled into 64 px
    # quadrants); the processor resizes them to 96 px and the tower cuts 32 px patches, so an image is
    # 3 x 3 = 9 tokens and each multi-image grid cell falls in exactly one patch. ~2.1M parameters.
    "tiny": dict(image_size=96, patch_size=32, v_hidden=128, v_inter=384, v_layers=4, v_heads=4,
                 hidden=128, inter=384, layers=4, heads=4, kv_heads=2, vocab=1000, rope_theta=10000.0,
                 max_pos=2048, num_frames=4, pos_scale=0.5),
    # a toy for tests: same image pipeline, one narrow layer each, trains in seconds
    "test": dict(image_size=96, patch_size=32, v_hidden=32, v_inter=64, v_layers=1, v_heads=2,
                 hidden=48, inter=96, layers=1, heads=4, kv_heads=2, vocab=600, rope_theta=10000.0,
                 max_pos=2048, num_frames=4, pos_scale=0.5),
}
# the resume sidecar lives in a subfolder: loaders take every top-level *.safetensors for weights
STATE_DIR, LOG = "train_state", "train_log.jsonl"
STATE_JSON, STATE_TENSORS = os.path.join(STATE_DIR, "state.json"), os.path.join(STATE_DIR, "optimizer.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domain", default="all", choices=DOMAINS + ("all",), help="synthetic domain(s) to train on")
    p.add_argument("--domain-weights", default="", metavar="D=N,...",
                   help="give domain D N times the samples of the others, e.g. multi_image=2")
    p.add_argument("--qtype-weights", default="", metavar="D/Q=N,...",
                   help="within domain D, give question type Q N times the samples, e.g. multi_image/which_image=3")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture when training from scratch")
    p.add_argument("--set", default="", metavar="K=V,...", help="override preset fields, e.g. layers=3,hidden=160")
    p.add_argument("--init", default=None, metavar="DIR", help="start from this checkpoint (any supported layout)")
    p.add_argument("--data", default=None, metavar="FILE", help="M4-Instruct-style JSON instead of synthetic data")
    p.add_argument("--image-root", default=None, metavar="DIR", help="folder the --data image paths are relative to")
    p.add_argument("--video-mode", default="frames", choices=("frames", "video"),
                   help="--data records with both: use the frame list or decode the video")
    p.add_argument("--freeze", default="", help="comma list of parts to keep fixed: vision, projector")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="samples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (linear from 0)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--patch-words", type=float, default=0.0, metavar="W",
                   help="weight of an extra loss that makes each patch feature of fresh grid scenes predict the "
                        "words for its colour and shape (synthetic tasks; 0: off)")
    p.add_argument("--patch-words-images", type=int, default=16,
                   help="scenes per micro-batch per process for --patch-words")
    p.add_argument("--attn", default=None, choices=mi.attention.BACKENDS, help="attention backend (default: auto)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (bfloat16: autocast; weights and optimizer stay float32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="training seed: data stream and initialisation")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (written atomically)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save and stop after this step without ending the schedule (an interruption; resume later)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="steps between quick accuracy checks (0: never)")
    p.add_argument("--eval-n", type=int, default=64, help="questions per domain in those checks")
    p.add_argument("--export", default=None, metavar="DIR", help="at the end, also write the bare model here")
    p.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: make batches in the loop)")
    args = p.parse_args(argv)
    try:  # check the weight specs now, before anything is loaded
        streams.domain_cycle(args.domain, args.domain_weights)
        streams.qtype_cycles(args.qtype_weights)
    except ValueError as e:
        p.error(str(e))
    return args


# ----------------------------------------------------------------------------------------- set-up
def setup_distributed(args):
    """(rank, world, device) — under torchrun, DDP with gloo on CPU or nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, torch.device(device)


def preset_config(args, vocab_size, image_token_id):
    p = preset_dict(args)
    vision = VisionConfig(hidden_size=p["v_hidden"], intermediate_size=p["v_inter"], num_layers=p["v_layers"],
                          num_heads=p["v_heads"], image_size=p["image_size"], patch_size=p["patch_size"])
    text = TextConfig(vocab_size=vocab_size, hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_layers=p["layers"], num_heads=p["heads"], num_kv_heads=p["kv_heads"],
                      rope_theta=p["rope_theta"], max_position_embeddings=p["max_pos"], tie_word_embeddings=True)
    return ModelConfig(vision=vision, text=text, image_token_id=image_token_id, feature_layer=-1,
                       feature_select="full")


def preset_dict(args):
    p = dict(PRESETS[args.preset])
    for kv in filter(None, args.set.split(",")):
        k, _, v = kv.partition("=")
        if k not in p:
            raise SystemExit(f"--set: unknown preset field {k!r} (fields: {', '.join(p)})")
        p[k] = type(p[k])(float(v)) if isinstance(p[k], int) else type(p[k])(v)
    return p


def sincos_2d(grid, dim):
    """(grid * grid, dim) fixed 2D sine-cosine position embedding (MAE): half the channels encode the row,
    half the column, each at dim / 4 frequencies."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        a = coord[:, None] * omega[None, :]
        parts += [a.sin(), a.cos()]
    pe = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(pe, (0, dim - pe.shape[1])).float()


def init_weights(model, std=0.02, pos_scale=0.5):
    """GPT-2 style: normal(0, std) matrices and embeddings, residual outputs scaled by 1/sqrt(2 * layers),
    zero biases, unit norms. The ViT's position embedding starts as a 2D sine-cosine table (times
    pos_scale; still learned), so patches know where they are from the first step."""
    n_res = 2 * (len(model.decoder.layers) + len(model.vision.layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "vision.position_embedding.weight" and pos_scale:
                grid = int(round(math.sqrt(p.shape[0])))
                p.copy_(pos_scale * sincos_2d(grid, p.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")):
                p.normal_(0, std / math.sqrt(n_res))
            else:
                p.normal_(0, std)


@functools.lru_cache(maxsize=None)
def task_corpus(n_per_domain=60, seed=0):
    """Question + answer lines of the synthetic tasks (tokenizer training text for the bundled model)."""
    lines = []
    for d in DOMAINS:
        for k in range(n_per_domain):
            s = tasks.make_sample(d, data.train_seed(seed, k))
            q = s.question.replace("<image>", " ")
            lines += [q, s.answer, " ".join(s.choices)]
    return tuple(lines * 4)


def build_assets(args, assets):
    """Write tokenizer/processor files into `assets`; return (cfg, model) for a fresh or loaded model."""
    if args.init:
        for f in os.listdir(args.init):
            src = os.path.join(args.init, f)
            if os.path.isfile(src) and not f.endswith((".safetensors", ".bin", ".pt", ".pth")) \
                    and f not in (LOG, "model.safetensors.index.json"):
                shutil.copy2(src, os.path.join(assets, f))
        model = mi.Model.from_pretrained(args.init, dtype=torch.float32)
        return model.cfg, model
    p = preset_dict(args)
    info = write_tokenizer_files(assets, vocab_size=p["vocab"], image_size=p["image_size"],
                                 patch_size=p["patch_size"], num_frames=p["num_frames"],
                                 extra_corpus=task_corpus(), model_max_length=p["max_pos"])
    cfg = preset_config(args, info["vocab_size"], info["image_token_id"])
    torch.manual_seed(args.seed)
    model = mi.Model(cfg)
    init_weights(model, pos_scale=p["pos_scale"])
    return cfg, model


# ----------------------------------------------------------------------------------------- loss
class LossSum(nn.Module):
    """Sum of the token cross-entropies over supervised positions (what DDP wraps). Only the positions that
    predict a supervised token go through the output head."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, attention_mask=None, pixel_values=None, patch_pixels=None,
                patch_targets=None):
        m = self.model
        patch_loss = None
        if patch_pixels is not None:  # --patch-words: (N, P, 2) targets, the colour and shape word per patch
            f = m.image_features(patch_pixels)                          # (N, P, C)
            logp = F.log_softmax(m.decoder.logits(m.decoder.norm(f)).float(), dim=-1)  # (N, P, vocab)
            has = patch_targets[..., 0] != data.IGNORE_INDEX            # (N, P) cells with a shape
            both = logp[has].gather(1, patch_targets[has])              # (n, 2)
            patch_loss = -both.sum() / 2  # per cell: the mean over its two words
        h = m.embed(input_ids, pixel_values)
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            positions, mask = torch.arange(T, device=h.device).expand(B, T), None
        else:
            positions, mask = m.positions_and_mask(attention_mask)
        h = m.decoder(h, positions, None, mask)
        target = labels[:, 1:]
        sel = target != data.IGNORE_INDEX
        logits = m.decoder.logits(h[:, :-1][sel]).float()
        loss_sum = F.cross_entropy(logits, target[sel], reduction="sum")
        return loss_sum if patch_loss is None else (loss_sum, patch_loss)


def patch_word_batch(proc, seeds, size, word_ids):
    """--patch-words: one labelled grid scene per seed, as (pixels (n, 3, S, S), targets (n, 9, 2)) with the
    token ids of each occupied cell's colour and shape words (-100 for empty cells). A scene depends on its
    seed only, so any split of a step's seeds over processes and micro-batches trains on the same scenes."""
    pix, tgt = [], torch.full((len(seeds), 9, 2), data.IGNORE_INDEX, dtype=torch.long)
    for i, seed in enumerate(seeds):
        img, cells = tasks.grid_scene(random.Random(seed), size)
        pix.append(torch.from_numpy(proc.image_pixels(img)))
        for cell, (colour, shape) in cells.items():
            tgt[i, cell] = torch.tensor([word_ids[colour], word_ids[shape]])
    return torch.stack(pix), tgt


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    lo = args.lr * args.min_lr_ratio
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * t))


def make_optimizer(model, args):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out, model, cfg, opt, assets, state, dtype=None, with_state=True, log_dir=None):
    """Write a complete checkpoint folder to out.tmp, then rename it to out (the old one goes last)."""
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for f in os.listdir(assets):
        shutil.copy2(os.path.join(assets, f), os.path.join(tmp, f))
    conf = to_llava_hf_dict(cfg)
    conf["torch_dtype"] = "bfloat16" if dtype == torch.bfloat16 else "float32"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    if dtype is not None and dtype != model.dtype:
        model = _cast_copy(model, dtype)
    save_weights(model, tmp, cfg)
    if os.path.isfile(os.path.join(log_dir or out, LOG)):
        shutil.copy2(os.path.join(log_dir or out, LOG), os.path.join(tmp, LOG))
    if with_state:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = {"rng/torch": torch.get_rng_state()}
        for group in opt.param_groups:
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    tensors[f"{k}/{names[id(p)]}"] = v.detach().cpu().reshape(v.shape).contiguous()
        os.makedirs(os.path.join(tmp, STATE_DIR))
        save_file(tensors, os.path.join(tmp, STATE_TENSORS))
        with open(os.path.join(tmp, STATE_JSON), "w") as f:
            json.dump(state, f, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _cast_copy(model, dtype):
    import copy
    return copy.deepcopy(model).to(dtype)


def find_checkpoint(out):
    """The checkpoint to resume from: out, or out.old if a crash hit between the two renames."""
    for d in (out, out.rstrip("/") + ".old"):
        if os.path.isfile(os.path.join(d, STATE_JSON)) and os.path.isfile(os.path.join(d, "model.safetensors")):
            return d
    raise SystemExit(f"--resume: no checkpoint with {STATE_JSON} in {out}")


def load_train_state(ckpt, model, opt):
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(ckpt, STATE_TENSORS))
    params = dict(model.named_parameters())
    for key, v in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "rng":
            torch.set_rng_state(v)
            continue
        p = params[name]
        opt.state.setdefault(p, {})[kind] = v.to(p.device) if kind != "step" else v
    with open(os.path.join(ckpt, STATE_JSON)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    master = rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attn:
        mi.set_backend(args.attn)
    out = os.path.abspath(args.out)
    assets = tempfile.mkdtemp(prefix="minterleave-assets-")
    start_step, offset = 0, 0
    if args.resume:
        ckpt = find_checkpoint(out)
        for f in os.listdir(ckpt):
            if os.path.isfile(os.path.join(ckpt, f)) and f not in (LOG, "config.json") \
                    and not f.endswith(".safetensors"):
                shutil.copy2(os.path.join(ckpt, f), os.path.join(assets, f))
        model = mi.Model.from_pretrained(ckpt, dtype=torch.float32)
        cfg = model.cfg
    else:
        if master and os.path.isfile(os.path.join(out, STATE_JSON)):
            raise SystemExit(f"{out} already holds a training checkpoint: add --resume, or choose another --out")
        cfg, model = build_assets(args, assets)
    # the processor reads config.json only for the context length: give it the model's
    with open(os.path.join(assets, "config.json"), "w") as f:
        json.dump(to_llava_hf_dict(cfg), f)
    proc = mi.Processor.from_pretrained(assets)
    os.remove(os.path.join(assets, "config.json"))
    model.train().to(device)
    for part in filter(None, args.freeze.split(",")):
        if part not in ("vision", "projector"):
            raise SystemExit(f"--freeze: unknown part {part!r} (vision, projector)")
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)
    opt = make_optimizer(model, args)
    if args.resume:
        state = load_train_state(ckpt, model, opt)
        start_step, offset = state["step"], state["samples"]
        if master:  # drop log lines written after the checkpoint (a crash between saves)
            _truncate_log(os.path.join(out, LOG), start_step)

    if args.data:
        ds = data.JsonDataset(args.data, args.image_root, proc, video_mode=args.video_mode)
        stream = streams.RecordStream(ds, args.seed)
    else:
        stream = streams.SyntheticStream(streams.domain_cycle(args.domain, args.domain_weights), args.seed, proc,
                                         cfg.vision.image_size, tasks.DEFAULTS["num_frames"],
                                         streams.qtype_cycles(args.qtype_weights))
    step_fn = LossSum(model)
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(step_fn, find_unused_parameters=args.data is not None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    word_ids = None
    if args.patch_words:
        if cfg.tokens_per_image != 9 or cfg.vision.image_size != 3 * cfg.vision.patch_size:
            raise SystemExit("--patch-words needs 3x3 patches per image (image_size = 3 * patch_size)")
        word_ids = {}
        for w in tasks.COLOURS + tasks.SHAPES:
            ids = proc.encode(" " + w)
            if len(ids) != 1:
                raise SystemExit(f"--patch-words: the tokenizer splits {w!r} into {len(ids)} tokens")
            word_ids[w] = ids[0]
    G = args.batch_size * args.grad_accum * world
    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"model: {n_params / 1e6:.2f}M parameters, vision {cfg.vision.num_layers}x{cfg.vision.hidden_size}, "
              f"text {cfg.text.num_layers}x{cfg.text.hidden_size}, vocab {cfg.text.vocab_size}, "
              f"{cfg.tokens_per_image} tokens/image; {world} process(es), global batch {G}; "
              f"steps {start_step}->{args.max_steps}", flush=True)
    steps = streams.StepBatches(stream, offset, args.batch_size, args.grad_accum, rank, world, proc.pad_token_id,
                                max(0, args.max_steps - start_step))
    loader = iter(torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=args.workers,
                                              prefetch_factor=4 if args.workers else None))
    t0, tokens_seen, done, stop = time.time(), 0, start_step, False
    for step in range(start_step, args.max_steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [{k: v.to(device) for k, v in b.items()} for b in next(loader)]
        n_sup = torch.tensor(float(sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in batches)),
                             device=device)
        n_tok = torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in batches)), device=device)
        patch, n_cells = [None] * len(batches), torch.ones((), device=device)
        if word_ids is not None:  # scene k of this step, whichever process and micro-batch draws it
            n = args.patch_words_images
            patch = [patch_word_batch(proc, [f"{args.seed}-{step}-{(m * world + rank) * n + i}" for i in range(n)],
                                      cfg.vision.image_size, word_ids) for m in range(len(batches))]
            n_cells = torch.tensor(float(sum(int((t[..., 0] != data.IGNORE_INDEX).sum()) for _, t in patch)),
                                   device=device)
        if world > 1:
            dist.all_reduce(n_sup)
            dist.all_reduce(n_tok)
            dist.all_reduce(n_cells)
        total, patch_total = torch.zeros((), device=device), torch.zeros((), device=device)
        for m, b in enumerate(batches):
            sync = contextlib.nullcontext() if world == 1 or m == len(batches) - 1 else step_fn.no_sync()
            with sync:
                with autocast:
                    if word_ids is None:
                        loss_sum = step_fn(b["input_ids"], b["labels"], b["attention_mask"], b.get("pixel_values"))
                        extra = 0.0
                    else:
                        pp, pt = patch[m]
                        loss_sum, patch_sum = step_fn(b["input_ids"], b["labels"], b["attention_mask"],
                                                      b.get("pixel_values"), pp.to(device), pt.to(device))
                        extra = args.patch_words * patch_sum * (world / n_cells)
                        patch_total += patch_sum.detach()
                # DDP averages gradients over ranks: scale by world so the result is the global mean
                (loss_sum * (world / n_sup) + extra).backward()
            total += loss_sum.detach()
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(patch_total)
        loss = float(total / n_sup)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        offset += G
        tokens_seen += int(n_tok)
        done = step + 1
        if master and (done % args.log_every == 0 or done == args.max_steps or step == start_step):
            el = time.time() - t0
            tps = tokens_seen / max(el, 1e-9)
            eta = el / (done - start_step) * (args.max_steps - done)
            rec = {"step": done, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1), "elapsed_s": round(el, 1),
                   "samples": offset}
            words = ""
            if word_ids is not None:
                rec["patch_loss"] = float(patch_total / n_cells)
                words = f"patch words {rec['patch_loss']:.3f} | "
            print(f"step {done:6d} | loss {loss:.4f} | {words}lr {lr:.2e} | {tps:7.0f} tok/s | "
                  f"elapsed {el / 60:5.1f} min | ETA {eta / 60:5.1f} min", flush=True)
            _append_log(out, rec)
        if args.eval_every and done % args.eval_every == 0 and done < args.max_steps and master:
            _quick_eval(model, proc, args, out, done)
        stop = args.stop_at is not None and done >= args.stop_at
        if done % args.save_every == 0 or done == args.max_steps or stop:
            state = {"step": done, "samples": offset, "global_batch": G, "world_size": world,
                     "args": vars(args), "data": "json" if args.data else "synthetic"}
            if master:
                save_checkpoint(out, model, cfg, opt, assets, state)
            if world > 1:
                dist.barrier()
        if stop:
            break
    if master and args.export and not stop:
        dtype = torch.bfloat16 if args.export_dtype == "bfloat16" else torch.float32
        save_checkpoint(args.export, model, cfg, opt, assets, {}, dtype=dtype, with_state=False, log_dir=out)
        print(f"exported {args.export} ({args.export_dtype})", flush=True)
    if args.eval_every and master and not stop:
        _quick_eval(model, proc, args, out, args.max_steps)
    if master:
        print(f"{'stopped' if stop else 'done'}: {done} steps, {(time.time() - t0) / 60:.1f} min; "
              f"checkpoint {out}", flush=True)
    shutil.rmtree(assets, ignore_errors=True)
    if world > 1:
        dist.destroy_process_group()


def _append_log(out, rec):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOG), "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_log(path, step):
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def _quick_eval(model, proc, args, out, step):
    from eval import evaluate_synthetic
    model.eval()
    domains = DOMAINS if args.domain == "all" or args.data else (args.domain,)
    rec = {"step": step, "eval": {}}
    for d in domains:
        res = evaluate_synthetic(model, proc, d, args.eval_n, seed=99)
        rec["eval"][d] = round(res["accuracy"], 3)
    print(f"eval step {step}: " + "  ".join(f"{d} {a:.3f}" for d, a in rec["eval"].items()), flush=True)
    _append_log(out, rec)
    model.train()


if __name__ == "__main__":
    sys.exit(main())
