"""End to end against transformers: processor + model + generate on a full tiny checkpoint
folder (tokenizer, chat template, preprocessor, weights), and sample.py as a user runs it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import minterleave as mi
from tiny_model import hf_model, save_checkpoint
from tiny_tokenizer import write_tokenizer_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipeline") / "ckpt")
    os.makedirs(path)
    ids = write_tokenizer_files(path, vocab_size=512, image_size=28, patch_size=14)
    hf = hf_model(seed=5, vocab=ids["vocab_size"], image_token=ids["image_token_id"], image_size=28,
                  kv_heads=2, tied=False)
    save_checkpoint(hf, path, "llava-hf")
    return path, hf


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33)]):
        p = str(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "Look at these."}, {"type": "image"}, {"type": "image"}, {"type": "image"},
    {"type": "text", "text": "What is the difference between these images?"}]}]


def test_prompt_ids_pixels_and_greedy_tokens_match_transformers(checkpoint, images):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    path, _ = checkpoint
    hf_proc = AutoProcessor.from_pretrained(path)
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = mi.Processor.from_pretrained(path)
    model = mi.Model.from_pretrained(path)

    prompt = proc.apply_chat_template(MESSAGES)
    assert prompt == hf_proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    pil = [Image.open(p) for p in images]
    ref = hf_proc(text=prompt, images=pil, return_tensors="pt")
    ours = proc(prompt, images=images)
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6

    n = 24  # no early stop on either side, so both must produce all 24 tokens
    with torch.no_grad():
        ref_new = hf.generate(**ref, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=proc.pad_token_id)[:, ref["input_ids"].shape[1]:]
    new = model.generate(**ours, max_new_tokens=n, eos_token_id=[])
    assert new.shape[1] == n
    assert new.tolist() == ref_new.tolist()
    assert proc.decode(new[0]) == hf_proc.decode(ref_new[0], skip_special_tokens=True)


def test_batched_prompts_through_the_processor(checkpoint, images):
    path, _ = checkpoint
    proc = mi.Processor.from_pretrained(path)
    model = mi.Model.from_pretrained(path)
    one = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}])
    two = proc.apply_chat_template(MESSAGES)
    batch = proc([one, two], images=images[:1] + images)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # left padding
    together = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    for row, (text, imgs) in enumerate([(one, images[:1]), (two, images)]):
        alone = model.generate(**proc(text, images=imgs), max_new_tokens=8, eos_token_id=[])
        assert together[row].tolist() == alone[0].tolist()


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_sample_py_runs_end_to_end(checkpoint, images):
    path, _ = checkpoint
    r = run_sample("--model", path, "--image", images[0], "--image", images[1], "--prompt",
                   "Image 1: <image> Image 2: <image> What changed?", "--max-new-tokens", "5", "--attn", "naive")
    assert r.returncode == 0, r.stderr
    assert "new tokens" in r.stdout.splitlines()[-1] and "tokens/s" in r.stdout.splitlines()[-1]


def test_sample_py_video_views_and_multi_patch(checkpoint, images, tmp_path):
    import av
    path, _ = checkpoint
    video = str(tmp_path / "clip.mp4")
    with av.open(video, "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 20, np.uint8), format="rgb24")
            for pkt in s.encode(frame):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    for args in (["--video", video, "--frames", "3"], ["--views", *images], ["--image", images[0], "--multi-patch"]):
        r = run_sample("--model", path, "--prompt", "What is it?", "--max-new-tokens", "3", *args)
        assert r.returncode == 0, (args, r.stderr)


@pytest.mark.parametrize("args, message", [
    (["--image", "/nonexistent/cat.png"], "/nonexistent/cat.png"),
    (["--image", "{img}", "--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image(s)"),
    (["--video", "{bad}"], "bad.mp4"),
    (["--image", "{bad}"], "bad.mp4"),
])
def test_sample_py_bad_input_is_one_clear_line(checkpoint, images, tmp_path, args, message):
    path, _ = checkpoint
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    args = [a.format(img=images[0], bad=bad) for a in args]
    r = run_sample("--model", path, "--max-new-tokens", "2", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_sample_py_context_overflow(checkpoint, images):
    path, _ = checkpoint
    r = run_sample("--model", path, "--prompt", "word " * 5000, "--max-new-tokens", "2")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "context" in r.stderr or "longer" in r.stderr, r.stderr


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "weights", "minterleave-tiny", "model.safetensors")),
                    reason="the bundled checkpoint is not there")
def test_sample_py_without_arguments_runs_the_bundled_demo(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    for domain in ("multi_image", "video", "3d", "multi_patch"):
        assert f"[{domain}]" in r.stdout
    assert r.stdout.strip().endswith("right.")
    assert (tmp_path / "sample_out" / "video.mp4").is_file()
