"""bench.py decode --write-qwen2: the folder llama.cpp's converter reads holds the checkpoint's own decoder.

transformers' Qwen2ForCausalLM loads the written folder and gives the logits the LLaVA model's language model
gives on the same text ids, in every checkpoint layout minterleave loads, tied or untied head, one file or shards.
(The llama.cpp side itself needs llama-cpp-python and a converted GGUF; README "Decoding at the bandwidth limit".)
"""

import json
import os

import pytest
import torch
from transformers import Qwen2ForCausalLM

import bench_decode
from tiny_model import hf_model, save_checkpoint


@pytest.mark.parametrize("layout,tied,shards", [("llava-hf", True, 1), ("hf5", False, 1), ("lmms-lab", False, 2)])
def test_write_qwen2_is_the_checkpoints_decoder(tmp_path, layout, tied, shards):
    model = hf_model(seed=5, tied=tied)
    src = save_checkpoint(model, str(tmp_path / "ckpt"), layout=layout, shards=shards)
    dst = str(tmp_path / "qwen2")
    assert bench_decode.main(["--model", src, "--write-qwen2", dst]) == 0
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] == tied
    assert os.path.isfile(os.path.join(dst, "tokenizer.json"))  # the bundled tiny model's: the checkpoint has none
    qwen2 = Qwen2ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.text_config.vocab_size - 1, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = qwen2(input_ids=ids).logits
    assert torch.equal(got, want)
