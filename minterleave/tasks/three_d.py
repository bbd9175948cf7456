"""3D domain: several views of one scene of boxes and spheres on a ground plane, rendered by a tiny numpy
ray caster (exact perspective and occlusion). Questions: how many objects (one hides behind another in
some view, so no single view suffices), left or right in the first view, colour of the object nearest
to the first camera.
"""

import math

import numpy as np
from PIL import Image

from .render import COLOURS, PALETTE

LABEL = "View"
QTYPES = ("count", "left_right", "nearest")
DEFAULTS = {"num_views": 3}


def choices(qtype, **_):
    return {"count": ("2", "3", "4"), "left_right": ("left", "right"), "nearest": COLOURS}[qtype]


# ------------------------------------------------------------------------------------------ ray caster
GROUND = (96, 96, 96)       # the ground plane (the sky is black)
LIGHT = np.array([0.45, 0.3, 1.0]) / np.linalg.norm([0.45, 0.3, 1.0])


def camera_rays(size, azimuth_deg, elevation_deg, dist, fov_deg=40.0, target=(0.0, 0.0, 0.35)):
    """Pinhole camera on a circle around the scene (world z is up). Returns origin (3,) and unit
    ray directions (size, size, 3); image row 0 is the top."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    tgt = np.array(target)
    eye = tgt + dist * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    fwd = tgt - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    t = math.tan(math.radians(fov_deg) / 2)
    s = (np.arange(size) + 0.5) / size * 2 - 1          # pixel centres in [-1, 1]
    x, y = np.meshgrid(s * t, -s * t)                    # y: +1 at the top row
    d = fwd + x[..., None] * right + y[..., None] * up
    return eye, d / np.linalg.norm(d, axis=-1, keepdims=True)


def project(eye, azimuth_deg, elevation_deg, dist, point, size, fov_deg=40.0, target=(0.0, 0.0, 0.35)):
    """Image (x, y) in pixels of a world point, same camera as `camera_rays`."""
    tgt = np.array(target)
    fwd = tgt - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    v = np.asarray(point, float) - eye
    t = math.tan(math.radians(fov_deg) / 2)
    xn, yn = (v @ right) / (v @ fwd) / t, (v @ up) / (v @ fwd) / t
    return (xn + 1) / 2 * size, (1 - yn) / 2 * size


def _hit_sphere(eye, d, c, r):
    oc = eye - c
    b = d @ oc
    disc = b * b - (oc @ oc - r * r)
    t = -b - np.sqrt(np.maximum(disc, 0))
    t = np.where((disc > 0) & (t > 1e-6), t, np.inf)
    n = (eye + t[..., None] * d - c) / r
    return t, n


def _hit_box(eye, d, c, half, yaw):
    cy, sy = math.cos(yaw), math.sin(yaw)
    rot = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1.0]])   # local -> world
    o = (eye - c) @ rot                                           # world -> local (rot^T)
    dl = d @ rot
    dl = np.where(np.abs(dl) < 1e-9, 1e-9, dl)
    t1, t2 = (-half - o) / dl, (half - o) / dl
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    tmin, tmax = tn.max(-1), tf.min(-1)
    t = np.where((tmax >= tmin) & (tmin > 1e-6), tmin, np.inf)
    axis = tn.argmax(-1)
    nl = np.zeros(d.shape)
    np.put_along_axis(nl, axis[..., None], -np.sign(np.take_along_axis(dl, axis[..., None], -1)), -1)
    return t, nl @ rot.T


def raycast(objs, eye, d):
    """objs: list of dicts {kind: 'box'|'sphere', pos: (x, y), size: half-width or radius,
    height: box height, yaw: radians, colour: name}. Returns (rgb uint8 HxWx3, id int HxW with -1
    for ground/sky). Exact perspective and occlusion (nearest hit per pixel)."""
    h, w = d.shape[:2]
    best = np.full((h, w), np.inf)
    ids = np.full((h, w), -1)
    shade = np.zeros((h, w, 3))
    tg = np.where(d[..., 2] < -1e-9, -eye[2] / np.where(d[..., 2] < -1e-9, d[..., 2], -1), np.inf)
    best[:] = tg
    shade[np.isfinite(tg)] = GROUND
    for k, ob in enumerate(objs):
        x, y = ob["pos"]
        if ob["kind"] == "sphere":
            t, n = _hit_sphere(eye, d, np.array([x, y, ob["size"]]), ob["size"])
        else:
            hz = ob["height"] / 2
            t, n = _hit_box(eye, d, np.array([x, y, hz]), np.array([ob["size"], ob["size"], hz]), ob["yaw"])
        m = t < best
        best[m], ids[m] = t[m], k
        lum = 0.45 + 0.55 * np.clip(n[m] @ LIGHT, 0, 1)
        shade[m] = lum[:, None] * np.array(PALETTE[ob["colour"]], float)
    return np.clip(np.round(shade), 0, 255).astype(np.uint8), ids


# ------------------------------------------------------------------------------------------ scenes
CAM = {"dist": 7.0, "fov_deg": 40.0}   # every 3D view: this far from the scene centre, this field of view


def random_object(rng, small=False, tall=False):
    """A box or sphere (no position yet); `tall`: an occluder box, `small`: a sphere it can hide."""
    if tall:
        return dict(kind="box", size=rng.uniform(0.45, 0.55), height=rng.uniform(1.15, 1.4), yaw=rng.uniform(0, 1.5))
    if small:
        return dict(kind="sphere", size=rng.uniform(0.28, 0.34), height=0, yaw=0)
    if rng.random() < 0.5:
        return dict(kind="sphere", size=rng.uniform(0.32, 0.45), height=0, yaw=0)
    h = rng.uniform(0.35, 0.5)
    return dict(kind="box", size=h, height=2 * h * rng.uniform(0.8, 1.3), yaw=rng.uniform(0, 1.5))


def _foot(ob):
    return ob["size"] * (1.42 if ob["kind"] == "box" else 1.0)


def box_gap(box, p):
    """Ground-plane distance from point p to a (yawed) box footprint."""
    c, sn = math.cos(box["yaw"]), math.sin(box["yaw"])
    dx, dy = p[0] - box["pos"][0], p[1] - box["pos"][1]
    lx, ly = c * dx + sn * dy, -sn * dx + c * dy
    return math.hypot(max(abs(lx) - box["size"], 0), max(abs(ly) - box["size"], 0))


def place3d(rng, ob, objs, radius=1.7):
    """Put ob at a random free spot within `radius` of the origin; False if none was found."""
    for _ in range(200):
        a, rr = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.random())
        p = (rr * math.cos(a), rr * math.sin(a))
        if all(math.dist(p, o["pos"]) >= _foot(ob) + _foot(o) + 0.15 for o in objs):
            ob["pos"] = p
            return True
    return False


def render3d(objs, size, views):
    """[(eye, rgb, ids)] for each (azimuth, elevation) in views."""
    out = []
    for az, el in views:
        eye, d = camera_rays(size, az, el, CAM["dist"], CAM["fov_deg"])
        rgb, ids = raycast(objs, eye, d)
        out.append((eye, rgb, ids))
    return out


# ------------------------------------------------------------------------------------------ task
def generate(rng, qtype, ans, size, num_views, **_):
    """(views, question, info): num_views views around one scene, redrawn until the answer is unambiguous."""
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
