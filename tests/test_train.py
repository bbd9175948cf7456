"""train.py: loss goes down, checkpoints load in minterleave and transformers alike, atomic save + resume
continues exactly, 2-process DDP equals one process; and the bundled checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minterleave as mi
from minterleave import checkpoint, data, streams, tasks

import train  # the repo root is on pytest's pythonpath (pytest.ini)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")
FAST = ["--preset", "test", "--batch-size", "4", "--log-every", "1", "--warmup", "2", "--lr", "5e-3"]


def log(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "ckpt")
    train.main(FAST + ["--domain", "all", "--max-steps", "2", "--out", out])
    return out


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_a_few_steps_lower_the_loss(tmp_path, domain):
    out = str(tmp_path / domain)
    train.main(FAST + ["--domain", domain, "--max-steps", "25", "--out", out, "--seed", "1"])
    losses = [r["loss"] for r in log(out)]
    assert len(losses) == 25 and [r["step"] for r in log(out)] == list(range(1, 26))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (domain, losses)


def test_patch_words_loss_goes_down_and_needs_a_3x3_grid(tmp_path):
    out = str(tmp_path / "pw")
    train.main(FAST + ["--domain", "video", "--max-steps", "25", "--out", out, "--seed", "1", "--patch-words", "1"])
    patch = [r["patch_loss"] for r in log(out)]
    assert len(patch) == 25
    # two words per cell, so the floor is ln 2 (0.69); it starts near ln(vocab) = 6.4
    assert sum(patch[-3:]) / 3 < 0.5 * sum(patch[:3]) / 3, patch
    with pytest.raises(ValueError, match="3x3"):
        train.main(FAST + ["--set", "patch_size=16", "--max-steps", "1", "--out", str(tmp_path / "x"),
                           "--patch-words", "1"])


def test_domain_and_qtype_weights_keep_seeds_distinct_balanced_and_in_the_training_range():
    cycle = streams.domain_cycle("all", "multi_image=3,video=2")
    assert sorted(cycle) == sorted(["multi_image"] * 3 + ["video"] * 2 + ["3d", "multi_patch"])
    stream = streams.SyntheticStream(cycle, 0, None, 96, 4, streams.qtype_cycles("multi_image/which_image=3"))
    seen, per = set(), {}
    for d in tasks.DOMAINS:
        for k in range(600):
            s = stream.sample_seed(d, k)
            assert s >= data.TRAIN_SEED_BASE and (d, s) not in seen
            seen.add((d, s))
            q = tasks.QTYPES[d][s % len(tasks.QTYPES[d])]
            per.setdefault(d, {}).setdefault(q, []).append(s)
    mi = {q: len(v) for q, v in per["multi_image"].items()}
    assert mi == {"spot_diff": 120, "which_image": 360, "count": 120}
    for s_list in per["multi_image"].values():  # answers cycle evenly within each question type
        answers = [(s // 3) % 3 for s in s_list[:300]]
        assert len(set(answers)) == 3 and max(map(answers.count, set(answers))) - min(map(answers.count, set(answers))) <= 1
    assert stream.sample_seed("video", 7) == data.train_seed(0, 7)  # unweighted domains: plain seeds
    with pytest.raises(ValueError, match="nonsense"):
        streams.qtype_cycles("video/nonsense=2")
    with pytest.raises(SystemExit):  # train.py refuses it before loading anything
        train.parse_args(["--qtype-weights", "video/nonsense=2"])


def test_checkpoint_layout_and_files(trained):
    names = set(os.listdir(trained))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
              "preprocessor_config.json", "processor_config.json", "generation_config.json", "train_log.jsonl"):
        assert f in names, f
    assert not os.path.exists(trained + ".tmp") and not os.path.exists(trained + ".old")
    assert json.load(open(os.path.join(trained, checkpoint.STATE_JSON)))["step"] == 2
    # the optimizer state: both AdamW moments of every parameter (by its name), its step, and the RNG
    from safetensors.torch import load_file
    state = load_file(os.path.join(trained, checkpoint.STATE_TENSORS))
    params = dict(mi.Model.from_pretrained(trained).named_parameters())
    for kind in ("exp_avg", "exp_avg_sq", "step"):
        assert {k.split("/", 1)[1] for k in state if k.startswith(kind + "/")} == set(params), kind
    for name, p in params.items():
        assert state[f"exp_avg/{name}"].shape == p.shape and state[f"exp_avg/{name}"].abs().sum() > 0, name
    assert "rng/torch" in state


def test_logged_loss_is_the_models_own_loss_of_the_global_batch(tmp_path):
    """train.py's loss is Model.forward(labels=...) over all supervised tokens of the step: two micro-batches
    of 4 (gradient accumulation) log the mean loss of one batch of 8 under the initial weights."""
    out = str(tmp_path / "run")
    argv = FAST + ["--domain", "all", "--max-steps", "1", "--grad-accum", "2", "--out", out]
    train.main(argv)
    args = train.parse_args(argv)
    model, _ = train.build_model(args, str(tmp_path / "assets"))
    proc = mi.Processor.from_pretrained(str(tmp_path / "assets"))
    stream, _ = train.make_stream(args, proc, model.cfg)
    b = data.collate([stream(g) for g in range(8)], proc.pad_token_id)
    with torch.no_grad():
        _, loss = model(b["input_ids"], b["pixel_values"], attention_mask=b["attention_mask"], labels=b["labels"])
    assert abs(log(out)[0]["loss"] - loss.item()) < 1e-5 * loss.item(), (log(out)[0]["loss"], loss.item())


def test_checkpoint_logits_equal_in_minterleave_and_transformers(trained):
    from transformers import LlavaForConditionalGeneration
    model = mi.Model.from_pretrained(trained)
    proc = mi.Processor.from_pretrained(trained)
    hf = LlavaForConditionalGeneration.from_pretrained(trained, dtype=torch.float32).eval()
    smp = tasks.make_sample("video", 3)
    inputs = proc(data.prompt_for(proc, smp), images=smp.images)
    with torch.no_grad():
        ours = model(**inputs)
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    err = (ours - ref).abs().max().item()
    assert err < 1e-4, err


def test_save_is_atomic_and_resume_continues_exactly(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    args = FAST + ["--domain", "all", "--max-steps", "6", "--seed", "2"]
    train.main(args + ["--out", full])
    train.main(args + ["--out", cut, "--stop-at", "3", "--save-every", "100"])
    state = json.load(open(os.path.join(cut, checkpoint.STATE_JSON)))
    assert state["step"] == 3 and state["samples"] == 12
    # a crash while the next checkpoint was being written leaves a partial .tmp: it is ignored
    os.makedirs(cut + ".tmp")
    open(os.path.join(cut + ".tmp", "model.safetensors"), "w").write("partial")
    # log lines written after the checkpoint (the crash came before the next save) are dropped
    with open(os.path.join(cut, "train_log.jsonl"), "a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    train.main(args + ["--out", cut, "--resume"])
    a, b = log(full), log(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, the steps after 3 included
    assert not os.path.exists(cut + ".tmp")
    ma, mb = mi.Model.from_pretrained(full), mi.Model.from_pretrained(cut)
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(p, q), n


def test_resume_falls_back_to_the_old_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    args = FAST + ["--domain", "video", "--max-steps", "4", "--seed", "4"]
    train.main(args + ["--out", out, "--stop-at", "2"])
    os.rename(out, out + ".old")  # the moment between the two renames of a save
    train.main(args + ["--out", out, "--resume"])
    assert json.load(open(os.path.join(out, checkpoint.STATE_JSON)))["step"] == 4


def test_trains_on_m4_instruct_json_and_fine_tunes_a_checkpoint(trained, tmp_path):
    tasks.write_dataset(str(tmp_path / "m4.json"), "all", 6, seed=8, out_dir=str(tmp_path / "img"), image_size=96)
    out = str(tmp_path / "ft")
    train.main(FAST + ["--init", trained, "--freeze", "vision", "--data", str(tmp_path / "m4.json"),
                       "--image-root", str(tmp_path / "img"), "--max-steps", "3", "--out", out])
    assert [r["step"] for r in log(out)] == [1, 2, 3]
    before, after = mi.Model.from_pretrained(trained), mi.Model.from_pretrained(out)
    assert torch.equal(before.vision.patch_embedding.weight, after.vision.patch_embedding.weight)  # frozen
    assert not torch.equal(before.projector.linear_1.weight, after.projector.linear_1.weight)
    assert mi.Processor.from_pretrained(out).tokenizer.to_str() == mi.Processor.from_pretrained(trained).tokenizer.to_str()


def test_refuses_to_overwrite_a_run_without_resume(trained):
    with pytest.raises(ValueError, match="--resume"):
        train.main(FAST + ["--max-steps", "1", "--out", trained])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    # --patch-words too: its scenes are split over the processes like the batch, not drawn per process
    common = ["--preset", "test", "--domain", "all", "--max-steps", "3", "--log-every", "1", "--warmup", "1",
              "--lr", "3e-3", "--seed", "5", "--threads", "1", "--patch-words", "0.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(common + ["--batch-size", "4", "--patch-words-images", "6", "--out", one])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), os.path.join(ROOT, "train.py")] + common + ["--batch-size", "2", "--patch-words-images",
                                                                          "3", "--out", two]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es), global batch 4" in r.stdout
    a, b = [x["loss"] for x in log(one)], [x["loss"] for x in log(two)]
    assert len(a) == len(b) == 3
    pa, pb = [x["patch_loss"] for x in log(one)], [x["patch_loss"] for x in log(two)]
    assert max(abs(x - y) for x, y in zip(pa, pb)) < 1e-4, (pa, pb)
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-4 * max(1.0, abs(x)), (a, b)
    ma, mb = mi.Model.from_pretrained(one), mi.Model.from_pretrained(two)
    err = max((p - q).abs().max().item() for p, q in zip(ma.parameters(), mb.parameters()))
    assert err < 1e-4, err


# --------------------------------------------------------------------------------- bundled checkpoint
needs_bundled = pytest.mark.skipif(not os.path.isfile(os.path.join(BUNDLED, "model.safetensors")),
                                   reason="weights/minterleave-tiny is not there yet (train it: weights/README.md)")


@needs_bundled
def test_bundled_checkpoint_is_small_and_complete():
    size = sum(os.path.getsize(os.path.join(BUNDLED, f)) for f in os.listdir(BUNDLED))
    assert size <= 10 * 2 ** 20, size
    assert not os.path.exists(os.path.join(BUNDLED, checkpoint.STATE_DIR))


@needs_bundled
def test_bundled_checkpoint_loads_in_minterleave_and_transformers_with_equal_logits():
    from transformers import LlavaForConditionalGeneration
    model = mi.Model.from_pretrained(BUNDLED)
    proc = mi.Processor.from_pretrained(BUNDLED)
    hf = LlavaForConditionalGeneration.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    smp = tasks.make_sample("multi_patch", 11)
    inputs = proc(data.prompt_for(proc, smp), images=smp.images, multi_patch=True)
    with torch.no_grad():
        ours = model(**inputs)
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    err = (ours - ref).abs().max().item()
    assert err < 1e-3, err
    assert proc.decode(ours[0, -1:].argmax(-1)) == proc.decode(ref[0, -1:].argmax(-1))



def test_grad_checkpoint_trains_the_same_steps(tmp_path):
    args = FAST + ["--domain", "all", "--max-steps", "3", "--seed", "5"]
    train.main(args + ["--out", str(tmp_path / "plain")])
    train.main(args + ["--out", str(tmp_path / "ckpt"), "--grad-checkpoint"])
    a, b = log(str(tmp_path / "plain")), log(str(tmp_path / "ckpt"))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6, abs=0)


def test_lora_fine_tune_saves_the_adapter_resumes_exactly_and_exports_merged(trained, tmp_path):
    """--lora-r: only the adapter trains; checkpoints hold the adapter (PEFT files) and its optimizer state;
    --resume continues with the identical losses; --export --merge writes a full model transformers reads."""
    from transformers import LlavaForConditionalGeneration
    from minterleave import lora
    args = FAST + ["--init", trained, "--domain", "video", "--max-steps", "4", "--seed", "6", "--lora-r", "4",
                   "--lora-parts", "decoder,vision,projector", "--lora-targets", "q_proj,v_proj,down_proj,fc1"]
    full, cut, export = str(tmp_path / "full"), str(tmp_path / "cut"), str(tmp_path / "merged")
    train.main(args + ["--out", full, "--export", export, "--merge"])
    files = set(os.listdir(full))
    assert {"adapter_config.json", "adapter_model.safetensors", checkpoint.STATE_DIR} <= files
    assert not files & {"model.safetensors", "config.json"}
    # the projector trained fully beside the adapters: PEFT's modules_to_save, its whole weights in the file
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in load_file(
        os.path.join(full, "adapter_model.safetensors"))
    train.main(args + ["--out", cut, "--stop-at", "2"])
    train.main(args + ["--out", cut, "--resume"])
    assert [r["loss"] for r in log(full)] == [r["loss"] for r in log(cut)]
    losses = [r["loss"] for r in log(full)]
    assert losses[-1] < losses[0], losses
    # the adapter on the untouched base equals the merged export, in minterleave and in transformers
    base = mi.Model.from_pretrained(trained, adapter=full)
    merged = mi.Model.from_pretrained(export)
    hf = LlavaForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    proc = mi.Processor.from_pretrained(trained)
    smp = tasks.make_sample("video", 5)
    inputs = proc(data.prompt_for(proc, smp), images=smp.images)
    with torch.no_grad():
        a, b = base(**inputs), merged(**inputs)
        ref = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits
    assert (a - b).abs().max().item() < 1e-4 and (b - ref).abs().max().item() < 1e-4
    assert lora.lora_layers(base) and not lora.lora_layers(merged)
    plain = mi.Model.from_pretrained(trained)
    assert not torch.equal(plain(**inputs), a)  # the adapter changed something
