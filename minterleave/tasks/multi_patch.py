"""Multi-patch domain: ONE large image (twice the image size) with a big shape and small marks. The marks
are fine dot patterns that a 2x downscale erases ('dots'), so the processor's low-resolution overview
cannot show them and only its full-resolution tiles can; 'solid' marks survive it (a control). Questions:
which quadrant has the mark of a colour, what colour the mark is.
"""

import math

import numpy as np
from PIL import Image

from .render import COLOURS, GREY, SHAPES, draw_mark, free_pos, render_2d

LABEL = "Image"
QTYPES = ("quadrant", "mark_colour")
DEFAULTS = {"mark": "dots"}    # or "solid"
MULTI_PATCH = True             # the processor tiles the image (an overview plus full-resolution tiles)
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")


def choices(qtype, **_):
    return {"quadrant": QUADRANTS, "mark_colour": COLOURS}[qtype]


def generate(rng, qtype, ans, size, mark, **_):
    """([one image of 2 * size px], question, info): a big shape plus one or two small marks."""
    big = 2 * size
    s = big / 128
    r = 14 * s
    bx, by = free_pos(rng, big, r, [], 4 * s)
    shape_col = rng.choice(COLOURS)
    img = render_2d(big, [(rng.choice(SHAPES), shape_col, bx, by, r)], bg=GREY)
    arr = np.array(img)
    m = 2 * max(3, round(4 * s))   # 8 px at 128 (4 px at overview scale), and lost in the overview

    def put(quad, colour):
        qx, qy = quad % 2, quad // 2
        h = big // 2
        for _ in range(500):
            x0 = 2 * rng.randrange(int(qx * h + 6 * s) // 2, int(qx * h + h - m - 6 * s) // 2)
            y0 = 2 * rng.randrange(int(qy * h + 6 * s) // 2, int(qy * h + h - m - 6 * s) // 2)
            if math.hypot(x0 + m / 2 - bx, y0 + m / 2 - by) >= r * 1.2 + m + 4 * s:
                draw_mark(arr, x0, y0, m, colour, mark)
                return (x0, y0, m)
        raise RuntimeError("no room for the mark")

    if qtype == "quadrant":
        quad, col = QUADRANTS.index(ans), rng.choice(COLOURS)
        decoy = rng.choice([c for c in COLOURS if c != col])
        marks = [(QUADRANTS[quad], col, put(quad, col))]
        dq = rng.choice([i for i in range(4) if i != quad])
        marks.append((QUADRANTS[dq], decoy, put(dq, decoy)))
        q = f"Which quadrant has the small {col} mark?"
    else:
        quad = rng.randrange(4)
        marks = [(QUADRANTS[quad], ans, put(quad, ans))]
        q = "What colour is the small mark?"
    return [Image.fromarray(arr)], q, {"marks": marks, "shape": (shape_col, bx, by, r)}
