"""train.py --fsdp (minterleave/distributed.py) on CPU with gloo: 2 sharded processes train exactly as 1 process with
the same global batch, save the same files, and a run resumes under another process count, FSDP or not; LoRA,
bf16 mixed precision, activation checkpointing and --export --merge compose with it."""

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minterleave as mi
from minterleave import checkpoint, data, lora, tasks

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--preset", "test", "--domain", "all", "--log-every", "1", "--warmup", "1", "--lr", "3e-3", "--seed", "5",
          "--threads", "1"]


def losses(out):
    with open(os.path.join(out, checkpoint.LOG)) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def torchrun(args, n=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
           os.path.join(ROOT, "train.py")] + args
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two small checkpoints: tied head (as the 0.5B model) and untied (as the 7B: embeddings and head are units)."""
    tied, untied = str(tmp_path_factory.mktemp("fsdp") / "tied"), str(tmp_path_factory.mktemp("fsdp") / "untied")
    train.main(COMMON + ["--max-steps", "1", "--batch-size", "4", "--out", tied])
    model = mi.Model.from_pretrained(tied)
    cfg = copy.deepcopy(model.cfg)
    cfg.text = dataclasses.replace(cfg.text, tie_word_embeddings=False)
    free = mi.Model(cfg)
    free.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        free.decoder.lm_head.weight.copy_(model.decoder.embed_tokens.weight * 1.5)
    checkpoint.save(untied, free, tied)
    return tied, untied


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def test_two_fsdp_processes_equal_one_process_and_resume_under_either_count(bases, tmp_path):
    one, two, back = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "back")
    common = COMMON + ["--init", bases[1]]  # untied: embeddings and head sharded as units of their own
    train.main(common + ["--max-steps", "4", "--batch-size", "4", "--out", one])
    # 2 sharded processes, global batch 4, stopped after step 2, then finished by 1 plain process
    out = torchrun(common + ["--max-steps", "4", "--batch-size", "2", "--fsdp", "--stop-at", "2", "--out", two])
    assert "2 process(es) (FSDP), global batch 4" in out
    half = mi.Model.from_pretrained(two)  # the step-2 checkpoint written from the shards
    assert losses(two) == pytest.approx(losses(one)[:2], rel=1e-5, abs=0)
    train.main(common + ["--max-steps", "4", "--batch-size", "4", "--out", two, "--resume"])
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses(one), losses(two)))
    print(f"FSDP 2 processes (steps 1-2) then 1 process (3-4) vs 1 process: largest relative loss difference {worst:.2g}")
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=0)
    assert max_diff(mi.Model.from_pretrained(one), mi.Model.from_pretrained(two)) < 1e-5
    # the saved optimizer moments are the whole tensors, under the same names as a single process writes
    a = load_file(os.path.join(one, checkpoint.STATE_TENSORS))
    b = load_file(os.path.join(two, checkpoint.STATE_TENSORS))
    assert sorted(a) == sorted(b)
    assert all(a[k].shape == b[k].shape for k in a)
    # 1 plain process to step 2, then 2 sharded processes resume it (each keeps its shard of the moments)
    train.main(common + ["--max-steps", "4", "--batch-size", "4", "--stop-at", "2", "--out", back])
    assert max_diff(mi.Model.from_pretrained(back), half) < 1e-5
    torchrun(common + ["--max-steps", "4", "--batch-size", "2", "--fsdp", "--out", back, "--resume"])
    assert losses(back) == pytest.approx(losses(one), rel=1e-5, abs=0)
    assert max_diff(mi.Model.from_pretrained(one), mi.Model.from_pretrained(back)) < 1e-5


def test_fsdp_lora_bf16_grad_checkpoint_saves_the_adapter_and_exports_merged(bases, tmp_path):
    base = bases[0]
    lora_args = ["--init", base, "--domain", "video", "--max-steps", "3", "--lora-r", "4", "--lora-parts",
                 "decoder,vision", "--dtype", "bfloat16", "--base-dtype", "bfloat16", "--grad-checkpoint"]
    one, two, merged = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "merged")
    train.main(COMMON[2:] + lora_args + ["--batch-size", "4", "--out", one])
    torchrun(COMMON[2:] + lora_args + ["--batch-size", "2", "--fsdp", "--out", two, "--export", merged, "--merge"])
    # FSDP's bf16 (weights cast once per gather) and autocast (per matmul) round differently: bf16 closeness
    assert losses(two) == pytest.approx(losses(one), rel=2e-3, abs=0)
    files = set(os.listdir(two))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    a = load_file(os.path.join(one, "adapter_model.safetensors"))
    b = load_file(os.path.join(two, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(k.startswith(lora.KEY_PREFIX) for k in a)
    # the merged export equals the adapter on its base
    proc = mi.Processor.from_pretrained(base)
    smp = tasks.make_sample("video", 3)
    inputs = proc(data.prompt_for(proc, smp), images=smp.images)
    with torch.no_grad():
        x = mi.Model.from_pretrained(base, adapter=two)(**inputs)
        y = mi.Model.from_pretrained(merged)(**inputs)
    assert (x - y).abs().max().item() < 1e-4


def test_fsdp_refuses_what_it_cannot_shard(capsys):
    for extra in (["--patch-words", "0.5"], ["--eval-every", "5"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x", "--fsdp"] + extra)
        assert "--fsdp" in capsys.readouterr().err
    for parts in ("projector", "decoder,foo"):  # the projector trains beside adapters, never alone
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x", "--init", "y", "--lora-r", "4", "--lora-parts", parts])
        assert f"--lora-parts {parts!r}" in capsys.readouterr().err
    train.parse_args(["--out", "x", "--init", "y", "--lora-r", "4", "--lora-parts", "vision,projector"])
