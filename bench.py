"""Benchmark minterleave against transformers on the CPU, side by side in one run.

    python bench.py                       # 0.5B configuration, random weights, bf16 and fp32
    python bench.py --model DIR --json out.json --only minterleave --dtypes bfloat16 --quick
    python bench.py attention [args]      # the attention-kernel benchmark, kernels/bench_attention.py
    python bench.py finetune [args]       # one LoRA (and full) training step, minterleave vs transformers + PEFT
    python bench.py decode [args]         # CPU decoding: bf16/int8/int4 vs transformers (and llama.cpp)
    python bench.py serve [args]          # serve.py's throughput at 1/4/8 clients, batched vs one at a time; chat TTFT

Without --model, the llava-interleave-qwen-0.5b-hf configuration with random N(0, 0.02) weights is
written once to cache/bench-0.5b (bf16, llava-hf layout, like the hub). Each implementation runs
in its own worker process (its memory is its own); for each dtype both are loaded and every
measurement alternates between them (A B A B), so that other work on the machine falls on both
alike. Numbers are medians over repeats; ratios are minterleave / transformers.
- load: from_pretrained, imports excluded (first load, then reloads). transformers maps the
  safetensors file lazily when its dtype is the one asked for: its bf16 load is quick and pages
  are read on first use; minterleave reads eagerly.
- peak RSS: VmHWM from /proc/self/status (ru_maxrss would carry over from the parent), after
  loading and after all measurements.
- vision tower: image features (tower + projector) of 1 / 4 / 8 images.
- time to first token: 1 image + 25 text tokens -> prefill (tower included) + first token.
- prefill tokens/s: prompt tokens / time to first token, prompts with 1 / 4 / 8 images (fp32: 1
  by default; its 4- and 8-image runs alone take over 10 minutes on 2 cores: --fp32-images 1,4,8).
- decode tokens/s: --new-tokens greedy tokens after the 1-image prompt (transformers with
  min_new_tokens: same count), each new token timestamped (minterleave's stream callback, a
  transformers streamer): (last stamp - first stamp) / (N - 1), so no prefill in it.
- decode bandwidth: parameter bytes read per token (decoder layers, final norm, lm_head matrix;
  not the vision tower) x tokens/s, and its fraction of the machine's read bandwidth, measured
  first: the faster of a sum over a 1 GB fp32 tensor and a 1-row bf16 matmul over a 1 GB matrix.
Bad input ends with one line on stderr (`bench.py: error: ...`, exit status 1; 2 for a bad flag), a worker's
too; --debug shows the traceback instead.
"""
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from minterleave import cli

from bench_decode import decode_bytes_per_token, hwm_gb  # the script beside this one

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(ROOT, "cache", "bench-0.5b")
TEXT_TOKENS = 25


def say(*a):
    print(*a, flush=True)


def build_default_checkpoint(path):
    """llava-interleave-qwen-0.5b-hf's configuration with random N(0, 0.02) weights, bf16 on disk."""
    import torch
    import minterleave as mi
    from minterleave.config import ModelConfig, TextConfig, VisionConfig, to_llava_hf_dict
    from minterleave.weights import save_weights
    cfg = ModelConfig(vision=VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                                          image_size=384, patch_size=14),
                      text=TextConfig(vocab_size=152000, hidden_size=1024, intermediate_size=2816, num_layers=24,
                                      num_heads=16, num_kv_heads=16, tie_word_embeddings=True, rope_theta=1e6),
                      image_token_id=151646, feature_layer=-1, feature_select="full")
    say(f"writing the default checkpoint (0.5B configuration, random weights) to {path} ...")
    with torch.device("meta"):
        model = mi.Model(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights 1, biases 0
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    save_weights(model, path, cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**to_llava_hf_dict(cfg), "torch_dtype": "bfloat16"}, f, indent=2)


# ---------------------------------------------------------------- the worker subprocess
def prompt(spec, n_images, dtype):
    """input_ids (1, T): 5 text tokens, n_images x tokens_per_image image tokens, 20 text tokens."""
    import torch
    g = torch.Generator().manual_seed(n_images)
    text = torch.randint(0, spec["vocab"], (TEXT_TOKENS,), generator=g)
    text[text == spec["image_token"]] = 0
    ids = torch.cat([text[:5], torch.full((n_images * spec["tokens_per_image"],), spec["image_token"]), text[5:]])
    pixels = torch.rand(n_images, 3, spec["image_size"], spec["image_size"], generator=g) * 2 - 1
    return ids[None], pixels.to(dtype) if n_images else None


class Clock:
    """Timestamps each put(): minterleave's stream callback, or a transformers streamer."""
    def __init__(self):
        self.stamps, self.end = [], lambda: None

    def put(self, tokens):
        self.stamps.append(time.perf_counter())


def worker(impl, path, dtype_name, spec):
    """One implementation, one dtype: load, then answer JSON requests on stdin, one per line."""
    out = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything the libraries print goes to stderr
    os.dup2(2, 1)
    import torch
    dtype, spec = getattr(torch, dtype_name), json.loads(spec)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if impl == "minterleave":
        import minterleave as mi

        def load():  # --quantize: quantized matrix by matrix while loading (int4: groups of 32)
            model = mi.Model.from_pretrained(path, dtype=dtype, check_finite=spec.get("check_finite", True),
                                             quantize=spec.get("quantize"))
            return model.prepare_for_inference(path)  # packed bf16 decoder weights on a CPU
    else:
        from transformers import LlavaForConditionalGeneration
        load = lambda: LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()  # noqa: E731

    def reply(**r):
        out.write(json.dumps({**r, "rss_gb": hwm_gb()}) + "\n")
        out.flush()

    model, req = None, {"op": "load"}
    while req["op"] != "exit":
        if req["op"] == "load":
            model = None  # a reload frees the old model first
            gc.collect()
            t0 = time.perf_counter()
            model = load()
            reply(load_s=time.perf_counter() - t0)
        elif req["op"] == "vision":
            ids, pixels = prompt(spec, req["images"], dtype)
            with torch.no_grad():
                t0 = time.perf_counter()
                if impl == "minterleave":
                    model.image_features(pixels)
                else:
                    c = model.config
                    model.get_image_features(pixel_values=pixels, vision_feature_layer=c.vision_feature_layer,
                                             vision_feature_select_strategy=c.vision_feature_select_strategy)
                reply(s=time.perf_counter() - t0)
        else:  # generate: prefill + req["new"] greedy tokens
            ids, pixels = prompt(spec, req["images"], dtype)
            n, clock = req["new"], Clock()
            t0 = time.perf_counter()
            if impl == "minterleave":
                new = model.generate(ids, pixels, max_new_tokens=n, stream=clock.put)
            else:
                images = {} if pixels is None else {"pixel_values": pixels}
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, do_sample=False,
                                     max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=clock)
                new, clock.stamps = new[:, ids.shape[1]:], clock.stamps[1:]  # the first put is the prompt
            t = clock.stamps
            reply(ttft_s=t[0] - t0, prompt_tokens=ids.shape[1], tokens=new[0].tolist(),
                  decode_s=(t[-1] - t[0]) / (n - 1) if n > 1 else None)
        req = json.loads(sys.stdin.readline() or '{"op": "exit"}')
    return 0


class Worker:
    def __init__(self, impl, path, dtype, spec, command="_worker"):
        self.impl, self.log = impl, tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), command, impl, path, dtype,
                                   json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.log, text=True, cwd=ROOT)
        self.loaded = self.read()

    def read(self):
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self.log.seek(0)
            log = self.log.read()
            last = log.strip().splitlines()[-1:]
            if self.p.returncode == 1 and last and last[0].startswith("bench.py: error: "):
                raise ValueError(last[0][len("bench.py: error: "):])  # bad input, e.g. weights: its one line
            raise RuntimeError(f"the {self.impl} worker died:\n{log[-4000:]}")
        return json.loads(line)

    def call(self, **req):
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self.read() if req["op"] != "exit" else self.p.wait()


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FT_TEXT_TOKENS = 256


def finetune_worker(impl, path, mode, spec):
    """One implementation, one training setup (mode "lora": frozen bf16 base + r=16 adapter on the seven decoder
    projections; "full": every parameter trainable, bf16), activation checkpointing on; then answers
    {"op": "steps", "n": N} with N timed steps (forward + backward + AdamW step), {"op": "exit"} ends."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import torch
    spec = json.loads(spec)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if impl == "minterleave":
        import minterleave as mi
        from minterleave.lora import add_lora
        model = mi.Model.from_pretrained(path, dtype=torch.bfloat16)
        if mode == "lora":
            add_lora(model, r=16, alpha=32, targets=LORA_TARGETS)
        model.set_grad_checkpointing(True)
    else:
        from transformers import LlavaForConditionalGeneration
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mode == "lora":
            import peft
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0,
                target_modules=rf".*language_model.*\.({'|'.join(LORA_TARGETS)})"))  # the decoder's, not the tower's
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    # one image + FT_TEXT_TOKENS text tokens (image in the middle); every text token supervised
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, spec["vocab"], (FT_TEXT_TOKENS,), generator=g)
    text[text == spec["image_token"]] = 0
    half = FT_TEXT_TOKENS // 2
    ids = torch.cat([text[:half], torch.full((spec["tokens_per_image"],), spec["image_token"]), text[half:]])[None]
    labels = ids.masked_fill(ids == spec["image_token"], -100)
    pixels = (torch.rand(1, 3, spec["image_size"], spec["image_size"], generator=g) * 2 - 1).to(torch.bfloat16)

    def step():
        if impl == "minterleave":
            _, loss = model(ids, pixels, labels=labels, return_logits=False)
        else:
            loss = model(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    out.write(json.dumps({"rss_gb": hwm_gb(), "trainable": sum(p.numel() for p in params),
                          "tokens": ids.shape[1]}) + "\n")
    out.flush()
    req = json.loads(sys.stdin.readline() or '{"op": "exit"}')
    while req["op"] != "exit":
        times, losses = [], []
        for _ in range(req["n"]):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        out.write(json.dumps({"step_s": times, "loss": losses, "rss_gb": hwm_gb()}) + "\n")
        out.flush()
        req = json.loads(sys.stdin.readline() or '{"op": "exit"}')
    return 0


# ---------------------------------------------------------------- the parent
def machine():
    import torch
    import transformers
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


def read_bandwidth(gb=1.0, repeats=5):
    """GB/s of a sum over a `gb` fp32 tensor and of a 1-row bf16 matmul over a `gb` matrix."""
    import torch
    res = {}
    for name, dtype in (("sum_fp32", torch.float32), ("gemv_bf16", torch.bfloat16)):
        x = torch.ones(int(gb * 1e9) // (4096 * torch.finfo(dtype).bits // 8), 4096, dtype=dtype)
        v = torch.ones(1, 4096, dtype=dtype)
        fn = (lambda: x.sum()) if name == "sum_fp32" else (lambda: torch.nn.functional.linear(v, x))
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name + "_gbs"] = x.numel() * x.element_size() / statistics.median(times[1:]) / 1e9
        del x
    res["read_gbs"] = max(res.values())
    return res


def bench_dtype(path, dtype, spec, impls, images, args):
    """{impl: {metric: median}} for one dtype, every measurement alternating between the workers."""
    plan = args.repeats * [dict(op="vision", images=1), dict(op="generate", images=1, new=args.new_tokens)]
    plan += args.heavy_repeats * ([dict(op="vision", images=k) for k in images if k != 1]
                                  + [dict(op="generate", images=k, new=1) for k in images if k != 1])
    plan += (args.repeats - 1) * [dict(op="load")]  # more load samples: reloads in the same worker
    samples, workers, tokens = {i: {} for i in impls}, {}, {}
    add = lambda impl, key, v: samples[impl].setdefault(key, []).append(v)  # noqa: E731
    for impl in impls:
        say(f"[{dtype}] loading {impl} ...")
        workers[impl] = w = Worker(impl, path, dtype, spec)
        add(impl, "load_s", w.loaded["load_s"])
        add(impl, "load_rss_gb", w.loaded["rss_gb"])
        say(f"[{dtype}] {impl:12s} loaded in {w.loaded['load_s']:.2f} s, VmHWM {w.loaded['rss_gb']:.2f} GB")
    for impl in impls:  # warm-up: a text-only prompt, a few tokens
        workers[impl].call(op="generate", images=0, new=4)
    for req in plan:
        for impl in impls:
            r, k = workers[impl].call(**req), req.get("images")
            if req["op"] == "load":
                add(impl, "load_s", r["load_s"])
                msg = f"reloaded in {r['load_s']:.2f} s"
            elif req["op"] == "vision":
                add(impl, f"vision_{k}img_s", r["s"])
                msg = f"vision tower, {k} image(s): {r['s']:.3f} s"
            else:
                add(impl, f"prefill_{k}img_tok_s", r["prompt_tokens"] / r["ttft_s"])
                msg = f"prefill {r['prompt_tokens']} tokens ({k} image(s)) + 1st token: {r['ttft_s']:.3f} s"
                if k == 1:
                    add(impl, "ttft_s", r["ttft_s"])
                if r["decode_s"]:
                    add(impl, "decode_tok_s", 1 / r["decode_s"])
                    tokens[impl] = r["tokens"]
                    msg += f", decode {1 / r['decode_s']:.2f} tok/s"
            if req["op"] != "load":  # VmHWM only grows: the last reading before the reloads is the peak
                samples[impl]["peak_rss_gb"] = [r["rss_gb"]]
            say(f"[{dtype}] {impl:12s} {msg}")
    for impl in impls:
        workers[impl].call(op="exit")
    out = {impl: {k: statistics.median(v) for k, v in m.items()} for impl, m in samples.items()}
    if len(impls) == 2:
        out["same_greedy_tokens"] = tokens[impls[0]] == tokens[impls[1]]
    return out


def rows(new):
    """(key, what, unit, better) for every row of the table."""
    r = [("load_s", "load time", "s", "lower"), ("load_rss_gb", "peak RSS after load", "GB", "lower"),
         ("peak_rss_gb", "peak RSS after all measurements", "GB", "lower")]
    r += [(f"vision_{k}img_s", f"vision tower + projector, {k} image(s)", "s", "lower") for k in (1, 4, 8)]
    r += [("ttft_s", f"time to first token, 1 image + {TEXT_TOKENS} text tokens", "s", "lower")]
    r += [(f"prefill_{k}img_tok_s", f"prefill, {k} image(s)", "tok/s", "higher") for k in (1, 4, 8)]
    return r + [("decode_tok_s", f"decode, {new} greedy tokens", "tok/s", "higher"),
                ("decode_gbs", "decode parameter bandwidth", "GB/s", "higher"),
                ("decode_bw_frac", "decode bandwidth / machine read bandwidth", "", "higher")]


def table(results, info, bw, args, path, seconds):
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
             f"transformers {info['transformers']}; read bandwidth {bw['read_gbs']:.1f} GB/s; load average "
             f"{info['loadavg_at_start'][0]:.1f} at start, {info['loadavg_at_end'][0]:.1f} at end (other work). Model {path}. "
             f"Medians of {args.repeats} (load, 1 image, decode) / {args.heavy_repeats} (4, 8 images); "
             f"{seconds:.0f} s in all.", "",
             "| dtype | metric | minterleave | transformers | ratio mi/tf | better |", "|---|---|---:|---:|---:|---|"]
    def fmt(r, impl, key):
        return "-" if key not in r.get(impl, {}) else f"{r[impl][key]:.2f}x" if impl == "ratio" else f"{r[impl][key]:.3g}"

    for dtype, r in results.items():
        for key, what, unit, better in rows(args.new_tokens):
            if key in r["minterleave"]:
                lines.append(f"| {dtype} | {what}{f' ({unit})' if unit else ''} | {fmt(r, 'minterleave', key)} "
                             f"| {fmt(r, 'transformers', key)} | {fmt(r, 'ratio', key)} | {better} |")
        if "same_greedy_tokens" in r:
            lines.append(f"| {dtype} | same greedy tokens | {r['same_greedy_tokens']} | | | |")
    return "\n".join(lines)


def finetune_main(argv):
    """python bench.py finetune: the same training step in minterleave and in transformers + PEFT, side by side."""
    p = cli.ArgumentParser(prog="bench.py finetune", description=(
        "One training step (forward + backward + AdamW step) on one image + 256 text tokens, batch 1, activation "
        "checkpointing on, in minterleave and in transformers + PEFT, each in its own process, alternating rounds. "
        "lora: frozen bf16 base, r=16 (alpha 32) on the seven decoder projections; full: every parameter trainable, "
        "bf16. Medians of the step times after one warm-up step; peak RSS is each process's VmHWM; ratios are "
        "minterleave / transformers."))
    p.add_argument("--model", help=f"checkpoint folder or hub id (default: random 0.5B weights in {DEFAULT_MODEL})")
    p.add_argument("--modes", default="lora,full", help="what to train, in order (default: %(default)s)")
    p.add_argument("--steps", type=cli.positive_int, default=2, help="timed steps per round (default: %(default)s)")
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="rounds, each implementation's steps in turn (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: %(default)s, torch's own choice)")
    p.add_argument("--json", help="write the results to this file (default: print only)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or set(modes) - {"lora", "full"}:
        p.error(f"argument --modes: expected lora and/or full, got {args.modes!r}")
    from minterleave import hub
    from minterleave.config import load_config
    path = hub.resolve(args.model) if args.model else DEFAULT_MODEL
    if not args.model and not os.path.isfile(os.path.join(path, "config.json")):
        build_default_checkpoint(path)
    cfg = load_config(path)
    spec = dict(vocab=cfg.text.vocab_size, image_token=cfg.image_token_id, image_size=cfg.vision.image_size,
                tokens_per_image=cfg.tokens_per_image, threads=args.threads)
    impls, info, results, t0 = ["minterleave", "transformers"], machine(), {}, time.perf_counter()
    import peft
    info["peft"] = peft.__version__
    say(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}; model {path}")
    for mode in modes:
        workers, r = {}, {}
        for impl in impls:
            say(f"[{mode}] loading {impl} ...")
            workers[impl] = w = Worker(impl, path, mode, spec, command="_finetune_worker")
            r[impl] = {"trainable_params": w.loaded["trainable"], "tokens": w.loaded["tokens"], "step_s": []}
        for impl in impls:  # warm-up: the first step, on the untrained adapter (its loss is the base model's)
            x = workers[impl].call(op="steps", n=1)
            r[impl]["first_loss"], r[impl]["warmup_s"] = x["loss"][0], x["step_s"][0]
            say(f"[{mode}] {impl:12s} warm-up step {x['step_s'][0]:.2f} s, loss {x['loss'][0]:.5f}")
        for k in range(args.rounds):
            for impl in impls:
                x = workers[impl].call(op="steps", n=args.steps)
                r[impl]["step_s"] += x["step_s"]
                r[impl]["peak_rss_gb"], r[impl]["last_loss"] = x["rss_gb"], x["loss"][-1]
                say(f"[{mode}] round {k + 1} {impl:12s} steps " + " ".join(f"{t:.2f}" for t in x["step_s"])
                    + f" s, VmHWM {x['rss_gb']:.2f} GB")
        for impl in impls:
            workers[impl].call(op="exit")
            r[impl]["median_step_s"] = statistics.median(r[impl]["step_s"])
        r["ratio"] = {k: r["minterleave"][k] / r["transformers"][k] for k in ("median_step_s", "peak_rss_gb")}
        r["first_loss_diff"] = abs(r["minterleave"]["first_loss"] - r["transformers"]["first_loss"])
        results[mode] = r
    info["loadavg_at_end"] = os.getloadavg()
    lines = [f"\n{info['cpu']}, {info['cores']} cores; {len(results)} mode(s), {args.rounds} rounds x {args.steps} "
             f"steps after 1 warm-up, {time.perf_counter() - t0:.0f} s in all. Model {path}.", "",
             "| mode | metric | minterleave | transformers + PEFT | ratio mi/tf |", "|---|---|---:|---:|---:|"]
    for mode, r in results.items():
        m, t = r["minterleave"], r["transformers"]
        lines += [f"| {mode} | step time, median (s) | {m['median_step_s']:.3g} | {t['median_step_s']:.3g} "
                  f"| {r['ratio']['median_step_s']:.2f}x |",
                  f"| {mode} | peak RSS (GB) | {m['peak_rss_gb']:.3g} | {t['peak_rss_gb']:.3g} "
                  f"| {r['ratio']['peak_rss_gb']:.2f}x |",
                  f"| {mode} | trainable parameters | {m['trainable_params']} | {t['trainable_params']} | |",
                  f"| {mode} | first-step loss | {m['first_loss']:.5f} | {t['first_loss']:.5f} | |"]
    say("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "model": path, "args": vars(args), "results": results}, f, indent=2)
    return 0



def serving_checkpoint(path):
    """A folder serve.py can load: `path` itself if it has a tokenizer, else `path`-serve beside it, whose weights
    link to `path`'s and whose tokenizer is the small one of minterleave/tokenizer.py (its <image> id put into
    config.json; the random 0.5B model's answers are noise anyway, only their cost is measured)."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    from minterleave.config import read_json
    from minterleave.tokenizer import write_tokenizer_files
    serve = os.path.normpath(path) + "-serve"
    if not os.path.isfile(os.path.join(serve, "config.json")):
        cfg = read_json(os.path.join(path, "config.json"))
        ids = write_tokenizer_files(serve, image_size=cfg["vision_config"]["image_size"],
                                    patch_size=cfg["vision_config"]["patch_size"])
        for name in os.listdir(path):
            if name.endswith((".safetensors", ".safetensors.index.json")):
                os.symlink(os.path.abspath(os.path.join(path, name)), os.path.join(serve, name))
        with open(os.path.join(serve, "config.json"), "w") as f:
            json.dump({**cfg, "image_token_index": ids["image_token_id"]}, f, indent=2)
    return serve

def start_server(path, dtype, max_batch, threads, log):
    """serve.py in its own process on a free port; (process, port) once it listens."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--model", path, "--dtype", dtype,
                                 "--port", "0", "--max-batch", str(max_batch), "--threads", str(threads)],
                                stdout=out, stderr=subprocess.STDOUT)
    while True:
        text = open(log).read()
        if "serving" in text:
            return proc, int(text.split("http://127.0.0.1:")[1].split("/")[0])
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py did not start: {text.strip().splitlines()[-1] if text.strip() else '?'}")
        time.sleep(0.2)


def post(port, body, key=None):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    r = conn.getresponse()
    data = json.loads(r.read())
    if r.status != 200:
        raise RuntimeError(f"serve.py answered {r.status}: {data['error']['message']}")
    return data


def load_test(port, bodies, clients, key=None):
    """Send `bodies` from `clients` threads, each taking the next body when its answer is in:
    (seconds for all, completion tokens in all)."""
    import threading
    todo, lock, tokens, errors = list(bodies), threading.Lock(), [], []

    def client():
        while True:
            with lock:
                if not todo or errors:
                    return
                body = todo.pop(0)
            try:
                tokens.append(post(port, body, key)["usage"]["completion_tokens"])
            except Exception as e:  # noqa: BLE001 (said below, once)
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, sum(tokens)


def chat_ttft(path, dtype, image, rounds):
    """A two-turn chat with an image: the follow-up's time to first token with the kept cache vs re-prefilling the
    whole conversation (medians over rounds); and the tokens each prefills."""
    import minterleave as mi
    from minterleave.chat import ChatSession
    model = mi.Model.from_pretrained(path, dtype=dtype).prepare_for_inference(path)
    proc, kept, full = mi.Processor.from_pretrained(path), [], []
    for r in range(rounds):
        session = ChatSession(model, proc)
        session.add_image(image)
        session.ask("Describe the picture.", max_new_tokens=16)
        follow = session.ask(f"What else is in it? ({r})", max_new_tokens=1)
        kept.append(follow["ttft"])
        full.append(session.ttft_compare()[0])
    return dict(kept_s=statistics.median(kept), full_s=statistics.median(full), kept_tokens=follow["prefilled"],
                full_tokens=session.prompt_end, speedup=statistics.median(full) / statistics.median(kept))


def serve_main(argv):
    """python bench.py serve: serve.py's throughput with and without batching, and the chat's follow-up TTFT."""
    p = cli.ArgumentParser(prog="bench.py serve", description=(
        "Throughput of serve.py (requests/s, completion tokens/s) with --requests requests sent by 1, 4 and 8 "
        "concurrent clients, against two servers run side by side: batched (--max-batch 8) and one request at a "
        "time (--max-batch 1, i.e. sequential); the batching gain is batched / sequential throughput at the same "
        "concurrency. Each request: --images random images + a question, greedy, --max-tokens. Then a two-turn "
        "chat's follow-up time to first token with the kept KV cache vs re-prefilling the conversation."))
    p.add_argument("--model", help=f"checkpoint folder or hub id (default: random 0.5B weights in {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="(default: %(default)s)")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients, in order (default: %(default)s)")
    p.add_argument("--requests", type=cli.positive_int, default=16,
                   help="requests per measurement (default: %(default)s)")
    p.add_argument("--max-tokens", type=cli.positive_int, default=32,
                   help="max_tokens per request (default: %(default)s)")
    p.add_argument("--images", type=int, default=1, help="images per request (default: %(default)s)")
    p.add_argument("--ttft-rounds", type=int, default=3, help="chat rounds for the TTFT medians, 0 = skip "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per server (default: %(default)s, torch's)")
    p.add_argument("--json", help="write the results to this file (default: print only)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    import base64
    import numpy as np
    from PIL import Image
    from minterleave import hub
    path = hub.resolve(args.model) if args.model else DEFAULT_MODEL
    if not args.model and not os.path.isfile(os.path.join(path, "config.json")):
        build_default_checkpoint(path)
    path = serving_checkpoint(path)
    clients = [int(c) for c in args.clients.split(",")]
    info, results, t0 = machine(), {"throughput": {}}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "image.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(image)
        if args.ttft_rounds:
            say("chat: follow-up time to first token ...")
            results["chat_ttft"] = r = chat_ttft(path, args.dtype, image, args.ttft_rounds)
            say(f"chat follow-up TTFT: {r['kept_s'] * 1e3:.1f} ms prefilling {r['kept_tokens']} new tokens (cache "
                f"kept) vs {r['full_s'] * 1e3:.1f} ms re-prefilling all {r['full_tokens']}: {r['speedup']:.1f}x")
        url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
        parts = [{"type": "image_url", "image_url": {"url": url}}] * args.images
        bodies = [{"messages": [{"role": "user", "content": parts + [
                   {"type": "text", "text": f"Question {i}: what is in the picture?"}]}],
                   "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.requests)]
        servers = {}
        try:
            for name, batch in (("batched", max(clients)), ("sequential", 1)):
                servers[name] = start_server(path, args.dtype, batch, args.threads, os.path.join(tmp, f"{name}.log"))
            for name, (_, port) in servers.items():
                post(port, bodies[0])  # warm-up
            for c in clients:  # the two servers in turn at each concurrency, so that other load falls on both
                for name, (_, port) in servers.items():
                    seconds, tokens = load_test(port, bodies, c)
                    results["throughput"][f"{name} {c}"] = x = dict(
                        seconds=seconds, tokens=tokens, requests_s=len(bodies) / seconds, tokens_s=tokens / seconds)
                    say(f"{name:10s} {c} client(s): {x['requests_s']:.2f} requests/s, {x['tokens_s']:.1f} tokens/s")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    info["loadavg_at_end"] = os.getloadavg()
    lines = [f"\n{info['cpu']}, {info['cores']} cores (load average {info['loadavg_at_start'][0]:.1f} at the start, "
             f"{info['loadavg_at_end'][0]:.1f} at the end); model {path} ({args.dtype}); {args.requests} requests of "
             f"{args.images} image(s) + a question, max_tokens {args.max_tokens}; "
             f"{time.perf_counter() - t0:.0f} s in all.",
             "", "| clients | batched requests/s | tokens/s | sequential requests/s | tokens/s | batching gain |",
             "|---:|---:|---:|---:|---:|---:|"]
    for c in clients:
        b, s = results["throughput"][f"batched {c}"], results["throughput"][f"sequential {c}"]
        results["throughput"][f"gain {c}"] = gain = b["requests_s"] / s["requests_s"]
        lines.append(f"| {c} | {b['requests_s']:.2f} | {b['tokens_s']:.1f} | {s['requests_s']:.2f} | "
                     f"{s['tokens_s']:.1f} | {gain:.2f}x |")
    say("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "model": path, "args": vars(args), "results": results}, f, indent=2)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["attention"]:
        from minterleave.kernels.bench_attention import main as bench_attention
        return bench_attention(argv[1:])
    if argv[:1] == ["_worker"]:
        return worker(*argv[1:])
    if argv[:1] == ["finetune"]:
        return finetune_main(argv[1:])
    if argv[:1] == ["decode"]:  # minterleave bf16/int8/int4 vs transformers (vs llama.cpp), bench_decode.py
        from bench_decode import main as bench_decode
        return bench_decode(argv[1:], build_default_checkpoint)
    if argv[:1] == ["_finetune_worker"]:
        return finetune_worker(*argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help=f"checkpoint folder or hub id (default: random 0.5B weights in {DEFAULT_MODEL})")
    p.add_argument("--dtypes", default="bfloat16,float32", help="dtypes to run, in order (default: %(default)s)")
    p.add_argument("--repeats", type=cli.positive_int, default=3,
                   help="repeats of loading and of the 1-image measurements (default: %(default)s)")
    p.add_argument("--heavy-repeats", type=int, default=1,
                   help="repeats of the 4- and 8-image measurements (default: %(default)s)")
    p.add_argument("--images", default="1,4,8",
                   help="image counts for the vision tower and prefill (default: %(default)s)")
    p.add_argument("--fp32-images", default="1",
                   help="the same in float32, where each image costs ~4x bf16 (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to decode (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: %(default)s, torch's own choice)")
    p.add_argument("--quick", action="store_true", help="one repeat of everything, 8 new tokens, 0.25 GB "
                   "bandwidth probe (for tests)")
    p.add_argument("--only", choices=["minterleave"], help="skip transformers (default: both side by side)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="minterleave with int8 (per row) or int4 (groups of 32) weight-only decoder weights "
                        "(default: off; `bench.py decode` compares the modes)")
    p.add_argument("--json", help="write the results to this file (default: print only)")
    p.add_argument("--no-check-finite", action="store_true",
                   help="skip minterleave's NaN/Inf check of the weights (transformers has none)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.heavy_repeats, args.new_tokens = 1, 1, 8
    if args.new_tokens < 2:
        p.error("argument --new-tokens: expected at least 2 (decode speed needs two stamps)")
    from minterleave import hub
    from minterleave.config import load_config
    path = hub.resolve(args.model) if args.model else DEFAULT_MODEL  # a hub id: its folder in the hub cache
    if not args.model and not os.path.isfile(os.path.join(path, "config.json")):
        build_default_checkpoint(path)
    cfg = load_config(path)
    spec = dict(vocab=cfg.text.vocab_size, image_token=cfg.image_token_id, image_size=cfg.vision.image_size,
                tokens_per_image=cfg.tokens_per_image, threads=args.threads, quantize=args.quantize,
                check_finite=not args.no_check_finite)
    impls = ["minterleave"] if args.only else ["minterleave", "transformers"]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    info = machine()
    say(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}; model {path}")
    if info["loadavg_at_start"][0] > 0.5:
        say(f"warning: the machine is busy (load average {info['loadavg_at_start'][0]:.1f}): numbers will be noisy")
    bw = read_bandwidth(0.25 if args.quick else 1.0)
    say(f"read bandwidth {bw['read_gbs']:.1f} GB/s (sum fp32 {bw['sum_fp32_gbs']:.1f}, "
        f"gemv bf16 {bw['gemv_bf16_gbs']:.1f})")
    t0, results = time.perf_counter(), {}
    for dtype in args.dtypes.split(","):
        images = [int(k) for k in (args.fp32_images if dtype == "float32" else args.images).split(",")]
        results[dtype] = r = bench_dtype(path, dtype, spec, impls, images, args)
        for impl in impls:
            r[impl]["decode_gbs"] = decode_bytes_per_token(cfg, dtype) * r[impl]["decode_tok_s"] / 1e9
            r[impl]["decode_bw_frac"] = r[impl]["decode_gbs"] / bw["read_gbs"]
        if len(impls) == 2:
            r["ratio"] = {k: r["minterleave"][k] / r["transformers"][k] for k in r["minterleave"]}
    info["loadavg_at_end"] = os.getloadavg()
    say("\n" + table(results, info, bw, args, path, time.perf_counter() - t0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "bandwidth": bw, "model": path, "args": vars(args), "results": results,
                       "decode_bytes_per_token": {d: decode_bytes_per_token(cfg, d) for d in results}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
