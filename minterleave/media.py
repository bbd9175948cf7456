"""Media → pixels: image loading/RGB conversion, the SigLIP pixel pipeline, AnyRes tiling, video sampling.

Pixel values follow transformers' PIL backend of SiglipImageProcessor exactly (same Pillow calls, same
numpy dtypes), so they are bit-equal to `LlavaProcessor` in a venv without torchvision:

* RGB conversion (`to_rgb`), as transformers does it:
  - PIL image with an alpha band or a `transparency` entry (RGBA, LA, PA, P/L with transparency):
    converted to RGBA and alpha-composited onto opaque WHITE, then RGB;
  - any other PIL mode (L, P, CMYK, I;16, YCbCr, ...): `image.convert("RGB")`;
  - file path: opened, EXIF orientation applied, then `convert("RGB")` — transformers' `load_image`,
    which DROPS alpha (no white compositing) before the steps above can see it;
  - numpy uint8 (H,W,3) as-is; (H,W,4) composited onto white in float64 and rounded; (H,W) or
    (H,W,1) repeated to 3 channels (transformers does not accept those).
  Note: the official preprocessor_config.json says `"do_convert_rgb": null`, which transformers 5.24
  takes as "do not convert" (its SigLIP processor then fails on L/P/RGBA/CMYK images); we always
  convert, i.e. we match transformers with do_convert_rgb=True (and exactly, on RGB inputs, without).
* `preprocess`: PIL `resize((S,S), BICUBIC)` (reducing_gap None), then `uint8 → float64 * 1/255 →
  float32`, then `(x - mean) / std` in float32; returned channels-first (3,S,S).
"""

import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from .config import DEFAULT_NUM_FRAMES

BICUBIC = 3

# lmms-lab llava-next-interleave `image_grid_pinpoints` [[384,768],[768,384],[768,768],[1152,384],[384,1152]]
# as (width, height) multiples of the tile size S = 384.
DEFAULT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


# ----------------------------------------------------------------------------------------- images

def to_rgb(image):
    """PIL image, numpy array (H,W,3|4|1 or H,W) uint8, torch tensor or file path → PIL RGB image."""
    if isinstance(image, (str, os.PathLike)):
        return _open_image(os.fspath(image))
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    raise ValueError(f"unsupported image type {type(image).__name__}: expected a PIL image, "
                     "a numpy uint8 array (H,W,3) or a file path")


def _open_image(path):
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from None


def _array_to_rgb(a):
    if a.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (H,W,3), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or min(a.shape[:2]) == 0:
        raise ValueError(f"image arrays must have shape (H,W,3), got {a.shape}")
    if a.shape[-1] == 1:
        return np.ascontiguousarray(np.repeat(a, 3, axis=-1))
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def preprocess(image, size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255,
               resample=BICUBIC, do_resize=True, do_rescale=True, do_normalize=True):
    """PIL RGB image → float32 (3, size, size), as transformers' PIL SiglipImageProcessor."""
    if do_resize:
        image = image.resize((size, size), resample=resample)
    x = np.asarray(image)
    if do_rescale:
        x = (x.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        x = x.astype(np.float32, copy=False)
        x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# ----------------------------------------------------------------------------- AnyRes (multi-patch)

def select_best_resolution(original_size, possible_resolutions):
    """LLaVA-NeXT: the (w,h) that maximises the effective resolution, then minimises wasted area."""
    ow, oh = original_size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in possible_resolutions:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    return best


def resize_and_pad(image, target):
    """LLaVA-NeXT `resize_and_pad_image`: keep aspect, fill one side, centre on black."""
    ow, oh = image.size
    tw, th = target
    sw, sh = tw / ow, th / oh
    if sw < sh:
        nw, nh = tw, min(math.ceil(oh * sw), th)
    else:
        nw, nh = min(math.ceil(ow * sh), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), resample=BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def anyres_tiles(image, size, pinpoints=None):
    """LLaVA-NeXT `process_anyres_image` split: [overview (image resized to S×S)] + row-major S×S tiles.

    pinpoints: (width, height) canvases in pixels; default DEFAULT_PINPOINTS × size. Returns
    (list of PIL images, (cols, rows)).
    """
    if pinpoints is None:
        pinpoints = [(w * size, h * size) for w, h in DEFAULT_PINPOINTS]
    w, h = select_best_resolution(image.size, pinpoints)
    canvas = resize_and_pad(image, (w, h))
    tiles = [canvas.crop((x, y, x + size, y + size))
             for y in range(0, h, size) for x in range(0, w, size)]
    overview = image.resize((size, size), resample=BICUBIC)
    return [overview] + tiles, (math.ceil(w / size), math.ceil(h / size))


# ------------------------------------------------------------------------------------------ video

def sample_indices(n_frames, k):
    """The K frame indices used everywhere: `np.linspace(0, n_frames - 1, K).astype(int)`."""
    return np.linspace(0, n_frames - 1, k).astype(int).tolist()


def load_video(path, num_frames=DEFAULT_NUM_FRAMES):
    """Decode K = num_frames uniformly sampled frames of a video file with PyAV.

    Returns (frames uint8 (K,H,W,3) RGB, timestamps: list of K presentation times in seconds).
    Streaming: frames are decoded in order and only the selected ones are converted to RGB and kept,
    so memory is K frames whatever the clip length. The frame count n is the container's declared
    count when it has one (mp4/mov/avi) and it proves right; otherwise (mkv/webm, or a declared count
    the decoder disagrees with) one extra counting pass decodes the clip without RGB conversion —
    about the cost of one more decode. If n < K, indices repeat (linspace rounding).
    """
    return _load_video(path, num_frames)[:2]


def _load_video(path, k):
    path = os.fspath(path)
    k = int(k)
    if k < 1:
        raise ValueError(f"num_frames must be >= 1, got {k}")
    declared = _declared_frame_count(path)
    if declared > 0:
        got = _grab(path, sample_indices(declared, k), declared)
        if got is not None:
            return got
    n = _count_frames(path)
    if n == 0:
        raise ValueError(f"no decodable video frames in {path}")
    if declared > 0:
        warnings.warn(f"{path}: container declares {declared} frames, decoder yields {n}; using {n}")
    got = _grab(path, sample_indices(n, k), n)
    if got is None:
        raise ValueError(f"cannot decode video file {path}: frame count changed between passes")
    return got


def _open_video(path):
    import av

    if not os.path.isfile(path):
        raise ValueError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video file {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"no video stream in {path}")
    return container


def _frames(path, container):
    """Decoded frames of the first video stream; a decoder error mid-stream ends the clip (warned)."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    it = container.decode(stream)
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except av.FFmpegError as e:
            warnings.warn(f"{path}: decoding stopped early: {e}")
            return
        yield frame


def _declared_frame_count(path):
    with _open_video(path) as c:
        return max(int(c.streams.video[0].frames or 0), 0)


def _count_frames(path):
    with _open_video(path) as c:
        return sum(1 for _ in _frames(path, c))


def _grab(path, indices, n):
    """Keep the frames at `indices` (sorted, may repeat); None if the clip does not have exactly n frames."""
    want = {}
    for i in indices:
        want[i] = want.get(i, 0) + 1
    frames, times, size = [], [], None
    with _open_video(path) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        count = 0
        for i, frame in enumerate(_frames(path, c)):
            count = i + 1
            if i >= n:
                return None  # more frames than declared
            if i in want:
                size = size or (frame.width, frame.height)
                rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                t = frame.time if frame.time is not None else (i / rate if rate else float(i))
                for _ in range(want[i]):
                    frames.append(rgb)
                    times.append(float(t))
        if count != n:  # (after index n-1 the loop decodes at most one more frame: the check above)
            return None
    return np.stack(frames), times, list(indices), n


def video_to_frames(video, num_frames):
    """A video argument → (list of PIL RGB frames, frame indices, timestamps or None).

    Files are decoded with `load_video`; arrays (T,H,W,3) uint8 (or lists of images) are used as-is
    when T <= num_frames, else sampled with `sample_indices(T, num_frames)`.
    """
    if isinstance(video, (str, os.PathLike)):
        frames, times, idx, _ = _load_video(video, num_frames)
        return [Image.fromarray(f) for f in frames], idx, times
    if hasattr(video, "detach"):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"video arrays must have shape (T,H,W,3), got {video.shape}")
        video = list(video)
    if not isinstance(video, (list, tuple)) or len(video) == 0:
        raise ValueError("a video must be a file path, a (T,H,W,3) uint8 array or a non-empty list of frames")
    idx = list(range(len(video))) if len(video) <= num_frames else sample_indices(len(video), num_frames)
    return [to_rgb(video[i]) for i in idx], idx, None
