"""Fetch the official LLaVA-NeXT-Interleave checkpoints (llava-hf layout) from the Hugging Face Hub.

    python weights/download.py                 # 0.5b → weights/llava-interleave-qwen-0.5b-hf
    python weights/download.py 7b --dir /data  # 7b   → /data/llava-interleave-qwen-7b-hf

Uses huggingface_hub.snapshot_download (`pip install "minterleave[hub]"`) for the files a checkpoint
needs (weights, config, tokenizer and processor files). The rest of the project needs the network only
for hub ids: the scripts' `--model llava-hf/...` fetches into the hub cache instead of a folder here.
When the download cannot happen (huggingface_hub missing, no network, hub refused) it prints one line
saying why and exits with status 1.
"""

import argparse
import os
import sys

from minterleave.hub import FILES

MODELS = {"0.5b": "llava-hf/llava-interleave-qwen-0.5b-hf", "7b": "llava-hf/llava-interleave-qwen-7b-hf"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="0.5b", choices=sorted(MODELS) + sorted(MODELS.values()),
                   help="a size or its hub id (default: %(default)s)")
    p.add_argument("--dir", default=os.path.dirname(os.path.abspath(__file__)),
                   help="parent folder (default: %(default)s)")
    args = p.parse_args(argv)
    repo = MODELS.get(args.model, args.model)
    dest = os.path.join(args.dir, repo.split("/")[1])
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        print(f"cannot download {repo}: huggingface_hub is not installed (pip install \"minterleave[hub]\")")
        return 1
    try:
        path = snapshot_download(repo_id=repo, local_dir=dest, allow_patterns=FILES)
    except Exception as e:  # network, DNS, proxy, auth, disk: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"cannot download {repo} to {dest}: {type(e).__name__}: {reason}")
        return 1
    print(f"{repo} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
