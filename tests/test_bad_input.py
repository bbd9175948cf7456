"""The bad-input matrix of the README's "Errors" table: one test per row (training faults: tests/test_faults.py).

Scripts run as a user runs them, in a subprocess from the repository root, and must end with the CLI contract:
exit status 2 (usage) or 1 (bad data or files), one stderr line `<script>: error: <message>` naming the argument
or file (at most one more line, a hint), no traceback. Library rows check the exception type and message.
One section per owner, each under its `# ---- <owner>` header.
"""

import contextlib
import io
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "weights", "minterleave-tiny")  # the bundled checkpoint
needs_tiny = pytest.mark.skipif(not os.path.isfile(os.path.join(TINY, "model.safetensors")),
                                reason="the bundled checkpoint is not there")


def script(name, *args, cwd=ROOT, timeout=300):
    """Run `python <name> args...` as a user does. Arguments may be bytes: argv that is not UTF-8."""
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *map(os.fsencode, args)], cwd=cwd,
                          capture_output=True, timeout=timeout)


def parse(name, *args):
    """A script's usage error in this process (no interpreter start per row): argparse reports those before
    anything else runs. Returns what script() returns."""
    err, main = io.StringIO(), runpy.run_path(os.path.join(ROOT, name))["main"]  # not as __main__: runs nothing
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return subprocess.CompletedProcess(args, e.value.code, b"", err.getvalue().encode())


def one_line_error(r, status, *names):
    """Assert the CLI contract on a finished script run; returns the error line. Each of `names` (the flag,
    the file) must appear in it."""
    err = r.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode == status, f"exit status {r.returncode}, not {status}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 2, f"{len(lines)} lines on stderr, not one (+ a hint):\n{err}"
    assert ": error: " in lines[0], err
    for name in names:
        assert str(name) in lines[0], f"{name!r} is not named in: {lines[0]}"
    return lines[0]


# ---- cli
SAMPLE_USAGE = [  # (flag, value): refused by argparse before anything is loaded
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--temperature", "-0.5"), ("--temperature", "nan"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "0"), ("--frames", "0"), ("--frames", "-2"),
]


@pytest.mark.parametrize("flag, value", SAMPLE_USAGE)
def test_sample_out_of_range_values_are_usage_errors(flag, value):
    one_line_error(parse("sample.py", flag, value), 2, flag)


def test_sample_prompt_argv_not_utf8():
    # b"\xff" reaches Python as the lone surrogate "\udcff", which no tokenizer can encode
    line = one_line_error(script("sample.py", b"--prompt", b"caf\xff?"), 2, "--prompt", "UTF-8")
    assert "0xff" in line


def test_sample_prompt_file_not_utf8(tmp_path):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"What is in <image>\xc3(?\n")
    line = one_line_error(script("sample.py", "--prompt-file", bad), 1, "--prompt-file", bad, "UTF-8")
    assert "0xc3" in line


@pytest.mark.parametrize("kind, says", [("missing", "no such file"), ("directory", "is a directory")])
def test_sample_prompt_file_missing_or_a_directory(tmp_path, kind, says):
    path = tmp_path / "prompt.txt"
    if kind == "directory":
        path.mkdir()
    one_line_error(script("sample.py", "--prompt-file", path), 1, "--prompt-file", path, says)


def test_sample_prompt_and_prompt_file_together_is_a_usage_error(tmp_path):
    (tmp_path / "p.txt").write_text("Hi?")
    one_line_error(parse("sample.py", "--prompt", "Hi?", "--prompt-file", tmp_path / "p.txt"), 2, "--prompt")


def test_sample_help_says_what_no_prompt_does():
    out = " ".join(script("sample.py", "--help").stdout.decode().split())
    assert "Describe what you see." in out and "empty" in out and "tour" in out, out


@needs_tiny
def test_sample_prompt_file_is_the_prompt(tmp_path):
    (tmp_path / "p.txt").write_text("Hello there\n", encoding="utf-8")
    r = script("sample.py", "--model", TINY, "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr.decode()
    assert "tokens/s" in r.stdout.decode().splitlines()[-1]


@needs_tiny
def test_sample_unwritable_demo_folder(tmp_path):
    # the tour writes its inputs to ./sample_out: a file in its way is one line naming it
    (tmp_path / "sample_out").write_text("in the way")
    one_line_error(script("sample.py", "--max-new-tokens", "1", cwd=tmp_path), 1, "sample_out")


EVAL_USAGE = [("--n", "0"), ("--batch-size", "0"), ("--batch-size", "-1"), ("--max-new-tokens", "0"),
              ("--limit", "0"), ("--domain", "audio")]


@pytest.mark.parametrize("flag, value", EVAL_USAGE)
def test_eval_bad_values_are_usage_errors(flag, value):
    one_line_error(parse("eval.py", flag, value), 2, flag)


def test_eval_missing_model_folder(tmp_path):
    one_line_error(script("eval.py", "--model", tmp_path / "nowhere"), 1, tmp_path / "nowhere")


@needs_tiny
@pytest.mark.parametrize("content", [None, b'[{"image": ["a.png"], "conversations": [', b"\xff\xfe[]"])
def test_eval_data_missing_or_malformed(tmp_path, content):
    path = tmp_path / "bench.json"
    if content is not None:
        path.write_bytes(content)
    one_line_error(script("eval.py", "--model", TINY, "--data", path), 1, path)


TRAIN_USAGE = [(["--domain", "audio"], "--domain"), (["--set", "layres=3"], "layres")]


@pytest.mark.parametrize("args, name", TRAIN_USAGE)
def test_train_bad_values_are_usage_errors(tmp_path, args, name):
    one_line_error(parse("train.py", "--out", tmp_path / "out", *args), 2, name)


def test_train_missing_init_folder(tmp_path):
    one_line_error(script("train.py", "--init", tmp_path / "nowhere", "--out", tmp_path / "out"), 1,
                   tmp_path / "nowhere")


@pytest.mark.parametrize("content", [None, b'[{"image": "a.png", "conversations": [\n', b"\xff\xfe[]"])
def test_train_data_missing_or_malformed(tmp_path, content):
    path = tmp_path / "m4.json"
    if content is not None:
        path.write_bytes(content)
    r = script("train.py", "--data", path, "--out", tmp_path / "out", "--max-steps", "1", "--batch-size", "1")
    one_line_error(r, 1, path)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_train_unwritable_out(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / "file" / "out"  # under a regular file: no one, root included, can create it
    r = script("train.py", "--out", out, "--max-steps", "1", "--batch-size", "1", "--set", "layers=1")
    one_line_error(r, 1, out)


@pytest.mark.parametrize("name", ["sample.py", "eval.py"])
def test_no_check_finite_reaches_from_pretrained(name, monkeypatch):
    import minterleave as mi
    seen = []

    class Loaded(Exception):
        pass

    def fake(path, **kwargs):
        seen.append(kwargs)
        raise Loaded

    monkeypatch.setattr(mi.Model, "from_pretrained", staticmethod(fake))
    main = runpy.run_path(os.path.join(ROOT, name))["main"]  # not as __main__: defines, runs nothing
    for args, check in (([], True), (["--no-check-finite"], False)):
        with pytest.raises(Loaded):
            main(["--model", TINY, "--prompt", "Hi", "--device", "cpu"] * (name == "sample.py") + args)
        assert seen.pop()["check_finite"] is check


def test_bench_no_check_finite_reaches_the_worker(monkeypatch):
    scope = runpy.run_path(os.path.join(ROOT, "bench.py"))
    specs = []

    class Stop(Exception):
        pass

    class Worker:
        def __init__(self, impl, path, dtype, spec):
            specs.append(spec)
            raise Stop

    g = scope["main"].__globals__  # what bench.py's functions see
    monkeypatch.setitem(g, "Worker", Worker)
    monkeypatch.setitem(g, "machine", lambda: {"cpu": "", "cores": 1, "torch": "", "torch_threads": 1,
                                               "transformers": "", "loadavg_at_start": (0.0,)})
    monkeypatch.setitem(g, "read_bandwidth", lambda gb: dict.fromkeys(("read_gbs", "sum_fp32_gbs", "gemv_bf16_gbs"), 1.0))
    for args, check in (([], True), (["--no-check-finite"], False)):
        with pytest.raises(Stop):
            scope["main"](["--model", TINY, "--only", "minterleave", "--dtypes", "float32"] + args)
        assert specs.pop()["check_finite"] is check


@needs_tiny
def test_bench_worker_error_is_one_line(tmp_path):
    # a load error inside the worker process reaches the user as the worker's own line, not "the worker died"
    for name in os.listdir(TINY):
        data = open(os.path.join(TINY, name), "rb").read()
        (tmp_path / name).write_bytes(data[:len(data) // 2] if name == "model.safetensors" else data)
    r = script("bench.py", "--model", tmp_path, "--only", "minterleave", "--quick", "--dtypes", "float32")
    one_line_error(r, 1, "model.safetensors")


@pytest.mark.parametrize("name", ["sample.py", "eval.py", "bench.py"])
def test_debug_shows_the_traceback(tmp_path, name):
    r = script(name, "--model", tmp_path / "nowhere", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr.decode() and "FileNotFoundError" in r.stderr.decode()


def _png_header(width, height):
    """A valid PNG whose header declares width x height (its pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@needs_tiny
@pytest.mark.parametrize("row", ["zero-byte image", "decompression bomb", "pickled checkpoint"])
def test_sample_rows_that_held_before(tmp_path, row):  # the matrix's rows that issue 17 found already handled
    if row == "pickled checkpoint":  # pytorch_model.bin only: never unpickled (that would run its code)
        import torch
        for name in os.listdir(TINY):
            if name.endswith(".json"):
                (tmp_path / name).write_bytes(open(os.path.join(TINY, name), "rb").read())
        torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
        one_line_error(script("sample.py", "--model", tmp_path, "--prompt", "Hi"), 1, tmp_path, "no *.safetensors")
        return
    image = tmp_path / "in.png"  # 50000 x 50000 declared: 14x Pillow's limit, refused before decoding
    image.write_bytes(b"" if row == "zero-byte image" else _png_header(50000, 50000))
    line = one_line_error(script("sample.py", "--model", TINY, "--image", image), 1, image, "cannot read image file")
    assert row != "decompression bomb" or "decompression bomb" in line


# ---- media
# Library rows of images, videos and prompts (minterleave/media.py, minterleave/processor.py): the exception
# type and its one-line message, and what is NOT done before refusing (nothing decoded, nothing printed).
import warnings as _warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from minterleave import media  # noqa: E402
from minterleave.processor import Processor  # noqa: E402

av = pytest.importorskip("av")


@pytest.fixture(scope="module")
def mproc():
    return Processor.from_pretrained(TINY)


def _clip(path, n=40, faststart=False):
    """An h264 mp4 of n 64x48 frames of noise (so that every frame has its own bytes)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"preset": "ultrafast"}
        rng = np.random.default_rng(0)
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("text", ["caf\udcff?", b"caf\xc3\xa9?"])
def test_media_prompt_not_valid_text(mproc, text):  # row 1 (library): not a TypeError from tokenizers
    with pytest.raises(ValueError, match="prompt is (not valid text|bytes, not text)") as e:
        mproc(text)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not valid text"):
        mproc.encode_chat([{"role": "user", "content": "caf\udcff?"}])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_media_directory_is_a_directory(mproc, tmp_path, kind):  # row 7
    ph = "<image>" if kind == "image" else "<video>"
    with pytest.raises(IsADirectoryError, match=f"^{tmp_path}: is a directory, not {kind} file$"):
        mproc(ph, **{kind + "s": [tmp_path]})
    with pytest.raises(FileNotFoundError, match=f"^{kind} file not found: {tmp_path / 'nope'}$"):
        mproc(ph, **{kind + "s": [tmp_path / "nope"]})


@needs_tiny
def test_media_directory_image_on_the_command_line(tmp_path):  # row 7, as the user meets it
    r = script("sample.py", "--model", TINY, "--image", tmp_path, "--prompt", "What is it?")
    one_line_error(r, 1, tmp_path, "is a directory")


@pytest.mark.parametrize("k", [0, -3])
def test_media_num_frames_zero_or_negative(mproc, tmp_path, k):  # row 8: checked before the file is touched
    for v in (tmp_path / "absent.mp4", np.zeros((5, 8, 8, 3), np.uint8)):
        with pytest.raises(ValueError, match=f"num_frames must be >= 1, got {k}"):
            mproc("<video>", videos=[v], num_frames=k)
        with pytest.raises(ValueError, match=f"num_frames must be >= 1, got {k}"):
            mproc.video_frames(v, k)


def test_media_frames_that_cannot_fit_are_refused_before_decoding(mproc, tmp_path, monkeypatch):  # row 8
    clip = _clip(tmp_path / "clip.mp4", n=12)
    opened = []
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a) or pytest.fail("opened to decode"))
    monkeypatch.setattr(mproc, "max_length", 200)
    k = 200 // mproc.tokens_per_image + 1  # the frames alone are past the context
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens long \(images included\) but the model's "
                                         r"context is 200 tokens"):
        mproc("<video>\nWhat happens?", videos=[clip], num_frames=k)
    with pytest.raises(ValueError, match="context is 200 tokens"):
        mproc.encode_chat([{"role": "user", "content": "<video>\nWhat happens?"}, {"role": "assistant",
                          "content": "A dance."}], videos=[clip], num_frames=k)
    assert opened == []


def test_media_truncated_mp4_is_our_one_line(mproc, tmp_path, capfd):  # row 8
    import av.logging

    level = av.logging.get_level()
    av.logging.set_level(av.logging.WARNING)  # a caller who turned libav's log on: still nothing printed
    try:
        whole = _clip(tmp_path / "whole.mp4", faststart=True).read_bytes()
        cut = tmp_path / "cut.mp4"  # index first, frame data cut: what a download cut short leaves
        cut.write_bytes(whole[: len(whole) // 2])
        with _warnings.catch_warnings():
            _warnings.simplefilter("error")  # and no warning either: one error
            with pytest.raises(ValueError, match=rf"^{cut}: truncated or damaged video: decoded (\d+) of "
                                                 r"the 40 frames its container declares, frames \1..39 missing") as e:
                mproc.video_frames(cut, 8)
        assert type(e.value).__name__ == "MediaError"
        end = tmp_path / "end.mp4"  # index last (no faststart), cut before it: nothing can be decoded
        end.write_bytes(_clip(tmp_path / "e.mp4").read_bytes()[:-3000])
        with pytest.raises(ValueError, match=rf"^cannot read video file {end}: its mp4 index \(moov atom\) "
                                             "is missing: the file was cut short"):
            mproc.video_frames(end, 8)
    finally:
        av.logging.set_level(level)
    out, err = capfd.readouterr()
    assert out == err == ""
    assert av.logging.get_level() == level


def test_media_16_bit_and_float_images_scaled_not_clipped(mproc, tmp_path):  # row 9
    a16 = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    png = tmp_path / "grey16.png"
    Image.fromarray(a16).save(png)
    want = mproc.image_pixels(Image.fromarray((a16 >> 8).astype(np.uint8)))  # the high byte
    assert np.array_equal(mproc.image_pixels(png), want)  # (PIL's convert clips: nearly all white)
    f = (a16 / 65535).astype(np.float32)
    tif = tmp_path / "float.tif"
    Image.fromarray(f).save(tif)
    assert np.array_equal(mproc.image_pixels(tif), mproc.image_pixels(Image.fromarray(
        np.round(f * 255).astype(np.uint8))))
    Image.fromarray(f * 1000).save(tif)
    with pytest.raises(media.MediaError, match=rf"^{tif}: float image with values 0\.\.1000: only \[0, 1\]"):
        mproc.image_pixels(tif)


def test_media_animated_gif_first_frame_one_warning(mproc, tmp_path):  # row 9
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with _warnings.catch_warnings(record=True) as w:
        _warnings.simplefilter("always")
        out = mproc("<image>\nWhat colour?", images=[gif])
    assert [str(x.message) for x in w] == [f"{gif}: animated image: using its first frame"]
    assert torch.equal(out["pixel_values"][0], torch.from_numpy(mproc.image_pixels(frames[0])))


def test_media_huge_jpeg_is_decoded_small(tmp_path):  # row 9: peak memory, in a fresh process
    jpg = tmp_path / "big.jpg"  # 12 M pixels; the child lowers MAX_PIXELS so that it counts as huge
    x = np.linspace(0, 255, 4000, dtype=np.float32)
    Image.fromarray(np.broadcast_to(x[None, :, None], (3000, 4000, 3)).astype(np.uint8)).save(jpg)
    code = f"""if 1:
        from minterleave import media
        media.MAX_PIXELS = 1 << 20
        def hwm():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024
        before = hwm()
        im = media.to_rgb({str(jpg)!r})
        print(hwm() - before, im.size[0] * im.size[1])"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    mb, pixels = map(int, r.stdout.split())
    assert pixels <= 1 << 20 and mb < 25, r.stdout  # the whole image in RGB would be 36 MB, read as before: 110
    assert media.MAX_PIXELS * 2 <= Image.MAX_IMAGE_PIXELS  # so a file just under the bomb limit is shrunk


def test_media_empty_prompt(mproc):  # row 10 (library)
    for text in ("", "  \n\t", [""]):
        with pytest.raises(ValueError, match="^empty prompt"):
            mproc(text)
    import minterleave as mi

    model = mi.Model.from_pretrained(TINY)
    for ids in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long)):
        with pytest.raises(ValueError, match="^empty prompt: input_ids has shape"):
            model.generate(ids, max_new_tokens=2)


def test_media_errors_are_value_errors_naming_the_file(mproc, tmp_path):
    assert issubclass(media.MediaError, ValueError)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(media.MediaError, match=f"^cannot read image file {bad}: "):
        mproc("<image>", images=[bad])


# ---- weights
# NaN/Inf in checkpoint weights (issue 17, row 2) and missing checkpoint paths (row 12). The checkpoints are
# tests/tiny_model.py's; a bad value is poked into one tensor's bytes of the safetensors file.
import json as _json  # noqa: E402
import struct as _struct  # noqa: E402

import torch as _torch  # noqa: E402

import minterleave as _mi  # noqa: E402
from minterleave.weights import WeightsError  # noqa: E402
from tiny_model import hf_model as _hf_model, save_checkpoint as _save_checkpoint  # noqa: E402

_SAFETENSORS_DTYPES = {"F32": _torch.float32, "BF16": _torch.bfloat16, "F16": _torch.float16}


def _tiny_checkpoint(path, dtype=None, shards=1):
    return _save_checkpoint(_hf_model(), str(path), "llava-hf", shards=shards, dtype=dtype)


def _poke(file, name, value, index=0):
    """Overwrite element `index` of tensor `name` in the safetensors `file`, in the file's own dtype."""
    with open(file, "r+b") as f:
        (n,) = _struct.unpack("<Q", f.read(8))
        info = _json.loads(f.read(n))[name]
        raw = _torch.tensor([value], dtype=_SAFETENSORS_DTYPES[info["dtype"]]).view(_torch.uint8).numpy().tobytes()
        f.seek(8 + n + info["data_offsets"][0] + index * len(raw))
        f.write(raw)


@pytest.mark.parametrize("file_dtype, load_dtype, tensor, value", [
    (None, "float32", "language_model.model.layers.1.self_attn.k_proj.weight", float("nan")),  # rows of qkv_proj
    (_torch.bfloat16, "bfloat16", "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", float("inf")),
    (_torch.bfloat16, "float32", "language_model.model.embed_tokens.weight", float("-inf")),  # converted on load
    (None, "float16", "multi_modal_projector.linear_2.bias", float("nan")),
], ids=["nan-qkv-rows-fp32", "inf-bf16", "-inf-bf16-as-fp32", "nan-fp32-as-fp16"])
def test_weights_nonfinite_tensor_is_refused_naming_tensor_and_file(tmp_path, file_dtype, load_dtype, tensor,
                                                                    value):  # row 2
    path = _tiny_checkpoint(tmp_path / "ckpt", file_dtype)
    file = str(tmp_path / "ckpt" / "model.safetensors")
    _poke(file, tensor, value, index=5)
    with pytest.raises(WeightsError) as e:
        _mi.Model.from_pretrained(path, dtype=load_dtype)
    message = str(e.value)
    assert message.startswith(f"{file}: tensor {tensor} ") and "\n" not in message
    assert ("NaN" if value != value else "Inf") in message


def test_weights_check_finite_false_loads_the_nonfinite_checkpoint(tmp_path):  # row 2
    path = _tiny_checkpoint(tmp_path / "ckpt")
    _poke(str(tmp_path / "ckpt" / "model.safetensors"), "language_model.model.norm.weight", float("nan"), index=3)
    model = _mi.Model.from_pretrained(path, check_finite=False)
    assert _torch.isnan(model.decoder.norm.weight[3]) and _torch.isfinite(model.decoder.norm.weight[4])


def test_weights_finite_values_beyond_half_precision_are_refused(tmp_path):  # row 2
    """A finite fp32 weight of 1e6 becomes Inf in float16: refused as such, loads in float32 and bfloat16."""
    path = _tiny_checkpoint(tmp_path / "ckpt")
    _poke(str(tmp_path / "ckpt" / "model.safetensors"), "language_model.model.layers.0.mlp.down_proj.weight", 1e6)
    with pytest.raises(WeightsError, match=r"layers\.0\.mlp\.down_proj\.weight .*float16"):
        _mi.Model.from_pretrained(path, dtype="float16")
    for dtype in ("float32", "bfloat16"):
        _mi.Model.from_pretrained(path, dtype=dtype)


def test_weights_nonfinite_in_a_shard_names_the_shard(tmp_path):  # row 2
    path = _tiny_checkpoint(tmp_path / "ckpt", shards=2)
    with open(tmp_path / "ckpt" / "model.safetensors.index.json") as f:
        shard = _json.load(f)["weight_map"]["language_model.model.norm.weight"]
    _poke(str(tmp_path / "ckpt" / shard), "language_model.model.norm.weight", float("nan"))
    with pytest.raises(WeightsError, match=rf"{shard}: tensor language_model\.model\.norm\.weight "):
        _mi.Model.from_pretrained(path)


@pytest.mark.parametrize("load", ["Model", "Processor"])
def test_weights_missing_checkpoint_path_is_file_not_found(tmp_path, load):  # row 12
    missing = str(tmp_path / "no-such-checkpoint")
    with pytest.raises(FileNotFoundError) as e:
        getattr(_mi, load).from_pretrained(missing)
    assert str(e.value).startswith(missing + ": ") and "\n" not in str(e.value)


def test_weights_folder_without_config_or_weights_says_what_is_missing(tmp_path):  # row 12
    path = _tiny_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no \*\.safetensors weights"):
        _mi.Model.from_pretrained(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*: no config\.json"):
        _mi.Model.from_pretrained(str(tmp_path / "empty"))


def test_weights_shard_listed_in_the_index_but_absent(tmp_path):  # row 12
    path = _tiny_checkpoint(tmp_path / "ckpt", shards=2)
    (tmp_path / "ckpt" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json: lists shard "
                                                 r"model-00002-of-00002\.safetensors, which is missing"):
        _mi.Model.from_pretrained(path)


def test_weights_a_file_given_as_the_checkpoint_folder(tmp_path):  # row 12
    _tiny_checkpoint(tmp_path / "ckpt")
    file = str(tmp_path / "ckpt" / "model.safetensors")
    for load in (_mi.Model.from_pretrained, _mi.Processor.from_pretrained):
        with pytest.raises(NotADirectoryError) as e:
            load(file)
        assert str(e.value).startswith(f"{file}: is a file, not a checkpoint folder")


@needs_tiny
def test_weights_nonfinite_checkpoint_on_the_command_line(tmp_path):  # row 2, as the user meets it
    for name in os.listdir(TINY):
        if os.path.isfile(os.path.join(TINY, name)):
            (tmp_path / name).write_bytes(open(os.path.join(TINY, name), "rb").read())
    _poke(str(tmp_path / "model.safetensors"), "language_model.model.norm.weight", float("nan"))
    args = ("sample.py", "--model", tmp_path, "--prompt", "Hi", "--max-new-tokens", "1")
    one_line_error(script(*args), 1, tmp_path / "model.safetensors", "language_model.model.norm.weight", "NaN")
    assert script(*args, "--no-check-finite").returncode == 0
