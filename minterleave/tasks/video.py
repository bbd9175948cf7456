"""Video domain: frames of shapes that move, appear or disappear (static ones around them). Questions: in
which direction an object moves, whether it appears or disappears, which of two colours appears first.
"""

from .render import COLOURS, SHAPES, free_pos, render_2d

LABEL = "Frame"
QTYPES = ("direction", "appear", "order")
DEFAULTS = {"num_frames": 4}   # >= 2
CHANCE = {"order": 0.5}        # the question names the two candidate colours


def choices(qtype, **_):
    return {"direction": ("left", "right", "up", "down"), "appear": ("appear", "disappear"), "order": COLOURS}[qtype]


def generate(rng, qtype, ans, size, num_frames, **_):
    """(frames, question, info): num_frames frames of moving, appearing and static shapes."""
    K, s = num_frames, size / 64
    r, m = 7 * s, 3 * s
    tracks = []   # (shape, colour, [(x, y) or None per frame])
    if qtype == "direction":
        col = rng.choice(COLOURS)
        step = min(9 * s, (size - 2 * r - 2 * m) / (K - 1))
        span = step * (K - 1)
        lo, hi = r + m, size - r - m
        a0, b = rng.uniform(lo, hi - span), rng.uniform(lo, hi)
        sgn = 1 if ans in ("right", "down") else -1
        start = a0 if sgn > 0 else a0 + span
        path = [(start + sgn * step * f, b) for f in range(K)]
        if ans in ("up", "down"):
            path = [(y, x) for x, y in path]
        tracks.append((rng.choice(SHAPES), col, path))
        q = f"In which direction does the {col} object move?"
    elif qtype == "appear":
        col = rng.choice(COLOURS)
        t = rng.randint(1, K - 1)
        p = free_pos(rng, size, r, [], m)
        path = [p if (f >= t) == (ans == "appear") else None for f in range(K)]
        tracks.append((rng.choice(SHAPES), col, path))
        q = f"Does the {col} object appear or disappear?"
    else:  # order: ans appears (and stays) before the other named colour
        other = rng.choice([c for c in COLOURS if c != ans])
        ta = rng.randint(0, K - 2)
        tb = rng.randint(ta + 1, K - 1)
        taken = []
        for col, t in ((ans, ta), (other, tb)):
            p = free_pos(rng, size, r, taken, m)
            taken.append((*p, r))
            tracks.append((rng.choice(SHAPES), col, [p if f >= t else None for f in range(K)]))
        first, second = (ans, other) if rng.random() < 0.5 else (other, ans)
        q = f"Which appears first, the {first} or the {second} object?"
    used = {c for _, c, _ in tracks}
    taken = [(*p, r) for _, _, path in tracks for p in path if p]
    n_static = {"direction": rng.randint(1, 2), "appear": rng.randint(1, 2)}.get(qtype, rng.randint(0, 1))
    for col in rng.sample([c for c in COLOURS if c not in used], n_static):
        p = free_pos(rng, size, r, taken, m)
        taken.append((*p, r))
        tracks.append((rng.choice(SHAPES), col, [p] * K))
    frames = [render_2d(size, [(sh, c, *path[f], r) for sh, c, path in tracks if path[f]]) for f in range(K)]
    return frames, q, {"tracks": tracks}
