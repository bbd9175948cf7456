"""Serve a checkpoint over HTTP with OpenAI's chat-completions API (minterleave/server.py).

    python serve.py                                   # the bundled tiny model on http://127.0.0.1:8000/v1
    python serve.py --model DIR --api-key KEY --media-root ~/pictures --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

Binds 127.0.0.1 unless --host says otherwise. Requests that arrive while others decode join the running
batch (minterleave/batching.py). Ctrl-C stops it. Bad flags or files end with one line on stderr
(`serve.py: error: ...`); --debug shows the traceback instead.
"""

import os
import sys

import torch

from minterleave import cli
from sample import BUNDLED, load


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=BUNDLED,
                   help="checkpoint folder or hub id (default: the bundled tiny model, %(default)s)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter folder (PEFT's format), merged")
    p.add_argument("--name", default=None, help="the model name clients see (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 = any free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MINTERLEAVE_API_KEY if set, else no key)")
    p.add_argument("--media-root", default=None, metavar="DIR",
                   help="allow local image/video paths and file:// URLs inside DIR (default: data: URLs only)")
    p.add_argument("--max-body-mb", type=cli.positive_int, default=64, help="request body limit (default: %(default)s)")
    p.add_argument("--max-media-mb", type=cli.positive_int, default=20,
                   help="limit per image or video (default: %(default)s)")
    p.add_argument("--max-tokens", type=cli.positive_int, default=512,
                   help="answer length when a request sets none (default: %(default)s, capped by the context)")
    p.add_argument("--max-batch", type=cli.positive_int, default=8, help="rows decoded together (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: %(default)s)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="int8 (per row) or int4 (--group-size) weight-only decoder weights (default: off)")
    p.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128],
                   help="input columns per int4 scale (default: %(default)s)")
    p.add_argument("--attn", default=None, choices=["naive", "sdpa", "triton"], help="attention backend")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: %(default)s, torch's choice)")
    p.add_argument("--no-check-finite", action="store_true", help="skip the NaN/Inf check of the weights")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    args.api_key = args.api_key or os.environ.get("MINTERLEAVE_API_KEY")  # not in --help, which would show it
    if args.media_root is not None and not os.path.isdir(args.media_root):
        p.error(f"argument --media-root: {args.media_root} is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    from minterleave.server import App, make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    model, proc, path = load(args)
    name = args.name or os.path.basename(os.path.normpath(args.model))
    app = App(model, proc, name, api_key=args.api_key, media_root=args.media_root, max_body_mb=args.max_body_mb,
              max_media_mb=args.max_media_mb, default_max_tokens=args.max_tokens, max_batch=args.max_batch)
    server = make_server(app, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
