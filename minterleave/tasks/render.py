"""Drawing helpers shared by the task domains: the colour and shape vocabulary, flat 2D shapes with
Pillow, shapes in a 3x3 grid (with their labels), the fine "dot" marks, and writing frames as a video.

Only the functions that take an `rng` draw random numbers, and only from it: no global state.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

# answer vocabulary: four saturated colours, easy to tell apart at 64 px and under shading
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
BLACK = (0, 0, 0)
GREY = (128, 128, 128)      # multi-patch background: the mean of every dot mark


# ------------------------------------------------------------------------------------------ 2D
def draw_shape(draw, shape, cx, cy, r, rgb):
    """A flat shape of 'radius' r centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        a = r * 0.85
        draw.rectangle([cx - a, cy - a, cx + a, cy + a], fill=rgb)
    elif shape == "triangle":
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=rgb)
    else:
        raise ValueError(shape)


def render_2d(size, items, bg=BLACK):
    """items: iterable of (shape, colour_name, cx, cy, r)."""
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    for shape, colour, cx, cy, r in items:
        draw_shape(d, shape, cx, cy, r, PALETTE[colour])
    return img


def dot_partner(rgb, grey=GREY[0]):
    """Partner colour P of a dot mark [[C, P], [P, P]]: (C + 3P) / 4 = grey, so the mark's mean is the
    background and a 2x antialiased downscale cancels it (every non-constant component of a period-2
    pattern sits at the source Nyquist frequency, where the bicubic kernel sums to zero)."""
    return tuple(int(round((4 * grey - c) / 3)) for c in rgb)


def draw_mark(arr, x0, y0, m, colour, style="dots"):
    """Paint an m×m mark at (x0, y0) into an HxWx3 uint8 array. style 'dots': the colour on the
    even-even pixels of the mark (x0, y0 must be even), its partner on the others, the outer ring at
    half contrast (that taper cuts what survives a 2x bicubic downscale from ~9% to ~3% of the
    contrast); 'solid': a flat square (survives downscaling; a control)."""
    c = np.array(PALETTE[colour], float)
    if style == "solid":
        arr[y0:y0 + m, x0:x0 + m] = c.astype(np.uint8)
        return
    if style != "dots" or x0 % 2 or y0 % 2:
        raise ValueError((style, x0, y0))
    pat = np.empty((m, m, 3))
    pat[:] = dot_partner(PALETTE[colour])
    pat[::2, ::2] = c
    w = np.ones((m, m, 1))
    w[0], w[-1], w[:, 0], w[:, -1] = 0.5, 0.5, 0.5, 0.5
    g = np.array(GREY, float)
    arr[y0:y0 + m, x0:x0 + m] = np.round(g + (pat - g) * w).astype(np.uint8)


# ------------------------------------------------------------------------------------------ layout
def free_pos(rng, size, r, taken, margin):
    """A centre (x, y) at least `margin` from the border and from every (x, y, r) in `taken`."""
    for _ in range(500):
        x, y = rng.uniform(r + margin, size - r - margin), rng.uniform(r + margin, size - r - margin)
        if all(math.hypot(x - a, y - b) >= r + rr + margin for a, b, rr in taken):
            return x, y
    raise RuntimeError("no room")


def grid_item(rng, size, cell, shape=None, colour=None):
    """A shape centred in cell 0..8 of a 3x3 grid, with a little jitter (it stays inside its cell)."""
    s, c = size / 64, size / 3
    return dict(shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(COLOURS), cell=cell,
                x=(cell % 3 + 0.5) * c + rng.uniform(-1.5, 1.5) * s,
                y=(cell // 3 + 0.5) * c + rng.uniform(-1.5, 1.5) * s, r=rng.uniform(6.5, 7.5) * s)


def draw_items(size, items):
    """The grid items (dicts from grid_item) on black."""
    return render_2d(size, [(it["shape"], it["colour"], it["x"], it["y"], it["r"]) for it in items])


def grid_scene(rng, size, max_items=4):
    """One multi-image-style scene with its labels: (image, {cell: (colour, shape)}). Cell k of the 3x3
    grid is exactly patch k when the patch is a third of the image (what tasks.patch_words trains on)."""
    items = [grid_item(rng, size, c) for c in rng.sample(range(9), rng.randint(1, max_items))]
    return draw_items(size, items), {it["cell"]: (it["colour"], it["shape"]) for it in items}


# ------------------------------------------------------------------------------------------ video file
def save_video(frames, path, fps=2):
    """Frames → video file with PyAV: h264 (libx264) when available, else mpeg4. Returns the codec."""
    import av
    for codec in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(codec, "w")
            break
        except Exception:  # noqa: BLE001 - unknown encoder
            continue
    with av.open(path, mode="w") as container:
        st = container.add_stream(codec, rate=fps)
        st.width, st.height = frames[0].size
        st.pix_fmt = "yuv420p"
        if codec == "libx264":
            st.options = {"crf": "12"}
        for im in frames:
            container.mux(st.encode(av.VideoFrame.from_image(im.convert("RGB"))))
        container.mux(st.encode(None))
    return codec
