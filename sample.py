"""Ask a LLaVA-Interleave checkpoint about images, a video, 3D views or one large image.

    python sample.py                                     # the bundled tiny model: one demo per domain
    python sample.py --model DIR --image a.png --image b.png --prompt "What changed?"
    python sample.py --model DIR --video clip.mp4 --frames 8 --prompt "What happens?"
    python sample.py --model DIR --views v0.png v1.png v2.png --prompt "How many objects?"
    python sample.py --model DIR --image big.png --multi-patch --prompt "What is written?"
    python sample.py --model llava-hf/llava-interleave-qwen-0.5b-hf --image a.png  # a hub id (fetched once)
    python sample.py --chat [--image a.png]              # a multi-turn chat that keeps its KV cache (chat.py)

The prompt may place media itself with `<image>` / `<video>` placeholders (filled in the
order given: --image files, then --views, then --video); without placeholders every medium goes
first, as the chat template does. The answer streams as it is generated; a last line gives the
prompt length, the number of new tokens and the speed. Bad input ends with one line on stderr
(`sample.py: error: ...`, exit status 1; 2 for a bad flag); --debug shows the traceback instead.
"""

import os
import sys

import torch

from minterleave import cli

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = os.path.join(HERE, "weights", "minterleave-tiny")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=BUNDLED,
                   help="checkpoint folder or hub id, e.g. llava-hf/llava-interleave-qwen-0.5b-hf (default: the "
                        "bundled tiny model, %(default)s)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeatable, in order)")
    p.add_argument("--video", help="a video file (frames sampled uniformly)")
    p.add_argument("--frames", type=cli.positive_int, default=None,
                   help="frames to sample from --video (default: the checkpoint's num_frames, else 16)")
    p.add_argument("--views", nargs="+", default=[], help="views of one 3D scene (one image each)")
    p.add_argument("--multi-patch", action="store_true", help="tile the single --image AnyRes-style (overview + tiles)")
    ask = p.add_mutually_exclusive_group()
    ask.add_argument("--prompt", default=None, type=cli.utf8_text,
                     help="the question; may contain <image>/<video> placeholders. Without one (or with an empty "
                          "one): 'Describe what you see.' when media are given, else the model's "
                          "one-question-per-domain tour")
    ask.add_argument("--prompt-file", default=None, metavar="FILE", help="read the question from FILE (UTF-8)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=64,
                   help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=cli.positive_int, default=None,
                   help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=cli.probability, default=None,
                   help="nucleus sampling threshold, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: %(default)s)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT's format) or hub id, merged into the weights before decoding")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8 (per row) or int4 (--group-size) weight-only decoder weights (faster CPU decoding, "
                        "small logit drift; default: off)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="input columns per int4 scale (default: %(default)s)")
    p.add_argument("--attn", default=None, choices=["naive", "sdpa", "triton"],
                   help="attention backend (default: triton on CUDA, sdpa elsewhere)")
    p.add_argument("--no-check-finite", action="store_true", help="skip the NaN/Inf check of the weights (faster load)")
    p.add_argument("--chat", action="store_true",
                   help="a multi-turn chat (commands /image, /video, /views, /reset, /save, /ttft, /quit); the media "
                        "and --prompt given here start its first turn")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    if args.prompt_file is not None:  # read now: a bad file is found before the model is loaded
        args.prompt = cli.read_text(args.prompt_file, "--prompt-file").removesuffix("\n")
    if args.prompt is not None and not args.prompt.strip():
        args.prompt = None  # an empty prompt is no prompt, as --help says
    if args.multi_patch and len(args.image) != 1:
        p.error("--multi-patch needs exactly one --image")
    if args.multi_patch and args.chat:
        p.error("--multi-patch is not available with --chat")
    return args


def build_prompt(proc, question, n_images, has_video):
    """The chat-formatted prompt: media first unless the question places them itself."""
    if "<image>" in question or "<video>" in question:
        content = [{"type": "text", "text": question}]
    else:
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * has_video
        content = content + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}])


def load(args):
    """(model, processor, folder) as the flags ask: adapter merged, int8, packed for decoding (serve.py too)."""
    import minterleave as mi
    from minterleave import hub

    if args.attn:
        mi.set_backend(args.attn)
    path = hub.resolve(args.model)  # a folder, or a hub id fetched once into the hub cache
    model = mi.Model.from_pretrained(path, device=args.device, dtype=args.dtype,
                                     check_finite=not args.no_check_finite, adapter=args.adapter)
    if args.adapter:  # decode from merged weights: one matmul per projection, packable and quantizable
        from minterleave.lora import merge_lora
        merge_lora(model)
    if args.quantize:
        from minterleave.quantize import quantize
        quantize(model, args.quantize, args.group_size if args.quantize == "int4" else None)
    model.prepare_for_inference(path)  # packed decoder weights for CPU decoding (packing.py)
    return model, mi.Processor.from_pretrained(path), path


def chat(args, model, proc, gen):
    """--chat: the first turn from the flags (if a prompt is given), then the REPL on stdin."""
    from minterleave.chat import ChatSession, repl

    session = ChatSession(model, proc, seed=gen.pop("seed"))
    for image in args.image:
        session.add_image(image)
    if args.views:
        session.add_views(args.views)
    if args.video:
        session.add_video(args.video, args.frames)
    if args.prompt is not None:
        print(f"> {args.prompt}")
        session.ask(args.prompt, stream=lambda piece: print(piece, end="", flush=True), **gen)
        print()
    return repl(session, gen)


def main(argv=None):
    args = parse_args(argv)
    model, proc, path = load(args)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
               top_p=args.top_p, seed=args.seed)
    if args.chat:
        return chat(args, model, proc, gen)
    from minterleave.demo import run_demo, stream_answer
    media = args.image or args.views or args.video
    if args.prompt is None and not media:  # the one-example-per-domain tour of the bundled model
        return run_demo(model, proc, gen, model_name=args.model)
    question = args.prompt or "Describe what you see."
    images = args.image + args.views
    prompt = build_prompt(proc, question, len(images), bool(args.video))
    _, n_prompt, n_new, seconds = stream_answer(model, proc, prompt, images, [args.video] if args.video else [],
                                                args.frames, args.multi_patch, out=sys.stdout, **gen)
    print(f"[prompt {n_prompt} tokens, {n_new} new tokens, {n_new / max(seconds, 1e-9):.1f} tokens/s]")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
