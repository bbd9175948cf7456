"""minterleave.processor / media against transformers' LlavaProcessor on tiny files (tests/tiny_tokenizer.py)."""

import json
import os
import shutil
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minterleave import media, video  # noqa: E402
from minterleave.config import special_tokens  # noqa: E402
from minterleave.processor import Processor  # noqa: E402
from tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, write_tokenizer_files  # noqa: E402

av = pytest.importorskip("av")
transformers = pytest.importorskip("transformers")

S, PATCH = 28, 14
TPI = (S // PATCH) ** 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tokenizer_files(d, image_size=S, patch_size=PATCH)
    return d


@pytest.fixture(scope="module")
def hf(tiny_dir):
    return transformers.AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return Processor.from_pretrained(tiny_dir)


def _rng_image(h, w, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(a, "RGBA")


# ------------------------------------------------------------------------------- tokenizer files

def test_tiny_files_deterministic_and_loadable_by_transformers(tmp_path, tiny_dir, hf):
    info = write_tokenizer_files(tmp_path, image_size=S, patch_size=PATCH)
    for name in os.listdir(tiny_dir):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert type(hf).__name__ == "LlavaProcessor"
    assert type(hf.image_processor).__name__ == "SiglipImageProcessorPil"
    assert type(hf.tokenizer).__name__ == "Qwen2Tokenizer"
    # Qwen order: the special tokens follow the BPE vocab; no BOS; eos <|im_end|>, pad <|endoftext|>
    ids = [hf.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(info["vocab_size"] - 4, info["vocab_size"]))
    assert info["image_token_id"] == hf.image_token_id == ids[-1]
    assert hf.tokenizer.eos_token == "<|im_end|>" and hf.tokenizer.pad_token == "<|endoftext|>"
    assert hf.tokenizer.bos_token is None
    assert len((tiny_dir / "chat_template.json").read_bytes()) == 699  # the hub file's size
    assert json.loads((tiny_dir / "chat_template.json").read_text())["chat_template"] == CHAT_TEMPLATE


def test_tokenizer_ids_match_transformers(proc, hf):
    for s in ["Hello world!", "  x\n\n\ty  ", "It's 2024: 3.14 café naïve 日本 🙂👍🏽 Привет",
              "<|im_start|>user\n<image>\nWhat are these?<|im_end|>\n<|im_start|>assistant\n"]:
        assert proc.encode(s) == hf.tokenizer(s)["input_ids"]


# --------------------------------------------------------------------------------- chat template

IMG, TXT = {"type": "image"}, (lambda t: {"type": "text", "text": t})
CONVERSATIONS = [
    [{"role": "user", "content": [IMG, TXT("What are these?")]}],
    [{"role": "user", "content": [IMG, IMG, IMG, TXT("Which image has a red ball?")]}],
    [{"role": "user", "content": [IMG, IMG, TXT("What is the difference?")]},
     {"role": "assistant", "content": [TXT("A cat.")]},
     {"role": "user", "content": [TXT("More?")]}],
    [{"role": "user", "content": [TXT("What is the capital of France?")]}],
    [{"role": "user", "content": [TXT("Compare"), IMG, TXT("with"), IMG]},
     {"role": "assistant", "content": [TXT("The first is larger.")]},
     {"role": "user", "content": [IMG, TXT("And this one?\nAnswer briefly.")]},
     {"role": "assistant", "content": [TXT("Smaller.")]}],
    [{"role": "system", "content": [TXT("Be terse.")]}, {"role": "user", "content": [IMG, TXT("café 🙂")]}],
]


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(proc, hf, conv, gen):
    messages = CONVERSATIONS[conv]
    ours = proc.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)


def test_chat_template_documented_strings_and_extensions(proc):
    # the strings the official template renders
    assert proc.apply_chat_template(CONVERSATIONS[0]) == (
        "<|im_start|>user\n<image>\nWhat are these?<|im_end|>\n<|im_start|>assistant\n")
    assert proc.apply_chat_template(
        [{"role": "user", "content": [IMG, IMG, TXT("What is the difference?")]},
         {"role": "assistant", "content": [TXT("A cat.")]},
         {"role": "user", "content": [TXT("More?")]}]) == (
        "<|im_start|>user\n<image><image>\nWhat is the difference?<|im_end|>\n<|im_start|>assistant\n"
        "\nA cat.<|im_end|>\n<|im_start|>user\n\nMore?<|im_end|>\n<|im_start|>assistant\n")
    # extensions: plain-string content renders verbatim (Qwen2's template, LLaVA's training layout), with
    # its placeholders where they stand; video items render as <video>, media in order
    assert proc.apply_chat_template([{"role": "user", "content": "<image>\nhi"}]) == \
        "<|im_start|>user\n<image>\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert proc.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                    add_generation_prompt=False) == \
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert proc.apply_chat_template(
        [{"role": "user", "content": [TXT("Q"), {"type": "video"}, IMG]}], add_generation_prompt=False
    ) == "<|im_start|>user\n<video><image>\nQ<|im_end|>\n"


# ---------------------------------------------------------------------- ids + label mask (training)

@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_encode_chat_ids_and_labels_match_transformers_assistant_mask(proc, hf, conv):
    """encode_chat's ids are LlavaProcessor's for the same conversation and images, and its labels cover
    exactly the tokens transformers' return_assistant_tokens_mask marks, plus each assistant turn's <|im_end|>."""
    messages = CONVERSATIONS[conv]
    n_img = sum(c.get("type") == "image" for m in messages for c in m["content"])
    images = [_rng_image(30 + 7 * i, 40, i) for i in range(n_img)]
    it = iter(images)
    with_pixels = [{"role": m["role"], "content": [dict(c, image=next(it)) if c.get("type") == "image" else c
                                                   for c in m["content"]]} for m in messages]
    ref = hf.apply_chat_template(with_pixels, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 add_generation_prompt=False, return_tensors="pt")
    ours = proc.encode_chat(messages, images=images)
    ids = ours["input_ids"].tolist()
    assert ids == ref["input_ids"][0].tolist()
    if images:
        assert torch.equal(ours["pixel_values"], ref["pixel_values"])
    hf_mask = [bool(x) for x in ref["assistant_masks"][0].tolist()]
    im_end = proc.tokenizer.token_to_id("<|im_end|>")
    closing = [False] * len(ids)  # the <|im_end|> that closes an assistant turn
    for i, tok in enumerate(ids):
        if tok == im_end:
            opened = max(j for j in range(i) if ids[j] == proc.tokenizer.token_to_id("<|im_start|>"))
            closing[i] = proc.decode(ids[opened + 1:i], skip_special_tokens=False).startswith("assistant\n")
    expect = [m or c for m, c in zip(hf_mask, closing)]
    labels = ours["labels"].tolist()
    assert [lab != -100 for lab in labels] == expect
    assert all(lab == tok for lab, tok in zip(labels, ids) if lab != -100)
    assert any(expect) == any(m["role"] == "assistant" for m in messages)


def test_encode_chat_string_content_supervises_answer_and_im_end(proc):
    out = proc.encode_chat([{"role": "user", "content": "<image>\nWhat is it?"},
                            {"role": "assistant", "content": "A red square."}], images=[_rng_image(20, 20)])
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert proc.decode(ids, skip_special_tokens=False) == proc.apply_chat_template(
        [{"role": "user", "content": "<image>" * TPI + "\nWhat is it?"},
         {"role": "assistant", "content": "A red square."}], add_generation_prompt=False)
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert proc.decode(supervised, skip_special_tokens=False) == "A red square.<|im_end|>"
    prompt = proc.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}])
    n_prompt = len(proc(prompt, images=[_rng_image(20, 20)])["input_ids"][0])
    assert ids[n_prompt:n_prompt + 3] == supervised[:3]  # the answer starts where generation starts
    assert out["pixel_values"].shape == (1, 3, S, S)


# ------------------------------------------------------------------------------ ids and pixels

def test_input_ids_and_pixels_match_llava_processor(proc, hf):
    imgs = [_rng_image(50, 80, 1), _rng_image(90, 40, 2), _rng_image(28, 28, 3)]
    cases = [(proc.apply_chat_template(CONVERSATIONS[0]), imgs[:1]),
             (proc.apply_chat_template(CONVERSATIONS[1]), imgs),
             (proc.apply_chat_template(CONVERSATIONS[4]), imgs),
             ("<image> What this is? Assistant: This is", imgs[1:2]),
             (proc.apply_chat_template(CONVERSATIONS[3]), None)]
    for text, images in cases:
        ours = proc(text, images=images)
        ref = hf(text=text, images=images, return_tensors="pt")
        assert torch.equal(ours["input_ids"], ref["input_ids"])
        assert torch.equal(ours["attention_mask"], ref["attention_mask"])
        assert ours["input_ids"].dtype == torch.long and ours["input_ids"].shape[0] == 1
        n = len(images or [])
        assert int((ours["input_ids"] == proc.image_token_id).sum()) == n * TPI
        if n:
            assert ours["pixel_values"].dtype == torch.float32
            assert ours["pixel_values"].shape == (n, 3, S, S)
            assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6
        else:
            assert "pixel_values" not in ours and "pixel_values" not in ref


def test_attributes(proc, tiny_dir):
    info = write_tokenizer_files(tiny_dir / "again", image_size=S, patch_size=PATCH)
    assert proc.image_token_id == info["image_token_id"]
    # the stop ids are generation_config.json's (as transformers' generate uses them), read in one place
    assert proc.eos_token_ids == [info["eos_token_id"]] == special_tokens(tiny_dir)["eos"]
    assert proc.pad_token_id == info["pad_token_id"]
    # no config.json: the context comes from tokenizer_config.json's model_max_length
    assert (proc.image_size, proc.tokens_per_image, proc.max_length) == (S, TPI, 32768)


MODES = ["RGB", "L", "RGBA", "LA", "P", "P+transparency", "CMYK", "1"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw", [(37, 91), (120, 33), (S, S)])
def test_pixel_values_match_siglip_pil_backend(proc, hf, mode, hw):
    h, w = hw
    if mode == "P+transparency":
        im = _rng_image(h, w, 4, "RGB").convert("P")
        im.info["transparency"] = 7
    else:
        im = _rng_image(h, w, 5, mode)
    # The official preprocessor_config has do_convert_rgb: null, which transformers 5.24 takes as
    # "don't convert" (non-RGB images then fail there); ours always converts, as do_convert_rgb=True.
    ref = hf.image_processor(im, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    assert np.abs(proc.image_pixels(im) - ref).max() <= 1e-6


def test_16_bit_and_float_images_are_scaled_not_clipped(proc, hf, tmp_path):
    """16-bit: the high byte (as Pillow reads 16-bit RGB PNGs); float in [0, 1]: round(v * 255). transformers'
    convert("RGB") clips both at 255 (a mostly white image), the one place we differ on purpose."""
    a16 = np.random.default_rng(0).integers(0, 65536, (37, 91), dtype=np.uint16)
    grey = Image.fromarray((a16 >> 8).astype(np.uint8))
    ref = hf.image_processor(grey, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    png = tmp_path / "a16.png"
    Image.fromarray(a16).save(png)
    assert Image.open(png).mode == "I;16"
    for im in (Image.fromarray(a16), png, Image.fromarray(a16.astype(np.int32))):
        assert np.abs(proc.image_pixels(im) - ref).max() == 0
    clipped = hf.image_processor(Image.fromarray(a16), do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    assert (clipped > 0.9).mean() > 0.9  # what transformers gives: white
    f = np.random.default_rng(1).random((20, 30), dtype=np.float32)
    tif = tmp_path / "f.tif"
    Image.fromarray(f).save(tif)
    ref = hf.image_processor(Image.fromarray(np.round(f * 255).astype(np.uint8)), do_convert_rgb=True,
                             return_tensors="np")["pixel_values"][0]
    for im in (Image.fromarray(f), tif):
        assert np.abs(proc.image_pixels(im) - ref).max() == 0
    for bad, what in ((f * 255, r"^float image with values 1\.48.*\.\.254\.7"),
                      (f - 0.5, "float image with values -0.4"),
                      (np.full((4, 4), np.nan, np.float32), "nan"), (np.full((4, 4), -1, np.int32), "integer image")):
        with pytest.raises(media.MediaError, match=what):
            proc.image_pixels(Image.fromarray(bad))


def test_large_files_are_shrunk_while_decoding(proc, hf, tmp_path, monkeypatch):
    """Above MAX_PIXELS a file is decoded smaller (JPEG: libjpeg's 1/2..1/8 scaling; others: reduce) and
    oriented by its EXIF tag; at or below it, pixels stay transformers' (the parity tests above)."""
    rng = np.random.default_rng(3)
    small = np.repeat(np.repeat(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8), 16, 0), 16, 1)  # 240x320
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate
    jpg, png, tif = tmp_path / "big.jpg", tmp_path / "big.png", tmp_path / "big16.tif"
    Image.fromarray(small).save(jpg, exif=exif, quality=95)
    Image.fromarray(small).save(png, exif=exif)
    Image.fromarray(small[..., 0].astype(np.uint16) * 257).save(tif)
    full = {p: media.to_rgb(p) for p in (jpg, png, tif)}
    assert full[jpg].size == full[png].size == (240, 320) and full[tif].size == (320, 240)
    monkeypatch.setattr(media, "MAX_PIXELS", 100 * 100)
    for p in (jpg, png, tif):
        got = media.to_rgb(p)
        assert 2500 <= got.size[0] * got.size[1] <= 100 * 100
        assert (got.size[0] < got.size[1]) == (full[p].size[0] < full[p].size[1])  # oriented as the full read
        coarse = [np.asarray(im.resize((15, 20) if im.size[0] < im.size[1] else (20, 15), Image.BOX), np.int16)
                  for im in (got, full[p])]
        assert np.abs(coarse[0] - coarse[1]).mean() < 10  # the same 15x20 grid of colours (unrelated: ~85)
    from PIL import JpegImagePlugin

    drafted, real = [], JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda im, m, s: drafted.append((real(im, m, s), im.size)[1]))
    media.to_rgb(jpg)
    assert drafted == [(160, 120)]  # libjpeg decoded at 1/2 scale: the full-size pixels never existed


def test_pixel_values_numpy_and_path_inputs(proc, hf, tmp_path):
    rgba = np.asarray(_rng_image(41, 67, 6, "RGBA"))
    for arr in (rgba[..., :3].copy(), rgba):
        ref = hf.image_processor(arr, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
        assert np.abs(proc.image_pixels(arr) - ref).max() <= 1e-6
    # paths: transformers' load_image (EXIF transpose, convert("RGB") — alpha dropped, not composited)
    png = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(png)
    jpg = tmp_path / "b.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    _rng_image(30, 50, 7).save(jpg, exif=exif)
    for p in (png, jpg):
        ref = hf.image_processor(str(p), return_tensors="np")["pixel_values"][0]
        assert np.abs(proc.image_pixels(p) - ref).max() <= 1e-6
    ids = proc("<image>x", images=[str(png)])
    ref = hf(text="<image>x", images=[str(png)], return_tensors="pt")
    assert torch.equal(ids["input_ids"], ref["input_ids"])
    assert (ids["pixel_values"] - ref["pixel_values"]).abs().max() <= 1e-6


def test_batch_left_padding(proc):
    a, b = "<image>\nshort", "a much longer prompt with <image> and more words after it"
    imgs = [_rng_image(30, 40, 8), _rng_image(40, 30, 9)]
    out = proc([a, b], images=imgs)
    one, two = proc(a, images=imgs[:1]), proc(b, images=imgs[1:])
    T = two["input_ids"].shape[1]
    pad = T - one["input_ids"].shape[1]
    assert out["input_ids"].shape == (2, T) and pad > 0
    assert torch.equal(out["input_ids"][1], two["input_ids"][0])
    assert torch.equal(out["input_ids"][0, pad:], one["input_ids"][0])
    assert (out["input_ids"][0, :pad] == proc.pad_token_id).all()
    assert out["attention_mask"][0].tolist() == [0] * pad + [1] * (T - pad)
    assert torch.equal(out["pixel_values"], torch.cat([one["pixel_values"], two["pixel_values"]]))


# ----------------------------------------------------------------------------------------- video

def _encode_clip(path, codec, n=23, fps=10, w=64, h=48, options=None):
    """Frame i is flat grey 10 + 10 i, so the decoded brightness tells the frame index."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if options:
            s.options = options
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 + 10 * i, np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _indices(frames):
    return [int(round((f.astype(float).mean() - 10) / 10)) for f in frames]


def _have_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


VP9 = {"deadline": "realtime", "cpu-used": "8"}
CLIPS = [("libx264", "mp4", {"preset": "ultrafast"}), ("libx264", "mp4", {"bframes": "3"}),
         ("libx264", "mkv", {"preset": "ultrafast"}), ("libvpx-vp9", "webm", VP9),
         ("libsvtav1", "mkv", {"preset": "12"}), ("libsvtav1", "mp4", {"preset": "12"}),
         ("libaom-av1", "mkv", {"cpu-used": "8"}), ("librav1e", "mkv", {"speed": "10"}),
         ("mpeg4", "avi", None), ("mpeg4", "mp4", None)]


@pytest.mark.parametrize("codec,ext,options", CLIPS, ids=[f"{c}-{e}-{i}" for i, (c, e, _) in enumerate(CLIPS)])
def test_video_frame_sampling_per_codec(tmp_path, codec, ext, options):
    if not _have_encoder(codec):
        pytest.skip(f"no {codec} encoder in this PyAV build")
    path = tmp_path / f"clip.{ext}"
    _encode_clip(path, codec, options=options)
    for k in (5, 16):
        frames, times = video.load_video(path, k)
        want = np.linspace(0, 22, k).astype(int).tolist()
        assert frames.dtype == np.uint8 and frames.shape == (k, 48, 64, 3)
        assert _indices(frames) == want
        assert times == pytest.approx([i / 10 for i in want], abs=1e-6)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    _encode_clip(path, "libx264", options={"preset": "ultrafast"})
    return path


def test_video_more_frames_than_clip_and_wrong_declared_count(clip, monkeypatch):
    frames, _ = video.load_video(clip, 30)  # n=23 < K: indices repeat
    assert _indices(frames) == np.linspace(0, 22, 30).astype(int).tolist()
    for wrong in (40, 10):  # container metadata lies → a counting pass fixes it, with a warning
        monkeypatch.setattr(video, "_declared_frame_count", lambda p, w=wrong: w)
        with pytest.warns(UserWarning, match=f"declares {wrong} frames, decoder yields 23"):
            frames, _ = video.load_video(clip, 4)
        assert _indices(frames) == [0, 7, 14, 22]


def test_video_converts_only_selected_frames(clip, monkeypatch):
    converted = []
    real = video._frames

    class Spy:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def to_ndarray(self, **kw):
            converted.append(1)
            return self.f.to_ndarray(**kw)

    monkeypatch.setattr(video, "_frames", lambda path, c: (Spy(f) for f in real(path, c)))
    video.load_video(clip, 6)
    assert len(converted) == 6


def test_processor_video_file_and_array(proc, clip):
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, TXT("What moves?")]}])
    out = proc(prompt, videos=[clip], num_frames=4)
    assert out["pixel_values"].shape == (4, 3, S, S)
    ids = out["input_ids"][0].tolist()
    first = ids.index(proc.image_token_id)
    assert ids[first:first + 4 * TPI] == [proc.image_token_id] * (4 * TPI)  # consecutive, no separator
    assert ids.count(proc.image_token_id) == 4 * TPI
    _, idx, times = proc.video_frames(clip, 4)
    assert idx == [0, 7, 14, 22] and times == pytest.approx([0.0, 0.7, 1.4, 2.2])
    frames, _ = video.load_video(clip, 4)
    ref = np.stack([proc.image_pixels(f) for f in frames])
    assert np.abs(out["pixel_values"].numpy() - ref).max() == 0
    # same as writing the K <image> placeholders by hand
    hand = proc(prompt.replace("<video>", "<image>" * 4), images=list(frames))
    assert torch.equal(hand["input_ids"], out["input_ids"])
    assert torch.equal(hand["pixel_values"], out["pixel_values"])

    arr = np.stack([np.full((20, 24, 3), i, np.uint8) for i in range(30)])
    out = proc("<image><video>\nQ", images=[arr[0]], videos=[arr], num_frames=8)
    assert out["pixel_values"].shape == (9, 3, S, S)
    frames, idx, times = proc.video_frames(arr, 8)
    assert idx == np.linspace(0, 29, 8).astype(int).tolist() and times is None
    assert torch.equal(out["pixel_values"][1:], torch.from_numpy(np.stack([proc.image_pixels(f) for f in frames])))
    out = proc("<video>", videos=[arr[:5]], num_frames=8)  # shorter than num_frames: used as-is
    assert out["pixel_values"].shape == (5, 3, S, S) and proc.video_frames(arr[:5], 8)[1] == [0, 1, 2, 3, 4]


def test_default_num_frames_from_config(tmp_path, clip):
    write_tokenizer_files(tmp_path, image_size=S, patch_size=PATCH, num_frames=3)
    p = Processor.from_pretrained(tmp_path)
    assert p.num_frames == 3
    assert p("<video>", videos=[clip])["pixel_values"].shape[0] == 3


# ----------------------------------------------------------------------------------- multi-patch

def _llava_next_reference(image, pinpoints, size):
    """LLaVA-NeXT llava/mm_utils.py process_anyres_image (select/resize_and_pad/divide), verbatim logic."""
    import math
    ow, oh = image.size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best_eff, best_waste, best = eff, waste, (w, h)
    tw, th = best
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nh, nw = th, min(math.ceil(ow * sh), tw)
    padded = Image.new("RGB", (tw, th), (0, 0, 0))
    padded.paste(image.resize((nw, nh)), ((tw - nw) // 2, (th - nh) // 2))
    patches = [padded.crop((j, i, j + size, i + size)) for i in range(0, th, size) for j in range(0, tw, size)]
    return best, [image.resize((size, size))] + patches


@pytest.mark.parametrize("wh,grid", [((300, 100), (84, 28)), ((100, 300), (28, 84)), ((200, 190), (56, 56)),
                                     ((60, 30), (56, 28)), ((20, 20), (28, 56)), ((40, 90), (28, 84)),
                                     ((40, 80), (28, 56))])
def test_multi_patch_grid_tiles_and_tokens(proc, hf, wh, grid):
    pinpoints = [(w * S, h * S) for w, h in media.DEFAULT_PINPOINTS]
    assert pinpoints == [(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)]
    image = _rng_image(wh[1], wh[0], 10)
    best, ref_views = _llava_next_reference(image, pinpoints, S)
    assert best == grid == media.select_best_resolution(image.size, pinpoints)
    n_tiles = (grid[0] // S) * (grid[1] // S)
    out = proc("<image>\nRead the small text.", images=[image], multi_patch=True)
    assert out["pixel_values"].shape == (1 + n_tiles, 3, S, S)
    assert int((out["input_ids"] == proc.image_token_id).sum()) == (1 + n_tiles) * TPI
    ref = hf.image_processor(ref_views, return_tensors="np")["pixel_values"]
    assert np.abs(out["pixel_values"].numpy() - ref).max() <= 1e-6
    # the overview comes first and equals the plain single-image input
    assert torch.equal(out["pixel_values"][0], proc("<image>", images=[image])["pixel_values"][0])


# ----------------------------------------------------------------------------------------- decode

def test_decode_and_streaming_utf8(proc, hf):
    text = "Héllo café — 日本の猫 🙂👍🏽 Привет!"
    ids = proc.encode("<|im_start|>assistant\n" + text + "<|im_end|>")
    assert proc.decode(ids) == hf.tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n" + text
    assert proc.decode(torch.tensor([ids]), skip_special_tokens=False) == hf.tokenizer.decode(ids)
    for skip in (True, False):
        stream = proc.stream_decoder(skip_special_tokens=skip)
        pieces = [stream.put(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == proc.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
        assert "" in pieces[:-1]  # some multi-byte characters span tokens and were held back
    stream = proc.stream_decoder()
    assert stream.put(torch.tensor(ids[:5])) + stream.put(ids[5:]) + stream.flush() == proc.decode(ids)


# -------------------------------------------------------------------------------------- bad input

def test_placeholder_count_errors(proc):
    img = _rng_image(10, 10)
    with pytest.raises(ValueError, match=r"prompt has 2 <image> placeholder\(s\) but 3 image\(s\) were given"):
        proc("<image><image>", images=[img] * 3)
    with pytest.raises(ValueError, match=r"prompt has 1 <image> placeholder\(s\) but 0 image\(s\)"):
        proc("<image>")
    with pytest.raises(ValueError, match=r"prompt has 0 <video> placeholder\(s\) but 1 video\(s\)"):
        proc("<image>", images=[img], videos=[np.zeros((2, 8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match=r"2 <image> placeholder.* 1 image"):
        proc(["<image>", "<image>"], images=[img])
    with pytest.raises(ValueError, match="uint8"):
        proc("<image>", images=[np.zeros((8, 8, 3), np.float32)])


def test_bad_files(proc, tmp_path, clip):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=f"image file not found: {missing}"):
        proc("<image>", images=[missing])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(os.urandom(500))
    with pytest.raises(ValueError, match=f"cannot read image file {garbage}"):
        proc("<image>", images=[str(garbage)])
    good = tmp_path / "good.png"
    _rng_image(64, 64).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match=f"cannot read image file {cut}"):
        proc("<image>", images=[cut])

    with pytest.raises(FileNotFoundError, match=f"video file not found: {tmp_path / 'nope.mp4'}"):
        proc("<video>", videos=[tmp_path / "nope.mp4"])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(ValueError, match=f"cannot read video file {bad}"):
        proc("<video>", videos=[bad])
    cut = tmp_path / "cut.mp4"  # mp4 with its index (moov) cut off
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(media.MediaError, match=f"cannot read video file {cut}: its mp4 index .moov atom. is missing"):
        video.load_video(cut, 4)
    webm = tmp_path / "clip.webm"  # header and the first bytes only: no decodable frame
    _encode_clip(webm, "libvpx-vp9", options=VP9)
    cut = tmp_path / "cut.webm"
    cut.write_bytes(webm.read_bytes()[: webm.stat().st_size * 3 // 10])
    with pytest.raises(media.MediaError, match=f"no decodable video frames in {cut}"):
        video.load_video(cut, 4)
    audio = tmp_path / "audio.mkv"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("mp2", rate=44100)
        for _ in range(3):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            fr.sample_rate = 44100
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(media.MediaError, match=f"no video stream in {audio}"):
        video.load_video(audio, 4)


def test_context_is_checked_from_the_numbers_before_any_decode(proc, clip, monkeypatch):
    arr = np.zeros((3, 8, 8, 3), np.uint8)  # 3 frames < K = 8: all 3 are used
    cases = [("<image> hi", dict(images=[_rng_image(9, 9)])), ("<video>\nWhat?", dict(videos=[clip], num_frames=5)),
             (["a <video> b <image>", "<image>"], dict(images=[_rng_image(9, 9)] * 2, videos=[arr], num_frames=8))]
    for text, kw in cases:
        n = proc(text, **kw)["input_ids"].shape[1]
        with monkeypatch.context() as m:
            m.setattr(proc, "max_length", n - 1)
            for module, name in ((media, "to_rgb"), (video, "to_rgb"), (video, "_load_video")):
                m.setattr(module, name, lambda *a: pytest.fail("decoded before the length check"))
            with pytest.raises(ValueError, match=f"^prompt is {n} tokens long"):  # exact, before decoding
                proc(text, **kw)
            m.setattr(proc, "max_length", n)
            with pytest.raises(pytest.fail.Exception):
                proc(text, **kw)  # fits: goes on to decode
    wide = _rng_image(90, 200)  # multi-patch: 1 + 3 tiles; before the grid is known, the fewest (1 + 2) count
    assert proc("<image>", images=[wide], multi_patch=True)["input_ids"].shape[1] == 4 * TPI
    with monkeypatch.context() as m:
        m.setattr(proc, "max_length", 3 * TPI - 1)
        with pytest.raises(ValueError, match=f"^prompt is at least {3 * TPI} tokens long"):
            proc("<image>", images=[wide], multi_patch=True)
        m.setattr(proc, "max_length", 3 * TPI)
        with pytest.raises(ValueError, match=f"^prompt is {4 * TPI} tokens long"):  # the exact check, after
            proc("<image>", images=[wide], multi_patch=True)


def test_from_config_json_only_and_context_limit(tmp_path, tiny_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    (tmp_path / "config.json").write_text(json.dumps({
        "vision_config": {"image_size": 56, "patch_size": 14},
        "vision_feature_select_strategy": "default",
        "text_config": {"max_position_embeddings": 40}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    p = Processor.from_pretrained(tmp_path)
    assert (p.image_size, p.tokens_per_image, p.max_length) == (56, 15, 40)
    im_end = p.tokenizer.token_to_id("<|im_end|>")
    assert p.eos_token_ids == [7, 8]  # generation_config.json wins over tokenizer_config's eos_token
    (tmp_path / "generation_config.json").unlink()
    assert Processor.from_pretrained(tmp_path).eos_token_ids == [im_end]
    assert p("<image>" * 2, images=[_rng_image(9, 9)] * 2)["input_ids"].shape == (1, 30)
    with pytest.raises(ValueError, match="prompt is 45 tokens long .* context is 40 tokens"):
        p("<image>" * 3, images=[_rng_image(9, 9)] * 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Processor.from_pretrained(tmp_path / "empty")
