"""`python bench.py decode`: CPU decoding side by side: minterleave (bf16, int8, int4), transformers (bf16) and,
when llama-cpp-python is installed and GGUF files are given, llama.cpp at the same bits.

Every implementation and mode runs in its own worker process (its peak RSS is its own), all on the same
text prompt (--context tokens, 758 by default: what one 729-token image plus a question fills) and the same
threads; each round runs every worker once in turn (A B C A B C ...), so other work on the machine falls
on all alike; numbers are medians over rounds. Per run: prefill tok/s (prompt tokens / time to the first
token), decode tok/s ((last stamp - first stamp) / (N - 1) over N greedy tokens), peak RSS (VmHWM); for
minterleave also the decoder's matrix products alone (`matrix_pass_ms`) and the attention over the cache alone
(`attention_pass_ms`), next to llama.cpp's whole step at the same bits: how close the kernels PyTorch ships for
these two parts come to llama.cpp's step, before any of the other work of a step (timed after all the rounds,
in rounds of their own, so that their buffers stay out of the runs' peak RSS).
Achieved bandwidth = bytes read per decoded token x decode tok/s, where the bytes are every tensor a decode
step reads (decoder layers, final norm, output head; as stored: packed, int8 + scales, int4 + scales/zeros;
for llama.cpp the GGUF file's size), next to the machine's read bandwidth measured in the same run
(STREAM-like: the faster of a sum over a 1 GB fp32 tensor and a copy of it, counting bytes read and written;
before and after the rounds, the faster of the two: on a shared machine one probe can fall in a busy moment).
llama.cpp (--gguf bf16=F.gguf,q8_0=G.gguf,q4_0=H.gguf) runs through llama-cpp-python with flash attention and
its default f16 KV cache (llama-bench -fa 1), the whole prompt in one llama_decode (ubatches of 512).
--write-qwen2 DIR writes the checkpoint's decoder as the Qwen2ForCausalLM folder llama.cpp's
convert_hf_to_gguf.py reads (README "Decoding at the bandwidth limit" has the commands).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from minterleave import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
TF_MODES = ("bf16",)  # transformers runs its bf16 model (it has no weight-only int8/int4 CPU kernels of its own)
MI_MODES = ("bf16", "int8", "int4")
SAME_BITS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}  # minterleave mode -> llama.cpp type


def hwm_gb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 2**20


def stream_bandwidth(gb=1.0, repeats=5):
    """GB/s of sum(x) (reads) and of y.copy_(x) (reads + writes) over a `gb` fp32 tensor; the faster one."""
    import torch
    x = torch.ones(int(gb * 1e9) // 4)
    y = torch.empty_like(x)
    res = {}
    for name, fn, nbytes in (("sum", lambda: x.sum(), x.nbytes), ("copy", lambda: y.copy_(x), 2 * x.nbytes)):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up (page faults)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[f"{name}_gbs"] = nbytes / min(times[1:]) / 1e9
    res["read_gbs"] = max(res["sum_gbs"], res["copy_gbs"])
    return res


def matrix_pass_ms(model, repeats=3):
    """ms of the decoder's matrix products alone, one row each, in the order a decode step runs them (per layer
    q/k/v, o, gate/up, down; then the output head), as the model holds them (packed, int8, int4): the floor of a
    decode step made of these kernels, with no attention, norms or other small ops."""
    import torch
    t, d = model.cfg.text, model.decoder
    hidden, heads, inter = t.hidden_size, t.num_heads * t.head_dim, t.intermediate_size
    x = {n: torch.randn(1, 1, n, generator=torch.Generator().manual_seed(0), dtype=model.dtype)
         for n in (hidden, heads, inter)}
    calls = [(f, x[n]) for b in d.layers for f, n in ((b.self_attn.qkv_proj, hidden), (b.self_attn.o_proj, heads),
                                                       (b.mlp.gate_up_proj, hidden), (b.mlp.down_proj, inter))]
    calls.append((d.logits, x[hidden]))
    return median_pass_ms(lambda: [f(xi) for f, xi in calls], repeats)


def attention_pass_ms(model, context, repeats=3):
    """ms of the attention alone over a `context`-token bf16 (the model's dtype) KV cache, every layer in turn,
    one query each, with the kernels a decode step uses (attention.attend): the other floor of a step. The
    caches of all layers together exceed a CPU's last-level cache, so each layer's is read from memory, as in
    a real step."""
    import torch
    from minterleave.attention import attend
    t = model.cfg.text
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(t.num_layers, 1, t.num_kv_heads, context, t.head_dim, generator=g, dtype=model.dtype)
            for _ in range(2))  # (L, B, nkv, T, hs)
    q = torch.randn(1, t.num_heads, 1, t.head_dim, generator=g, dtype=model.dtype)  # (B, nh, 1, hs)
    return median_pass_ms(lambda: [attend(q, k[layer], v[layer], causal=True) for layer in range(t.num_layers)],
                          repeats)


def median_pass_ms(one_pass, repeats):
    """ms of one_pass(), median of `repeats` calls after a warm-up one, without autograd."""
    import torch
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            one_pass()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])


def decode_bytes(decoder):
    """Bytes of every tensor a decode step reads: the layers, the final norm and the output head."""
    mods = [decoder.layers, decoder.norm, decoder.lm_head if decoder.lm_head is not None else decoder.embed_tokens]
    seen = {}
    for m in mods:
        for t in list(m.parameters()) + list(m.buffers()):
            seen[id(t)] = t.numel() * t.element_size()  # (packed oneDNN tensors have no data_ptr)
    return sum(seen.values())


def write_qwen2(src, dst):
    """The decoder of checkpoint `src` (any layout minterleave loads) as a Qwen2ForCausalLM folder: its tensors
    renamed to model.* (and lm_head.weight when untied), its text config as config.json, and its tokenizer or,
    when it has none (bench.py's random checkpoint), the bundled tiny model's (the converter pads the
    vocabulary to vocab_size with unused tokens). Returns (tensors written, the tokenizer's folder)."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import save_file
    from minterleave.config import load_config, to_llava_hf_dict
    from minterleave.weights import PREFIXES, detect_layout, tensor_map, weight_files
    from minterleave.qcheckpoint import saved_scheme
    if saved_scheme(src) is not None:
        raise ValueError(f"{src}: a quantized minterleave checkpoint; --write-qwen2 needs the float checkpoint")
    cfg, where = load_config(src), weight_files(src)
    layout = detect_layout(cfg, where)
    txt = PREFIXES[layout][1]
    tensors = {}
    for name, (ours, _) in tensor_map(cfg, layout, 0).items():
        if ours.startswith("decoder."):
            with safe_open(where[name], "pt") as f:
                tensors["model." + name[len(txt):] if name.startswith(txt) else "lm_head.weight"] = f.get_tensor(name)
    os.makedirs(dst, exist_ok=True)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({**to_llava_hf_dict(cfg)["text_config"], "torch_dtype": dtype}, f, indent=2)
    tok = src if os.path.isfile(os.path.join(src, "tokenizer.json")) else os.path.join(ROOT, "weights",
                                                                                      "minterleave-tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if os.path.isfile(os.path.join(tok, name)):
            shutil.copy(os.path.join(tok, name), dst)
    return len(tensors), tok


def decode_bytes_per_token(cfg, dtype):
    """Bytes of the float decoder weights a decode step reads (cfg's shapes; bench.py uses it too)."""
    t, size = cfg.text, 2 if dtype in ("bfloat16", "float16") else 4
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    attn = t.hidden_size * (q + 2 * kv) + (q + 2 * kv) + q * t.hidden_size  # q/k/v with bias, o without
    layer = attn + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size  # + SwiGLU MLP + 2 norms
    return size * (t.num_layers * layer + t.hidden_size + t.vocab_size * t.hidden_size)


# ---------------------------------------------------------------- the worker subprocess
def worker(spec):
    spec = json.loads(spec)
    out = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything the libraries print goes to stderr
    os.dup2(2, 1)
    import torch
    torch.set_num_threads(spec["threads"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (1, spec["context"]), generator=g)
    ids[ids == spec["image_token"]] = 0
    impl, mode, n = spec["impl"], spec["mode"], spec["new"]
    t0 = time.perf_counter()
    if impl == "llama.cpp":
        from llama_cpp import Llama
        llm = Llama(model_path=spec["gguf"], n_ctx=spec["context"] + n + 8, n_threads=spec["threads"],
                    n_threads_batch=spec["threads"], n_batch=spec["context"], flash_attn=True, verbose=False)
        nbytes = os.path.getsize(spec["gguf"])

        def run():
            llm.reset()
            stamps, toks = [], []
            for tok in llm.generate(ids[0].tolist(), top_k=1, temp=0.0, reset=True):
                stamps.append(time.perf_counter())
                toks.append(tok)
                if len(toks) == n:
                    break
            return stamps, toks
    else:
        if impl == "minterleave":
            import minterleave as mi
            quant = None if mode == "bf16" else mode
            model = mi.Model.from_pretrained(spec["path"], dtype=torch.bfloat16, quantize=quant,
                                             group_size=spec["group_size"] if mode == "int4" else None)
            model.prepare_for_inference(spec["path"])  # packed bf16 matrices (the quantized ones stay as they are)
            nbytes = decode_bytes(model.decoder)
        else:
            from transformers import LlavaForConditionalGeneration
            model = LlavaForConditionalGeneration.from_pretrained(spec["path"], dtype=torch.bfloat16).eval()
            nbytes = spec["bf16_bytes"]

        class Clock:  # a transformers streamer: the first put is the prompt
            def __init__(self):
                self.stamps = []

            def put(self, tokens):
                self.stamps.append(time.perf_counter())

            def end(self):
                pass

        def run():
            clock = Clock()
            with torch.no_grad():
                if impl == "minterleave":
                    new = model.generate(ids, max_new_tokens=n, stream=clock.put, eos_token_id=[])
                else:
                    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=clock)
                    new, clock.stamps = new[:, ids.shape[1]:], clock.stamps[1:]
            return clock.stamps, new[0].tolist()
    load_s = time.perf_counter() - t0
    run_ids = ids

    def reply(**r):
        out.write(json.dumps({**r, "rss_gb": hwm_gb()}) + "\n")
        out.flush()

    reply(load_s=load_s, bytes_per_token=nbytes)
    while (op := json.loads(sys.stdin.readline() or '{"op": "exit"}')["op"]) != "exit":
        if op == "parts":  # after every "run": what the parts allocate must not count in a run's peak RSS
            reply(matrix_ms=matrix_pass_ms(model), attention_ms=attention_pass_ms(model, run_ids.shape[1]))
            continue
        t0 = time.perf_counter()
        stamps, toks = run()
        reply(prefill_tok_s=run_ids.shape[1] / (stamps[0] - t0),
              decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]),
              tokens=toks)
    return 0


class Worker:
    def __init__(self, spec):
        self.name, self.log = f"{spec['impl']} {spec['mode']}", tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench_decode.py"), json.dumps(spec)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self.loaded = self.call(None)

    def call(self, op="run"):
        if op is not None:
            try:
                self.p.stdin.write(json.dumps({"op": op}) + "\n")
                self.p.stdin.flush()
            except OSError:  # the worker is gone (killed, out of memory): say so below, as for a closed pipe
                pass
        if op == "exit":
            return self.p.wait()
        line = self.p.stdout.readline()
        if not line:
            self.p.wait()
            self.log.seek(0)
            raise RuntimeError(f"the {self.name} worker died:\n{self.log.read()[-4000:]}")
        return json.loads(line)


def parts_table(results):
    """The second table: per minterleave mode, ms per token of the whole step and of its two parts timed alone,
    next to llama.cpp's whole step at the same bits (when it ran). No rows when the parts were not timed."""
    rows = []
    for name, res in results.items():
        if "matrix_ms" in res:
            ll = results.get(f"llama.cpp {SAME_BITS[name.split()[1]]}")
            vs = f"{ll['step_ms']:.1f} | {res['floor_vs_llama_cpp_step']:.2f}x" if ll else "- | -"
            rows.append(f"| {name} | {res['step_ms']:.1f} | {res['matrix_ms']:.1f} | {res['attention_ms']:.1f} "
                        f"| {vs} |")
    return ["", "| ms per decoded token | whole step | matrix products alone | attention alone | llama.cpp whole "
            "step, same bits | (matrices + attention) / llama.cpp step |", "|---|---:|---:|---:|---:|---:|"] + rows \
        if rows else []


# ---------------------------------------------------------------- the parent
def main(argv, build_default=None):
    """build_default(path): writes bench.py's random 0.5B checkpoint when it is not there yet (bench.py passes it)."""
    p = cli.ArgumentParser(prog="bench.py decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the random 0.5B one of bench.py)")
    p.add_argument("--modes", default="bf16,int8,int4", help="minterleave modes, in order (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128),
                   help="int4 group (default: %(default)s)")
    p.add_argument("--context", type=cli.positive_int, default=758, help="prompt tokens (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to decode (default: %(default)s)")
    p.add_argument("--rounds", type=cli.positive_int, default=3, help="alternating rounds (default: %(default)s)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="threads of every worker (default: %(default)s)")
    p.add_argument("--no-transformers", action="store_true", help="skip transformers bf16")
    p.add_argument("--gguf", default=None, help="llama.cpp models as TYPE=FILE,... with TYPE bf16, q8_0 or q4_0 "
                   "(needs llama-cpp-python; default: none)")
    p.add_argument("--write-qwen2", metavar="DIR", help="only write the checkpoint's decoder to DIR as a "
                   "Qwen2ForCausalLM folder for llama.cpp's convert_hf_to_gguf.py, then exit")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 64-token context, 4 new tokens, 0.25 GB probe (tests)")
    p.add_argument("--json", help="write the results to this file (default: print only)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.context, args.new_tokens = 1, 64, 4
    if args.new_tokens < 2:
        p.error("argument --new-tokens: expected at least 2 (decode speed needs two stamps)")
    modes = args.modes.split(",")
    if set(modes) - set(MI_MODES):
        p.error(f"argument --modes: expected some of {','.join(MI_MODES)}, got {args.modes!r}")
    gguf = dict(kv.split("=", 1) for kv in args.gguf.split(",")) if args.gguf else {}
    for kind, file in gguf.items():
        if kind not in SAME_BITS.values():
            p.error(f"argument --gguf: type {kind!r} is not one of {', '.join(SAME_BITS.values())}")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no such GGUF file (--gguf {kind})")
    if gguf:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ValueError("--gguf needs llama-cpp-python (pip install llama-cpp-python)") from None

    import torch
    from minterleave import hub
    from minterleave.config import load_config
    path = hub.resolve(args.model) if args.model else os.path.join(ROOT, "cache", "bench-0.5b")
    if not args.model and not os.path.isfile(os.path.join(path, "config.json")):
        if build_default is None:
            raise FileNotFoundError(f"{path}: no checkpoint; `python bench.py decode` writes it (or give --model)")
        build_default(path)
    if args.write_qwen2:
        n, tok = write_qwen2(path, args.write_qwen2)
        print(f"{args.write_qwen2}: {n} decoder tensors of {path}, its text config, the tokenizer of {tok}")
        return 0
    cfg = load_config(path)
    t = cfg.text
    bf16_bytes = decode_bytes_per_token(cfg, "bfloat16")
    base = dict(path=path, vocab=t.vocab_size, image_token=cfg.image_token_id, context=args.context,
                new=args.new_tokens, threads=args.threads, group_size=args.group_size, bf16_bytes=bf16_bytes)
    runs = [("minterleave", m) for m in modes]
    runs += [] if args.no_transformers else [("transformers", "bf16")]
    runs += [("llama.cpp", kind) for kind in gguf]
    cli_line = "python bench.py decode " + " ".join(argv)
    print(f"{cli_line}\nmodel {path}; {args.context}-token prompt, {args.new_tokens} greedy tokens, "
          f"{args.threads} threads, {args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    bw = stream_bandwidth(0.25 if args.quick else 1.0)
    print(f"read bandwidth {bw['read_gbs']:.1f} GB/s (sum {bw['sum_gbs']:.1f}, copy {bw['copy_gbs']:.1f})", flush=True)
    workers, samples = {}, {}
    for impl, mode in runs:
        w = workers[(impl, mode)] = Worker({**base, "impl": impl, "mode": mode, "gguf": gguf.get(mode)})
        samples[(impl, mode)] = {"load_s": w.loaded["load_s"], "bytes_per_token": w.loaded["bytes_per_token"],
                                 "prefill_tok_s": [], "decode_tok_s": []}
        print(f"{impl} {mode}: loaded in {w.loaded['load_s']:.2f} s", flush=True)
    for key in workers:  # warm-up (first-call allocations, oneDNN primitive creation)
        workers[key].call()
    tokens = {}
    for r in range(args.rounds):
        for key, w in workers.items():
            x = w.call()
            s = samples[key]
            s["prefill_tok_s"].append(x["prefill_tok_s"])
            s["decode_tok_s"].append(x["decode_tok_s"])
            s["peak_rss_gb"], tokens[key] = x["rss_gb"], x["tokens"]
            print(f"round {r + 1} {key[0]:12s} {key[1]:5s} prefill {x['prefill_tok_s']:7.1f} tok/s, decode "
                  f"{x['decode_tok_s']:6.2f} tok/s, VmHWM {x['rss_gb']:.2f} GB", flush=True)
    try:
        for r in range(args.rounds):  # the parts of a minterleave step alone, in rounds again
            for key, w in workers.items():
                if key[0] == "minterleave":
                    x = w.call("parts")
                    for k in ("matrix_ms", "attention_ms"):
                        samples[key].setdefault(k, []).append(x[k])
    except RuntimeError as e:  # a worker died: keep the runs measured so far, without the parts
        print(f"timing the parts alone failed, left out: {str(e).splitlines()[0]}", flush=True)
        for kept in samples.values():
            kept.pop("matrix_ms", None), kept.pop("attention_ms", None)
        workers = {k: w for k, w in workers.items() if w.p.poll() is None}
    for w in workers.values():
        if w.p.poll() is None:
            w.call("exit")
    end = stream_bandwidth(0.25 if args.quick else 1.0)
    print(f"read bandwidth at the end {end['read_gbs']:.1f} GB/s", flush=True)
    bw = max(bw, end, key=lambda b: b["read_gbs"])
    results = {}
    for (impl, mode), s in samples.items():
        res = {k: statistics.median(v) if isinstance(v, list) else v for k, v in s.items()}
        res["step_ms"] = 1000 / res["decode_tok_s"]
        res["decode_gbs"] = res["bytes_per_token"] * res["decode_tok_s"] / 1e9
        res["bw_frac"] = res["decode_gbs"] / bw["read_gbs"]
        results[f"{impl} {mode}"] = res
    tf = results.get("transformers bf16")
    for (impl, mode), res in list((k, results[f"{k[0]} {k[1]}"]) for k in samples):
        if impl != "minterleave":
            continue
        if tf:
            res["vs_transformers_bf16"] = {k: res[k] / tf[k] for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_gb")}
            res["same_tokens_as_transformers"] = tokens[(impl, mode)] == tokens[("transformers", "bf16")]
        ll = results.get(f"llama.cpp {SAME_BITS[mode]}")
        if ll:
            res["vs_llama_cpp_same_bits"] = {k: res[k] / ll[k]
                                             for k in ("decode_tok_s", "prefill_tok_s", "peak_rss_gb")}
            if "matrix_ms" in res:
                res["floor_vs_llama_cpp_step"] = (res["matrix_ms"] + res["attention_ms"]) / ll["step_ms"]
    lines = ["", f"| {args.context}-token prompt, {args.threads} threads | decode tok/s | prefill tok/s | peak RSS GB "
             f"| MB read/token | GB/s | of {bw['read_gbs']:.1f} GB/s | decode, prefill, RSS vs transformers bf16 "
             f"| vs llama.cpp, same bits |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, res in results.items():
        ratio = lambda key: " / ".join(f"{v:.2f}x" for v in res[key].values()) if key in res else "-"  # noqa: E731
        lines.append(f"| {name} | {res['decode_tok_s']:.1f} | {res['prefill_tok_s']:.0f} | {res['peak_rss_gb']:.2f} | "
                     f"{res['bytes_per_token'] / 1e6:.0f} | {res['decode_gbs']:.1f} | {res['bw_frac']:.0%} | "
                     f"{ratio('vs_transformers_bf16')} | {ratio('vs_llama_cpp_same_bits')} |")
    print("\n".join(lines + parts_table(results)) + f"\nload average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cli_line, "bandwidth": bw, "model": path, "args": vars(args), "results": results,
                       "torch": torch.__version__, "cores": os.cpu_count()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
