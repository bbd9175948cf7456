"""Images → pixels: loading and RGB conversion, the SigLIP pixel pipeline, AnyRes tiling (video: video.py).

Pixel values follow transformers' PIL backend of SiglipImageProcessor exactly (same Pillow calls, same
numpy dtypes), so they are bit-equal to `LlavaProcessor` in a venv without torchvision:

* RGB conversion (`to_rgb`), as transformers does it:
  - PIL image with an alpha band or a `transparency` entry (RGBA, LA, PA, P/L with transparency):
    converted to RGBA and alpha-composited onto opaque WHITE, then RGB;
  - any other 8-bit PIL mode (L, P, CMYK, 1, YCbCr, ...): `image.convert("RGB")`;
  - file path: opened, EXIF orientation applied, then `convert("RGB")` — transformers' `load_image`,
    which DROPS alpha (no white compositing) before the steps above can see it;
  - numpy uint8 (H,W,3) as-is; (H,W,4) composited onto white in float64 and rounded; (H,W) or
    (H,W,1) repeated to 3 channels (transformers does not accept those).
  Note: the official preprocessor_config.json says `"do_convert_rgb": null`, which transformers 5.24
  takes as "do not convert" (its SigLIP processor then fails on L/P/RGBA/CMYK images); we always
  convert, i.e. we match transformers with do_convert_rgb=True (and exactly, on RGB inputs, without).
* Unlike transformers on purpose, whose `convert("RGB")` CLIPS these at 255 (mostly white images):
  16-bit samples (I;16 modes: 16-bit grey PNG/TIFF) keep their high byte, v >> 8, as Pillow itself
  reads 16-bit RGB PNGs; 32-bit integer (I) images the same when within 0..65535; float (F) images in
  [0, 1] become round(v × 255). Other ranges (and NaN) are a MediaError: there is no scale to guess.
* Animated GIF/WebP/PNG files: the first frame, with one warning per file read.
* Files over MAX_PIXELS (2^25, 33.5 M pixels; 8K UHD fits) are shrunk while decoding, since the
  processor resizes to S×S anyway: JPEG decodes at 1/2..1/8 scale (`Image.draft`), others are read
  once and `reduce`d a band of rows at a time. Peak memory (VmHWM growth) for a file just under
  Pillow's bomb limit, 9440×9470: JPEG 94 MB (1.0 GB before), RGB or RGBA PNG 460 MB (1.0 GB),
  16-bit grey PNG 290 MB (680 MB). Smaller files are read whole: pixels bit-equal to transformers'.
* `preprocess`: PIL `resize((S,S), BICUBIC)` (reducing_gap None), then `uint8 → float64 * 1/255 →
  float32`, then `(x - mean) / std` in float32; returned channels-first (3,S,S).
* Errors: a missing file is FileNotFoundError, a directory IsADirectoryError, content that cannot be
  used MediaError (a ValueError); each message is one line naming the file.
"""

import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps


BICUBIC = 3

# lmms-lab llava-next-interleave `image_grid_pinpoints` [[384,768],[768,384],[768,768],[1152,384],[384,1152]]
# as (width, height) multiples of the tile size S = 384.
DEFAULT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))

MAX_PIXELS = 1 << 25  # files above are shrunk while decoding (module docstring)
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}  # EXIF orientation → transpose, as ImageOps.exif_transpose


class MediaError(ValueError):
    """An image or video whose content cannot be used: unreadable, truncated, or no defined 8-bit RGB."""


def check_file(path, kind):
    """FileNotFoundError / IsADirectoryError naming `path`, before anything opens it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not {kind} file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path}")


# ----------------------------------------------------------------------------------------- images

def to_rgb(image):
    """PIL image, numpy array (H,W,3|4|1 or H,W) uint8, torch tensor or file path → PIL RGB image."""
    if isinstance(image, (str, os.PathLike)):
        return _open_image(os.fspath(image))
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().cpu().numpy()
    if isinstance(image, Image.Image):
        return _rgb8(image, composite=True)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    raise TypeError(f"unsupported image type {type(image).__name__}: expected a PIL image, "
                    "a numpy uint8 array (H,W,3) or a file path")


def _eight_bit(im, name=None):
    """16-bit, 32-bit integer and float images → mode L by the module docstring's rules; others as they are."""
    who = f"{name}: " if name else ""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im)
        if im.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
            raise MediaError(f"{who}32-bit integer image with values {a.min()}..{a.max()}: no defined 8-bit scale "
                             "(expected 0..65535)")
        return Image.fromarray((a >> 8).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not (0 <= lo and hi <= 1):  # NaN fails too
            raise MediaError(f"{who}float image with values {lo:g}..{hi:g}: only [0, 1] has a defined 8-bit scale")
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L")
    return im


def _rgb8(im, composite, name=None):
    """Any PIL image → 8-bit RGB (module docstring); alpha composited onto white when `composite`."""
    im = _eight_bit(im, name)
    if composite and ("A" in im.getbands() or im.info.get("transparency") is not None):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _shrink_factor(size):
    w, h = size
    return 1 if w * h <= MAX_PIXELS else math.ceil(math.sqrt(w * h / MAX_PIXELS))


def _open_image(path):
    check_file(path, "image")
    try:
        fh = open(path, "rb")  # ours, not Pillow's: closing it leaves the returned pixels alone
    except PermissionError:
        raise PermissionError(f"{path}: permission denied") from None
    with fh:
        try:
            return _decode_image(Image.open(fh), path)
        except MediaError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise MediaError(f"cannot read image file {path}: {e}") from None


def _decode_image(im, path):
    if getattr(im, "is_animated", False):
        warnings.warn(f"{path}: animated image: using its first frame")
    f = _shrink_factor(im.size)
    if f > 1 and im.format == "JPEG":  # libjpeg decodes at 1/2..1/8 scale: no full-size buffer at all
        im.draft(None, (im.width // f, im.height // f))
    im.load()
    f = _shrink_factor(im.size)
    if f == 1:  # transformers' load_image (exif_transpose, convert("RGB")), without its copies
        ImageOps.exif_transpose(im, in_place=True)
        return im if im.mode == "RGB" else _rgb8(im, composite=False, name=path)
    # still too large: f×f block means, a band of rows at a time, each band made 8-bit RGB first, so that
    # no second full-size copy is made; then orient by hand (the reduced image has no TIFF tags left)
    method = _ORIENT.get(im.getexif().get(0x0112))
    w, h = im.size
    out = Image.new("RGB", (-(-w // f), -(-h // f)))
    band = f * max(1, (1 << 22) // (w * f))
    for y in range(0, h, band):
        out.paste(_rgb8(im.crop((0, y, w, min(y + band, h))), False, path).reduce(f), (0, y // f))
    im.close()
    return out.transpose(method) if method is not None else out


def _array_to_rgb(a):
    if a.dtype != np.uint8:
        raise MediaError(f"image arrays must be uint8 (H,W,3), got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or min(a.shape[:2]) == 0:
        raise MediaError(f"image arrays must have shape (H,W,3), got {a.shape}")
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
