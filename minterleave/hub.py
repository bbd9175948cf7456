"""A checkpoint folder, or a Hugging Face Hub id such as `llava-hf/llava-interleave-qwen-0.5b-hf`.

    path = resolve("weights/minterleave-tiny")                  # an existing folder: returned as is
    path = resolve("llava-hf/llava-interleave-qwen-0.5b-hf")    # a hub id: its folder in the hub cache

As in transformers, a hub id is fetched once into the standard hub cache (~/.cache/huggingface/hub, or
HF_HUB_CACHE) and read from there afterwards; with HF_HUB_OFFLINE=1 or no network the cached copy is
used. huggingface_hub is only imported for ids (`pip install "minterleave[hub]"`).
"""

import os
import re

# what a checkpoint folder needs: config and processor files, weights, tokenizer, chat template
FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]
# the hub's "org/name" (it also allows a bare "name"; we ask for the org so a mistyped folder never
# becomes a download)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")


def resolve(path_or_id):
    """The local folder for a checkpoint folder or a hub id; FileNotFoundError (one line) if neither,
    NotADirectoryError for a file."""
    name = os.fspath(path_or_id)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):  # e.g. the weights file itself: say so rather than "no such folder"
        raise NotADirectoryError(f"{name}: is a file, not a checkpoint folder (the folder holding config.json "
                                 f"and *.safetensors)")
    if not REPO_ID.fullmatch(name) or "--" in name or ".." in name:
        raise FileNotFoundError(f"{name}: no such checkpoint folder (nor a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f'{name}: no such folder; to fetch it as a hub id, install huggingface_hub '
                                f'(pip install "minterleave[hub]")') from None
    try:  # online: fetch what is missing; offline or unreachable: the cached snapshot, if any
        return snapshot_download(name, allow_patterns=FILES)
    except Exception as e:  # not found, gated, offline and not cached, disk: all end the same way
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # hub errors run long
        raise FileNotFoundError(f"{name}: no such folder, and the hub id could not be fetched nor found in the "
                                f"hub cache ({type(e).__name__}: {reason})") from None
