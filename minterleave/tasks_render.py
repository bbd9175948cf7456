"""Rendering helpers for the synthetic tasks (`minterleave.tasks`): flat 2D shapes with Pillow,
the fine "dot" marks of the multi-patch family, and a tiny numpy ray caster for the 3D family.

Everything here is deterministic: no randomness, no global state.
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
GROUND = (96, 96, 96)       # 3D ground plane (sky is black)


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


# ------------------------------------------------------------------------------------------ 3D
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


# ------------------------------------------------------------------------------------------ 3D scenes
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
