"""Synthetic, seeded stand-ins for M4-Instruct: one task family per domain (DESIGN.md "Synthetic tasks").

    from minterleave import tasks
    s = tasks.make_sample("video", seed=7)          # s.images, s.question, s.answer, s.chance, ...
    tasks.write_dataset("out/train.json", "all", 4000, seed=0, out_dir="out")

Built to train a tiny LLaVA (64 px images, 9 vision patches each) on a CPU: big flat shapes in four
colours on a plain background, one-word answers, few fixed question templates. The answer is only
derivable from the pixels; every question template is seen with every answer. Sample seed s fixes everything:
question type = s mod (number of types), answer = (s // number of types) mod (number of answers),
so consecutive seeds are exactly balanced; the rest is drawn from `random.Random(f"{domain}:{s}")`.
"""

import json
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .tasks_render import (CAM, COLOURS, GREY, SHAPES, box_gap, draw_mark, place3d, project,
                           random_object, render3d, render_2d, save_video)

DOMAINS = ("multi_image", "video", "3d", "multi_patch")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
QTYPES = {"multi_image": ("spot_diff", "which_image", "count"),
          "video": ("direction", "appear", "order"),
          "3d": ("count", "left_right", "nearest"),
          "multi_patch": ("quadrant", "mark_colour")}
# Question types asked before their images. A causal decoder reads each image token with the question
# already in view, so an image can be matched against "a red square" where it is read; asked after the
# images, the one answering position has to bring colour and shape together itself (weights/README.md).
QUESTION_FIRST = ("which_image",)
DEFAULTS = {"num_images": 3, "num_frames": 4, "num_views": 3, "mark": "dots"}


def choices(domain, qtype, num_images=DEFAULTS["num_images"]):
    """All answers of a question type (each equally likely)."""
    return {("multi_image", "spot_diff"): ("added", "removed", "recoloured", "moved"),
            ("multi_image", "which_image"): tuple(str(i + 1) for i in range(num_images)),
            ("multi_image", "count"): ("1", "2", "3", "4"),
            ("video", "direction"): ("left", "right", "up", "down"),
            ("video", "appear"): ("appear", "disappear"),
            ("video", "order"): COLOURS,
            ("3d", "count"): ("2", "3", "4"),
            ("3d", "left_right"): ("left", "right"),
            ("3d", "nearest"): COLOURS,
            ("multi_patch", "quadrant"): QUADRANTS,
            ("multi_patch", "mark_colour"): COLOURS}[domain, qtype]


def chance(domain, qtype, num_images=DEFAULTS["num_images"]):
    """Accuracy of a blind guess. 1/len(choices), except video/order, whose question names the two
    candidate colours (so 1/2)."""
    return 0.5 if (domain, qtype) == ("video", "order") else 1 / len(choices(domain, qtype, num_images))


CHANCE = {(d, q): chance(d, q) for d in DOMAINS for q in QTYPES[d]}


@dataclass
class Sample:
    images: list          # PIL RGB images: the images / frames / views, or ONE large image (multi_patch)
    question: str         # with one "<image>" per entry of `images`
    answer: str
    choices: list
    chance: float
    qtype: str
    domain: str
    placement: str        # "front" | "interleaved"
    info: dict = field(default_factory=dict)   # generator ground truth (for tests / debugging)


# --------------------------------------------------------------------------------- helpers
def _free_pos(rng, size, r, taken, margin):
    """A centre (x, y) at least `margin` from the border and from every (x, y, r) in `taken`."""
    for _ in range(500):
        x, y = rng.uniform(r + margin, size - r - margin), rng.uniform(r + margin, size - r - margin)
        if all(math.hypot(x - a, y - b) >= r + rr + margin for a, b, rr in taken):
            return x, y
    raise RuntimeError("no room")


def _grid_item(rng, size, cell, shape=None, colour=None):
    """A shape centred in cell 0..8 of a 3x3 grid, with a little jitter (it stays inside its cell)."""
    s, c = size / 64, size / 3
    return dict(shape=shape or rng.choice(SHAPES), colour=colour or rng.choice(COLOURS), cell=cell,
                x=(cell % 3 + 0.5) * c + rng.uniform(-1.5, 1.5) * s,
                y=(cell // 3 + 0.5) * c + rng.uniform(-1.5, 1.5) * s, r=rng.uniform(6.5, 7.5) * s)


def _draw(size, items):
    return render_2d(size, [(it["shape"], it["colour"], it["x"], it["y"], it["r"]) for it in items])


def grid_scene(rng, size, max_items=4):
    """One multi-image-style scene with its labels: (image, {cell: (colour, shape)}). Cell k of the 3x3
    grid is exactly patch k when the patch is a third of the image (train.py --patch-words uses this)."""
    items = [_grid_item(rng, size, c) for c in rng.sample(range(9), rng.randint(1, max_items))]
    return _draw(size, items), {it["cell"]: (it["colour"], it["shape"]) for it in items}


# --------------------------------------------------------------------------------- multi-image
def _multi_image(rng, qtype, ans, size, num_images, **_):
    if qtype == "spot_diff":
        n1 = {"added": rng.randint(2, 3), "removed": rng.randint(3, 4)}.get(ans, rng.randint(2, 4))
        cells = rng.sample(range(9), n1 + 1)
        a = [_grid_item(rng, size, c) for c in cells[:n1]]
        b = [dict(it) for it in a]
        k = rng.randrange(n1)
        if ans == "added":
            b.insert(rng.randrange(n1 + 1), _grid_item(rng, size, cells[n1]))
        elif ans == "removed":
            b.pop(k)
        elif ans == "recoloured":
            b[k]["colour"] = rng.choice([c for c in COLOURS if c != a[k]["colour"]])
        else:  # moved: same shape and colour, another cell
            b[k] = _grid_item(rng, size, cells[n1], a[k]["shape"], a[k]["colour"])
        return [_draw(size, a), _draw(size, b)], "What changed between the two images?", {"items": [a, b]}
    if qtype == "which_image":
        target = (rng.choice(COLOURS), rng.choice(SHAPES))
        scenes = []
        for i in range(num_images):
            n = rng.randint(1, 3)
            cells = rng.sample(range(9), n)
            items = []
            for j, c in enumerate(cells):
                if i == int(ans) - 1 and j == 0:
                    items.append(_grid_item(rng, size, c, target[1], target[0]))
                    continue
                if j == 0 and rng.random() < 0.7:   # a hard negative: same colour or same shape
                    col, shp = (target[0], rng.choice([s for s in SHAPES if s != target[1]])) \
                        if rng.random() < 0.5 else (rng.choice([c2 for c2 in COLOURS if c2 != target[0]]), target[1])
                else:
                    col, shp = rng.choice([(c2, s2) for c2 in COLOURS for s2 in SHAPES if (c2, s2) != target])
                items.append(_grid_item(rng, size, c, shp, col))
            rng.shuffle(items)
            scenes.append(items)
        q = f"Which image has a {target[0]} {target[1]}?"
        return [_draw(size, it) for it in scenes], q, {"items": scenes}
    # count: the number of <colour> shapes over two images
    k, col = int(ans), rng.choice(COLOURS)
    k1 = rng.randint(max(0, k - 4), min(k, 4))
    scenes = []
    for ki in (k1, k - k1):
        t = rng.randint(max(2, ki), 4)
        cols = [col] * ki + [rng.choice([c for c in COLOURS if c != col]) for _ in range(t - ki)]
        rng.shuffle(cols)
        scenes.append([_grid_item(rng, size, c, colour=cc) for c, cc in zip(rng.sample(range(9), t), cols)])
    return [_draw(size, it) for it in scenes], f"How many {col} shapes are there in total?", {"items": scenes}


# --------------------------------------------------------------------------------- video
def _video(rng, qtype, ans, size, num_frames, **_):
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
        p = _free_pos(rng, size, r, [], m)
        path = [p if (f >= t) == (ans == "appear") else None for f in range(K)]
        tracks.append((rng.choice(SHAPES), col, path))
        q = f"Does the {col} object appear or disappear?"
    else:  # order: ans appears (and stays) before the other named colour
        other = rng.choice([c for c in COLOURS if c != ans])
        ta = rng.randint(0, K - 2)
        tb = rng.randint(ta + 1, K - 1)
        taken = []
        for col, t in ((ans, ta), (other, tb)):
            p = _free_pos(rng, size, r, taken, m)
            taken.append((*p, r))
            tracks.append((rng.choice(SHAPES), col, [p if f >= t else None for f in range(K)]))
        first, second = (ans, other) if rng.random() < 0.5 else (other, ans)
        q = f"Which appears first, the {first} or the {second} object?"
    used = {c for _, c, _ in tracks}
    taken = [(*p, r) for _, _, path in tracks for p in path if p]
    n_static = {"direction": rng.randint(1, 2), "appear": rng.randint(1, 2)}.get(qtype, rng.randint(0, 1))
    for col in rng.sample([c for c in COLOURS if c not in used], n_static):
        p = _free_pos(rng, size, r, taken, m)
        taken.append((*p, r))
        tracks.append((rng.choice(SHAPES), col, [p] * K))
    frames = [render_2d(size, [(sh, c, *path[f], r) for sh, c, path in tracks if path[f]]) for f in range(K)]
    return frames, q, {"tracks": tracks}


# --------------------------------------------------------------------------------- 3D
def _three_d(rng, qtype, ans, size, num_views, **_):
    V, s2 = num_views, (size / 64) ** 2
    for _attempt in range(400):
        el, az0 = rng.uniform(18, 26), rng.uniform(0, 360)
        views = [(az0 + 360 * v / V, el) for v in range(V)]
        if qtype == "count":
            n, hv = int(ans), rng.randrange(V)   # hv: the view in which one object is hidden
            occ, hid = random_object(rng, tall=True), random_object(rng, small=True)
            a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.6)
            occ["pos"] = (rr * math.cos(a), rr * math.sin(a))
            away, dd = math.radians(views[hv][0] + 180), rng.uniform(0.8, 1.05)
            hid["pos"] = (occ["pos"][0] + dd * math.cos(away), occ["pos"][1] + dd * math.sin(away))
            if box_gap(occ, hid["pos"]) < hid["size"] + 0.05:
                continue
            objs = [occ, hid]
        else:
            n, objs = rng.randint(2, 4), []
        ok = True
        while len(objs) < n and ok:
            ob = random_object(rng)
            ok = place3d(rng, ob, objs)
            objs.append(ob)
        if not ok:
            continue
        for ob, c in zip(objs, rng.sample(COLOURS, n)):
            ob["colour"] = c
        rend = render3d(objs, size, views)
        px = np.array([[int((ids == k).sum()) for k in range(n)] for _, _, ids in rend])   # [view, obj]
        info = {"objects": objs, "views": views, "pixels": px.tolist()}
        if qtype == "count":
            if px[hv, 1] == 0 and (px.max(0) >= 12 * s2).all():
                return [Image.fromarray(r) for _, r, _ in rend], "How many objects are in the scene?", info
            continue
        eye, _, ids0 = rend[0]
        vis = [k for k in range(n) if px[0, k] >= 25 * s2]
        if qtype == "left_right":
            if len(vis) < 2:
                continue
            a, b = rng.sample(vis, 2)
            cx = [project(eye, *views[0], CAM["dist"], (*objs[k]["pos"], 0.3), size, CAM["fov_deg"])[0] for k in (a, b)]
            mx = [np.nonzero(ids0 == k)[1].mean() for k in (a, b)]
            if abs(cx[0] - cx[1]) < 6 * math.sqrt(s2) or (cx[0] - cx[1]) * (mx[0] - mx[1]) <= 0 \
                    or abs(mx[0] - mx[1]) < 4 * math.sqrt(s2):
                continue
            if (cx[0] < cx[1]) != (ans == "left"):
                a, b = b, a
            q = f"In the first view, is the {objs[a]['colour']} object left or right of the {objs[b]['colour']} object?"
            return [Image.fromarray(r) for _, r, _ in rend], q, info
        # nearest to the camera of the first view: a clear margin in depth and on screen
        dist = [math.dist(eye, (*ob["pos"], 0.3)) for ob in objs]
        order = np.argsort(dist)
        k = int(order[0])
        if dist[order[1]] - dist[k] < 0.6 or k not in vis:
            continue
        low = [np.nonzero(ids0 == j)[0].max() if px[0, j] else -1 for j in range(n)]
        if any(low[k] < low[j] + 2 * math.sqrt(s2) for j in range(n) if j != k):
            continue
        cur = objs[k]["colour"]           # swap colours so that the nearest one has the answer colour
        for ob in objs:
            if ob["colour"] == ans:
                ob["colour"] = cur
        objs[k]["colour"] = ans
        rend = render3d(objs, size, views)
        q = "In the first view, what colour is the object nearest to the camera?"
        return [Image.fromarray(r) for _, r, _ in rend], q, info
    raise RuntimeError("3d scene rejection failed")


# --------------------------------------------------------------------------------- multi-patch
def _multi_patch(rng, qtype, ans, size, mark, **_):
    big = 2 * size
    s = big / 128
    r = 14 * s
    bx, by = _free_pos(rng, big, r, [], 4 * s)
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


# --------------------------------------------------------------------------------- API
_GEN = {"multi_image": _multi_image, "video": _video, "3d": _three_d, "multi_patch": _multi_patch}
_LABEL = {"multi_image": "Image", "video": "Frame", "3d": "View", "multi_patch": "Image"}


def make_sample(domain, seed, image_size=64, placement=None, **opts):
    """One sample; deterministic per (domain, seed, image_size, placement, opts). opts: num_images
    (which_image, default 3), num_frames (video, >= 2, default 4), num_views (3d, 3), mark
    (multi_patch: 'dots', lost in a 2x downscale, or 'solid', a control that survives it)."""
    if domain not in _GEN:
        raise ValueError(f"domain {domain!r} not in {DOMAINS}")
    o = {**DEFAULTS, **opts}
    rng = random.Random(f"{domain}:{seed}")
    qtypes = QTYPES[domain]
    qtype = qtypes[seed % len(qtypes)]
    ch = choices(domain, qtype, o["num_images"])
    ans = ch[(seed // len(qtypes)) % len(ch)]
    images, q, info = _GEN[domain](rng, qtype, ans, image_size, **o)
    placement = placement or rng.choice(("front", "interleaved"))
    n = len(images)
    if placement == "front":
        shown, sep = "<image>" * n, "\n"
    elif placement == "interleaved":
        shown, sep = (f"{_LABEL[domain]}: <image>" if n == 1 else
                      " ".join(f"{_LABEL[domain]} {i + 1}: <image>" for i in range(n))), " "
    else:
        raise ValueError(placement)
    text = q + sep + shown if qtype in QUESTION_FIRST else shown + sep + q
    return Sample(images, text, ans, list(ch), chance(domain, qtype, o["num_images"]), qtype, domain,
                  placement, info)


def sample_seed(seed, index):
    """Seed of the index-th sample of a split (per domain): disjoint streams for seeds 0, 1, ..."""
    return seed * 10_000_000 + index


def make_records(domain, n, seed, out_dir, image_size=64, write_video=False, placement=None, **opts):
    """n M4-Instruct-shaped records; images go to out_dir/<domain>/<sampleseed>_<k>.png (relative
    paths in the record), the j-th sample of a domain has seed sample_seed(seed, j). domain='all'
    cycles through DOMAINS (equal shares). write_video: video records also get a "video" file."""
    recs = []
    for i in range(n):
        dom, j = (DOMAINS[i % len(DOMAINS)], i // len(DOMAINS)) if domain == "all" else (domain, i)
        ss = sample_seed(seed, j)
        smp = make_sample(dom, ss, image_size, placement, **opts)
        os.makedirs(os.path.join(out_dir, dom), exist_ok=True)
        paths = []
        for k, im in enumerate(smp.images):
            rel = f"{dom}/{ss:06d}_{k}.png"
            im.save(os.path.join(out_dir, rel))
            paths.append(rel)
        rec = {"id": f"{dom}-{ss:06d}", "image": paths,
               "conversations": [{"from": "human", "value": smp.question}, {"from": "gpt", "value": smp.answer}],
               "metadata": {"dataset": "minterleave-synthetic", "domain": dom, "question_type": smp.qtype,
                            "chance": smp.chance, "placement": smp.placement, "seed": ss}}
        if write_video and dom == "video":
            rel = f"video/{ss:06d}.mp4"
            save_video(smp.images, os.path.join(out_dir, rel))
            rec["video"] = rel
        recs.append(rec)
    return recs


def write_dataset(path_json, domain, n, seed, out_dir, image_size=64, write_video=False, **opts):
    """make_records + a JSON array at path_json. Returns the records."""
    recs = make_records(domain, n, seed, out_dir, image_size, write_video, **opts)
    os.makedirs(os.path.dirname(os.path.abspath(path_json)), exist_ok=True)
    with open(path_json, "w") as f:
        json.dump(recs, f, indent=1)
    return recs
