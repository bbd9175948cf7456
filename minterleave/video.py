"""Video → frames: K uniformly sampled frames of a file (PyAV, streaming) or of an array, and the checks that
make a damaged file one line of ours.

* Indices: `np.linspace(0, n_frames - 1, K).astype(int)` (`sample_indices`), the same everywhere.
* Files are decoded in order and only the selected frames are converted to RGB and kept, so memory is K
  frames whatever the clip length; n is the container's declared count when it proves right, else one
  counting pass finds it (mkv/webm, or a wrong count).
* Damage is a media.MediaError saying what was decoded and what is missing: an mp4 cut before its index
  (moov atom), fewer frames than the container declares with libav errors on the way (a truncated
  download), or a decoder error mid-stream. libav's own log lines are collected while decoding, never
  printed, whatever log level the caller gave PyAV; the caller's level is restored after.
* `num_frames` must be an int >= 1 (`check_num_frames`); the processor checks it, and whether K frames can
  fit the context, before anything is decoded.
"""

import contextlib
import os
import warnings

import numpy as np
from PIL import Image

from .config import DEFAULT_NUM_FRAMES
from .media import MediaError, check_file, to_rgb


def sample_indices(n_frames, k):
    """The K frame indices used everywhere: `np.linspace(0, n_frames - 1, K).astype(int)`."""
    return np.linspace(0, n_frames - 1, k).astype(int).tolist()


def check_num_frames(k):
    """num_frames as a positive int (checked before anything is decoded)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"num_frames must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"num_frames must be >= 1, got {k}")
    return int(k)


def load_video(path, num_frames=DEFAULT_NUM_FRAMES):
    """Decode K = num_frames uniformly sampled frames of a video file with PyAV (module docstring).

    Returns (frames uint8 (K,H,W,3) RGB, timestamps: list of K presentation times in seconds). The frame
    count costs one extra decoding pass, without RGB conversion, when the container has none or a wrong
    one. If n < K, indices repeat (linspace rounding).
    """
    return _load_video(path, num_frames)[:2]


@contextlib.contextmanager
def _libav_errors():
    """libav's error lines of the block, collected instead of printed or logged (whatever level the caller
    gave PyAV), so that a damaged file ends in one line of ours."""
    import av.logging as avlog

    level, skip = avlog.get_level(), avlog.get_skip_repeated()
    avlog.set_level(avlog.ERROR)
    avlog.set_skip_repeated(False)  # an error already seen in an earlier pass must count again
    try:
        with avlog.Capture(local=False) as logs:  # decoder threads log too
            yield logs
    finally:
        avlog.set_skip_repeated(skip)
        avlog.set_level(level)


def _ends_early(logs):
    text = " ".join(m for _, _, m in logs)
    if any(s in text for s in ("partial file", "ended prematurely", "moov atom not found")):
        return "the file ends early: cut short or still being written"
    return f"libav: {logs[-1][2].strip()}"


def _load_video(path, k):
    path, k = os.fspath(path), check_num_frames(k)
    with _libav_errors() as logs:
        n = got = _declared_frame_count(path)
        if n > 0:
            got, kept = _decode(path, sample_indices(n, k), n)
            if got < n and logs:
                raise MediaError(f"{path}: truncated or damaged video: decoded {got} of the {n} frames its "
                                 f"container declares, frames {got}..{n - 1} missing ({_ends_early(logs)})")
        if n == 0 or got > n:  # no count declared, or more frames than declared: count them all
            got = _decode(path, (), None)[0]
        if got == 0:
            raise MediaError(f"no decodable video frames in {path}" + (f" ({_ends_early(logs)})" if logs else ""))
        if got != n:
            if n > 0:
                warnings.warn(f"{path}: container declares {n} frames, decoder yields {got}; using {got}")
            n = got
            got, kept = _decode(path, sample_indices(n, k), n)
            if got != n:
                raise MediaError(f"cannot decode video file {path}: frame count changed between passes")
        return np.stack([f for f, _ in kept]), [t for _, t in kept], sample_indices(n, k), n


def _open_video(path):
    import av

    check_file(path, "video")
    try:
        container = av.open(path)
    except PermissionError:
        raise PermissionError(f"{path}: permission denied") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        if "moov atom not found" in str(e):
            raise MediaError(f"cannot read video file {path}: its mp4 index (moov atom) is missing: the file "
                             "was cut short or is still being written; nothing can be decoded") from None
        raise MediaError(f"cannot read video file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"no video stream in {path}")
    return container


def _frames(path, container):
    """Decoded frames of the first video stream; a decoder error mid-stream is a MediaError."""
    import av

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    it = container.decode(stream)
    n = 0
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except av.FFmpegError as e:
            why = getattr(e, "strerror", None) or e
            if n == 0:
                raise MediaError(f"no decodable video frames in {path} (libav: {why})") from None
            raise MediaError(f"{path}: damaged video: decoding failed after {n} frames (libav: {why})") from None
        n += 1
        yield frame


def _declared_frame_count(path):
    with _open_video(path) as c:
        return max(int(c.streams.video[0].frames or 0), 0)


def _decode(path, indices, limit):
    """One decoding pass → (frames decoded, stopping at limit + 1; [(rgb, time)] for `indices`, sorted,
    repeats kept). Only the kept frames are converted to RGB."""
    want = {}
    for i in indices:
        want[i] = want.get(i, 0) + 1
    kept, size, count = [], None, 0
    with _open_video(path) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        for i, frame in enumerate(_frames(path, c)):
            count = i + 1
            if limit is not None and i >= limit:
                break  # more frames than expected
            if i in want:
                size = size or (frame.width, frame.height)
                rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                t = frame.time if frame.time is not None else (i / rate if rate else float(i))
                kept += [(rgb, float(t))] * want[i]
    return count, kept


def video_to_frames(video, num_frames):
    """A video argument → (list of PIL RGB frames, frame indices, timestamps or None).

    Files are decoded with `load_video`; arrays (T,H,W,3) uint8 (or lists of images) are used as-is
    when T <= num_frames, else sampled with `sample_indices(T, num_frames)`.
    """
    num_frames = check_num_frames(num_frames)
    if isinstance(video, (str, os.PathLike)):
        frames, times, idx, _ = _load_video(video, num_frames)
        return [Image.fromarray(f) for f in frames], idx, times
    if hasattr(video, "detach"):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise MediaError(f"video arrays must have shape (T,H,W,3), got {video.shape}")
        video = list(video)
    if not isinstance(video, (list, tuple)) or len(video) == 0:
        raise MediaError("a video must be a file path, a (T,H,W,3) uint8 array or a non-empty list of frames")
    idx = list(range(len(video))) if len(video) <= num_frames else sample_indices(len(video), num_frames)
    return [to_rgb(video[i]) for i in idx], idx, None
