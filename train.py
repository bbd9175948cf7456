"""Train (or fine-tune) a LLaVA-Interleave model, nanoGPT style: one file, one loop.

    python train.py --domain all --preset tiny --max-steps 3000 --out out/tiny        # from scratch
    python train.py --init weights/minterleave-tiny --domain video --max-steps 200 --out out/ft
    python train.py --init llava-hf/llava-interleave-qwen-0.5b-hf --freeze vision \\
        --data m4_instruct_annotations.json --image-root M4-Instruct-Data --out out/m4   # real data
    torchrun --nproc_per_node 2 train.py ...                                           # DDP
    torchrun --nproc_per_node 2 train.py ... --fsdp                       # FSDP2: each process holds 1/2 of it all
    python train.py ... --resume                                   # continue out/... where it stopped
    python train.py --init weights/minterleave-tiny --lora-r 8 --domain video --out out/lora   # a LoRA adapter

Data: synthetic samples (minterleave.tasks) made on the fly from training-range seeds, or an M4-Instruct-style
JSON (--data; minterleave/data.py). The batches of step s are a pure function of (seed, s), so --workers,
--resume and DDP all see the same samples (minterleave/streams.py).
Loss: the model's own (Model.forward with labels, checked against transformers by tests/test_loss_parity.py),
divided by the supervised tokens of the whole global batch (num_items_in_batch), so gradient accumulation and
DDP give the update of one big batch; --patch-words adds minterleave/tasks/patch_words.py's auxiliary loss.
AdamW, linear warmup then cosine decay to lr * --min-lr-ratio, grad-norm clip.
Output: --out DIR, a llava-hf-layout checkpoint (minterleave and transformers load it) with train_log.jsonl and
the resume state, written atomically (minterleave/checkpoint.py); --export DIR2 the bare model at the end.
"""

import argparse
import contextlib
import copy
import math
import os
import resource
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import minterleave as mi
from minterleave import checkpoint, cli, data, distributed, hub, lora, scoring, streams, tasks
from minterleave.config import IGNORE_INDEX, PRESETS, preset, preset_config
from minterleave.quantize import quantize_int8
from minterleave.tasks import patch_words
from minterleave.tokenizer import write_tokenizer_files

def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=type("Fmt", (argparse.RawDescriptionHelpFormatter,
                                                             argparse.ArgumentDefaultsHelpFormatter), {}))
    domains = tuple(tasks.DOMAINS) + tuple(tasks.EXTRA) + ("all",)
    p.add_argument("--domain", default="all", choices=domains, help="synthetic domain(s) to train on")
    p.add_argument("--domain-weights", default="", metavar="D=N,...",
                   help="give domain D N times the samples of the others, e.g. multi_image=2")
    p.add_argument("--qtype-weights", default="", metavar="D/Q=N,...",
                   help="within domain D, give question type Q N times the samples, e.g. multi_image/which_image=3")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture when training from scratch")
    p.add_argument("--set", default="", metavar="K=V,...", help="override preset fields, e.g. layers=3,hidden=160")
    p.add_argument("--init", default=None, metavar="DIR", help="start from this checkpoint (folder or hub id)")
    p.add_argument("--data", default=None, metavar="FILE", help="M4-Instruct-style JSON instead of synthetic data")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder the --data image paths are relative to (default: the JSON's folder)")
    p.add_argument("--video-mode", default="frames", choices=("frames", "video"),
                   help="--data records with both: use the frame list or decode the video")
    p.add_argument("--freeze", default="", help="comma list of parts to keep fixed: vision, projector")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps in all (the schedule's length)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (linear from 0)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay of matrices")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    p.add_argument("--patch-words", type=float, default=0.0, metavar="W",
                   help="weight of the auxiliary loss in which each patch feature of fresh grid scenes predicts the "
                        "words for its colour and shape (synthetic tasks; 0: off)")
    p.add_argument("--patch-words-images", type=int, default=16, help="scenes per micro-batch per process")
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
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--eval-every", type=int, default=0, help="steps between quick accuracy checks (0: never)")
    p.add_argument("--eval-n", type=int, default=64, help="questions per domain in those checks")
    p.add_argument("--export", default=None, metavar="DIR", help="at the end, also write the bare model here")
    p.add_argument("--export-dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of --export")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (0: make batches in the loop)")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N steps whose loss or gradient is NaN/Inf (a warning each) instead of stopping")
    p.add_argument("--no-check-finite", action="store_true", help="skip the NaN/Inf check of --init weights")
    p.add_argument("--lora-r", type=int, default=0, metavar="R",
                   help="train a LoRA adapter of rank R on the frozen --init model instead of every weight (0: off)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: the update is alpha/r * BA")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=",".join(lora.DEFAULT_TARGETS),
                   help="official projection names to adapt (vision: q_proj,k_proj,v_proj,out_proj,fc1,fc2)")
    p.add_argument("--lora-parts", default="decoder", help="where: decoder and/or vision; add projector to train it fully too")
    p.add_argument("--base-dtype", default="float32", choices=("float32", "bfloat16", "int8"),
                   help="with --lora-r: the frozen base's dtype (the adapter stays float32); int8: the base loaded "
                        "in bfloat16, its decoder then quantized to int8 weight-only (quantize.py; not with --merge)")
    p.add_argument("--merge", action="store_true",
                   help="with --lora-r and --export: write the merged full model (else the adapter alone)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each decoder and vision layer in backward instead of keeping its activations")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the processes (FSDP2, "
                        "minterleave/distributed.py) instead of replicating them (DDP)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    try:  # check the weight specs and parts now, before anything is loaded
        streams.domain_cycle(args.domain, args.domain_weights)
        streams.qtype_cycles(args.qtype_weights)
        preset(args.preset, args.set)
    except ValueError as e:
        p.error(str(e))
    if args.lora_r and not args.init:
        p.error("--lora-r needs --init: an adapter is trained on a pretrained model")
    parts = args.lora_parts.split(",")
    if set(parts) - {"decoder", "vision", "projector"} or not set(parts) & {"decoder", "vision"}:
        p.error(f"--lora-parts {args.lora_parts!r}: decoder and/or vision, and projector to train it fully too")
    if args.merge and args.base_dtype == "int8":
        p.error("--merge needs float base weights: use --base-dtype float32 or bfloat16, not int8")
    if args.fsdp and args.patch_words:
        p.error("--patch-words does not combine with --fsdp (its loss runs the vision tower outside the sharded forward)")
    if args.fsdp and args.eval_every:
        p.error("--eval-every does not combine with --fsdp: evaluate the saved checkpoint with eval.py")
    bad = [part for part in filter(None, args.freeze.split(",")) if part not in ("vision", "projector")]
    if bad:
        p.error(f"--freeze: unknown part {bad[0]!r} (vision, projector)")
    return args


def build_model(args, assets):
    """The model to train, and its tokenizer/processor files written into `assets`: a checkpoint's own
    (--init, --resume) or, from scratch, a new tokenizer and a preset architecture."""
    src = os.path.abspath(args.out) if args.resume else args.init
    if src:
        src = hub.resolve(src)  # a folder, or a hub id fetched into the hub cache
        checkpoint.copy_assets(src, assets)
        if not args.lora_r:
            return mi.Model.from_pretrained(src, dtype=torch.float32, check_finite=not args.no_check_finite), src
        # LoRA: the frozen base always comes from --init; a resumed run's checkpoint holds the adapter alone
        int8 = args.base_dtype == "int8"
        model = mi.Model.from_pretrained(args.init, dtype=torch.bfloat16 if int8 else getattr(torch, args.base_dtype),
                                         check_finite=not args.no_check_finite)
        if int8:  # before the adapters are added: they wrap the int8 layers
            quantize_int8(model)
        if args.resume:
            return lora.load_adapter(model, src), src
        torch.manual_seed(args.seed)
        return lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets.split(","),
                             args.lora_parts.split(",")), src
    p = preset(args.preset, args.set)
    info = write_tokenizer_files(assets, vocab_size=p["vocab"], image_size=p["image_size"], patch_size=p["patch_size"],
                                 num_frames=p["num_frames"], extra_corpus=tasks.corpus(), model_max_length=p["max_pos"])
    torch.manual_seed(args.seed)
    cfg = preset_config(p, info["vocab_size"], info["image_token_id"])
    return mi.Model(cfg).init_weights(pos_scale=p["pos_scale"]), None


def make_stream(args, proc, cfg):
    """The training samples (streams.py), and the patch-word ids when --patch-words is on (else None)."""
    if args.data:
        stream = streams.RecordStream(data.JsonDataset(args.data, args.image_root, proc, video_mode=args.video_mode),
                                      args.seed)
    else:
        stream = streams.SyntheticStream(streams.domain_cycle(args.domain, args.domain_weights), args.seed, proc,
                                         cfg.vision.image_size, proc.num_frames, streams.qtype_cycles(args.qtype_weights))
    if not args.patch_words:
        return stream, None
    patch_words.check_grid(cfg)
    return stream, patch_words.word_ids(proc)


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


def train_step(model, net, batches, scenes, args, world, device):
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in `model`). Returns the
    step's mean loss, mean patch-word loss (None without --patch-words) and its number of tokens, each over all
    ranks. `net` is the model or its DDP wrapper; `scenes` the patch-word (pixels, targets) per micro-batch."""
    def global_sum(x):
        x = torch.as_tensor(x, dtype=torch.float32, device=device)
        if world > 1:
            dist.all_reduce(x)
        return x
    n_items = global_sum(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches))
    n_cells = global_sum(sum(int((t[..., 0] != IGNORE_INDEX).sum()) for _, t in scenes)) if scenes else None
    fsdp = args.fsdp and world > 1
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" and not fsdp
                else contextlib.nullcontext())  # FSDP casts the weights itself (distributed.shard)
    total, patch_total = torch.zeros((), device=device), torch.zeros((), device=device)
    for m, b in enumerate(batches):
        b = {k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
        last = m == len(batches) - 1
        if fsdp:  # reduce-scatter the gradients once, after the step's last micro-batch
            model.set_requires_gradient_sync(last)
        sync = contextlib.nullcontext() if world == 1 or fsdp or last else net.no_sync()
        with sync, autocast:
            # DDP and FSDP average gradients over ranks: dividing by n_items / world makes that the global mean
            _, loss = net(b["input_ids"], b.get("pixel_values"), attention_mask=b["attention_mask"],
                          labels=b["labels"], num_items_in_batch=n_items / world, return_logits=False)
            extra = 0.0
            if scenes:
                patch_sum, _ = patch_words.loss_sum(model, scenes[m][0].to(device), scenes[m][1].to(device))
                extra = args.patch_words * patch_sum * (world / n_cells)
                patch_total += patch_sum.detach()
        (loss + extra).backward()
        total += loss.detach()
    n_tokens = global_sum(sum(int(b["attention_mask"].sum()) for b in batches))
    return (float(global_sum(total) / world), float(global_sum(patch_total) / n_cells) if scenes else None,
            int(n_tokens))


def return_freed_memory(threshold=1 << 20):
    """Make glibc give freed tensors back to the OS. By default it raises its mmap threshold (up to 32 MiB) each time a
    large block is freed, and blocks under it then come from the heap, which keeps what is freed: resident memory
    grows by the step's transient buffers and never shrinks (FSDP's gathers: 3.2 GiB per process instead of 1.6 for a
    LoRA step on the 0.5B model; 2.6 instead of 2.2 in one process). A fixed threshold (mallopt M_MMAP_THRESHOLD,
    which also stops the adjustment) keeps every block over 1 MiB in its own mapping, unmapped when freed. The
    price, fresh pages for each such block: ~5% of the tiny preset's step time (40 steps, noisy; 4 MiB: ~1.5% but
    2.0 GiB for that FSDP step), less for larger models, whose steps are longer per byte allocated."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): their allocators behave differently; nothing to do


def main(argv=None):
    args = parse_args(argv)
    return_freed_memory()
    rank, world, device = distributed.setup(args.device)
    master, out = rank == 0, os.path.abspath(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    mi.set_backend(args.attn)
    if master:  # refuse an unwritable --out or one whose run would be overwritten; recover after a crash
        checkpoint.prepare(out, args.resume)
    if world > 1:
        dist.barrier()
    assets = tempfile.mkdtemp(prefix="minterleave-assets-")
    try:
        return train(args, out, assets, rank, world, device)
    finally:  # nothing half-written stays behind, whatever stopped the run
        shutil.rmtree(assets, ignore_errors=True)
        if world > 1:
            dist.destroy_process_group()


def train(args, out, assets, rank, world, device):
    master = rank == 0
    model, src = build_model(args, assets)
    cfg, proc = model.cfg, mi.Processor.from_pretrained(assets)
    model.train().set_grad_checkpointing(args.grad_checkpoint)
    for part in filter(None, args.freeze.split(",")):
        getattr(model, part).requires_grad_(False)
    fsdp = args.fsdp and world > 1
    if fsdp:  # every process read the whole checkpoint on the CPU; only its shards go to the device
        distributed.shard(model, device, bf16=args.dtype == "bfloat16")
    else:
        model.to(device)
    opt = make_optimizer(model, args)
    load_peak, resident = peak_rss_gib(reset=True), peak_rss_gib(field="VmRSS")  # then the log's "peak" is the steps' own
    start_step, offset = 0, 0
    if args.resume:
        state = checkpoint.load_state(src, model, opt)
        start_step, offset = state["step"], state["samples"]
        if master:
            checkpoint.truncate_log(out, start_step)
    stream, words = make_stream(args, proc, cfg)
    net = model if world == 1 or fsdp else torch.nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=args.data is not None)
    G = args.batch_size * args.grad_accum * world
    if args.fsdp and world == 1 and master:
        print("note: --fsdp in a single process shards nothing (start it with torchrun --nproc_per_node N)", flush=True)
    if master:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vision "
              f"{cfg.vision.num_layers}x{cfg.vision.hidden_size}, text {cfg.text.num_layers}x{cfg.text.hidden_size}, "
              f"vocab {cfg.text.vocab_size}, {cfg.tokens_per_image} tokens/image; {world} process(es){' (FSDP)' * fsdp}, global batch "
              f"{G}; steps {start_step}->{args.max_steps}; memory {resident:.2f} GiB (peak {load_peak:.2f} while loading)", flush=True)
    steps = streams.StepBatches(stream, offset, args.batch_size, args.grad_accum, rank, world, proc.pad_token_id,
                                max(0, args.max_steps - start_step))
    loader = iter(torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=args.workers,
                                              prefetch_factor=4 if args.workers else None))
    t0, tokens_seen, done, stop, skipped, last_good = time.time(), 0, start_step, False, 0, (start_step, float("nan"))
    for step in range(start_step, args.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batches, n = next(loader), args.patch_words_images
        scenes = [patch_words.batch(proc, [f"{args.seed}-{step}-{(m * world + rank) * n + i}" for i in range(n)],
                                    cfg.vision.image_size, words) for m in range(len(batches))] if words else []
        loss, patch_loss, n_tokens = train_step(model, net, batches, scenes, args, world, device)
        norm = distributed.grad_norm(model, args.grad_clip or float("inf"))
        if math.isfinite(loss) and bool(torch.isfinite(norm)):
            opt.step()
            last_good = (step + 1, loss)
        else:  # no update: the weights (and the last checkpoint) stay as they were
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", float(norm))
            ids = [str(i) for b in batches for i in b.get("ids", [])]
            what = (f"step {step + 1}: the {what} is {value} (samples {', '.join(ids[:8])}{', ...' * (len(ids) > 8)}); "
                    f"last good loss {last_good[1]:.4f} at step {last_good[0]}")
            if skipped >= args.skip_nonfinite:
                raise FloatingPointError(f"{what}; {out} keeps the last checkpoint (--skip-nonfinite N skips such steps)")
            skipped += 1
            print(f"warning: {what}; skipped ({skipped} of --skip-nonfinite {args.skip_nonfinite})", file=sys.stderr)
        opt.zero_grad(set_to_none=True)
        offset, done = offset + G, step + 1
        tokens_seen += n_tokens
        if master and math.isfinite(loss) and (done % args.log_every == 0 or done == args.max_steps or step == start_step):
            log_step(out, done, loss, patch_loss, lr_at(step, args), tokens_seen, t0, start_step, args, offset)
        if args.eval_every and done % args.eval_every == 0 and done < args.max_steps and master:
            quick_eval(model, proc, args, out, done)
        stop = args.stop_at is not None and done >= args.stop_at
        if done % args.save_every == 0 or done == args.max_steps or stop:
            state = {"step": done, "samples": offset, "global_batch": G, "world_size": world, "args": vars(args),
                     "data": "json" if args.data else "synthetic"}
            save(out, model, opt, assets, state, master, fsdp)
        if stop:
            break
    if master and args.export and not stop:
        final = model
        if fsdp:  # the shards are spread over the processes: read the whole model back from the final checkpoint
            final = mi.Model.from_pretrained(args.init if args.lora_r else out, check_finite=False,
                                             adapter=out if args.lora_r else None)
        final = lora.merge_lora(copy.deepcopy(final)) if args.lora_r and args.merge else final
        checkpoint.save(args.export, final, assets, dtype=getattr(torch, args.export_dtype),
                        log_file=os.path.join(out, checkpoint.LOG))
        print(f"exported {args.export} ({args.export_dtype})", flush=True)
    if args.eval_every and master and not stop:
        quick_eval(model, proc, args, out, args.max_steps)
    if master:
        print(f"{'stopped' if stop else 'done'}: {done} steps, {(time.time() - t0) / 60:.1f} min; checkpoint {out}",
              flush=True)


def save(out, model, opt, assets, state, master, fsdp):
    """The training checkpoint, written by rank 0. Under FSDP every process first takes part in gathering each
    tensor whole, so the files are the same as a single process writes (and any process count can resume)."""
    if fsdp:
        params, moments = distributed.full_state(model, opt, master, trainable_only=bool(lora.lora_layers(model)))
        if master:
            with distributed.swapped(model, params):
                checkpoint.save(out, model, assets, state=state, log_file=os.path.join(out, checkpoint.LOG),
                                optimizer_state=moments)
    elif master:
        checkpoint.save(out, model, assets, optimizer=opt, state=state, log_file=os.path.join(out, checkpoint.LOG))
    if dist.is_initialized():
        dist.barrier()


def peak_rss_gib(reset=False, field="VmHWM"):
    """This process's peak resident memory in GiB (rank 0's, in the log). reset: start counting again from now
    (Linux: /proc/self/clear_refs), so the training steps' peak is not the loading's. field="VmRSS": the current."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts KiB
    try:
        with open("/proc/self/status") as f:  # VmHWM: the high-water mark, which clear_refs resets
            peak = next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except (OSError, StopIteration, ValueError):
        pass  # not Linux: the peak since the process started
    return peak


def log_step(out, done, loss, patch_loss, lr, tokens_seen, t0, start_step, args, offset):
    el = time.time() - t0
    tps, eta = tokens_seen / max(el, 1e-9), el / (done - start_step) * (args.max_steps - done)
    peak = peak_rss_gib()
    rec = {"step": done, "loss": loss, "lr": lr, "tokens_per_s": round(tps, 1), "elapsed_s": round(el, 1),
           "samples": offset, "peak_rss_gib": round(peak, 3)}
    extra = ""
    if patch_loss is not None:
        rec["patch_loss"] = patch_loss
        extra = f"patch words {patch_loss:.3f} | "
    print(f"step {done:6d} | loss {loss:.4f} | {extra}lr {lr:.2e} | {tps:7.0f} tok/s | peak {peak:5.2f} GiB | "
          f"elapsed {el / 60:5.1f} min | ETA {eta / 60:5.1f} min", flush=True)
    checkpoint.append_log(out, rec)


def quick_eval(model, proc, args, out, step):
    model.eval()
    domains = tasks.DOMAINS if args.domain == "all" or args.data else (args.domain,)
    rec = {"step": step, "eval": {d: round(scoring.evaluate_synthetic(model, proc, d, args.eval_n, seed=99)["accuracy"], 3)
                                  for d in domains}}
    print(f"eval step {step}: " + "  ".join(f"{d} {a:.3f}" for d, a in rec["eval"].items()), flush=True)
    checkpoint.append_log(out, rec)
    model.train()


if __name__ == "__main__":
    sys.exit(cli.run(main))
