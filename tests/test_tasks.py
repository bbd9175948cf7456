"""Synthetic task families (minterleave.tasks): determinism, balance, pixel-only answers, records; the
domain list and what a new domain needs; the --patch-words helpers."""

import copy
import functools
import importlib.util
import json
import os
import random
import re
import types
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import minterleave as mi
from minterleave import tasks
from minterleave.tasks import patch_words
from minterleave.tasks.render import COLOURS, GREY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")

N_PER_QTYPE = 400   # samples of each question type in the per-domain tests


@functools.lru_cache(maxsize=None)
def samples(domain):
    """Consecutive seeds: N_PER_QTYPE samples of each question type."""
    n = N_PER_QTYPE * len(tasks.QTYPES[domain])
    return tuple(tasks.make_sample(domain, s) for s in range(n))


def bare(question):
    """The question without its image placeholders / labels (which come before or after it)."""
    labels = "|".join({m.LABEL for m in tasks.DOMAINS.values()})
    return " ".join(re.sub(rf"(?:(?:{labels})(?: \d+)?: )?<image>", " ", question).split())


# ------------------------------------------------------------------ pixel oracles (no text, no info)
def colour_map(img):
    """HxW labels: index into COLOURS for saturated pixels (also shaded 3D ones), -1 elsewhere."""
    a = np.asarray(img).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    out = np.full(r.shape, -1)
    out[(r > 100) & (g < 0.3 * r) & (b < 0.3 * r)] = 0
    out[(g > 100) & (r < 0.3 * g) & (b < 0.3 * g)] = 1
    out[(b > 100) & (r < 0.3 * b) & (g < 0.3 * b)] = 2
    out[(r > 100) & (g > 0.7 * r) & (g < 1.3 * r) & (b < 0.3 * r)] = 3
    return out


def grid_scene(img):
    """{cell: (colour, shape)} of a multi-image scene: one shape per cell of a 3x3 grid; the shape
    from how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5)."""
    lab = colour_map(img)
    size = lab.shape[0]
    out = {}
    for cell in range(9):
        y0, x0 = (cell // 3) * size // 3, (cell % 3) * size // 3
        sub = lab[y0:y0 + size // 3, x0:x0 + size // 3]
        ys, xs = np.nonzero(sub >= 0)
        if len(ys) < 10:
            continue
        fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
        out[cell] = (COLOURS[np.bincount(sub[sub >= 0]).argmax()], shape)
    return out


def solve_multi_image(s):
    scenes = [grid_scene(im) for im in s.images]
    words = bare(s.question).rstrip("?").split()
    if s.qtype == "spot_diff":
        a, b = scenes
        if len(b) != len(a):
            return "added" if len(b) > len(a) else "removed"
        return "recoloured" if set(a) == set(b) else "moved"
    if s.qtype == "which_image":
        target = (words[-2], words[-1])
        return str(1 + [target in sc.values() for sc in scenes].index(True))
    col = words[2]
    return str(sum(c == col for sc in scenes for c, _ in sc.values()))


def solve_video(s):
    labs = [colour_map(im) for im in s.images]
    words = bare(s.question).rstrip("?").replace(",", "").split()
    present = lambda col, f: (labs[f] == COLOURS.index(col)).sum() > 10  # noqa: E731
    if s.qtype == "direction":
        k = COLOURS.index(words[5])
        (y0, x0), (y1, x1) = [np.argwhere(labs[f] == k).mean(0) for f in (0, -1)]
        if abs(x1 - x0) > abs(y1 - y0):
            return "right" if x1 > x0 else "left"
        return "down" if y1 > y0 else "up"
    if s.qtype == "appear":
        return "disappear" if present(words[2], 0) else "appear"
    a, b = words[4], words[7]
    first = lambda col: min(f for f in range(len(labs)) if present(col, f))  # noqa: E731
    return a if first(a) < first(b) else b


def visible_colours(img, min_px=4):
    lab = colour_map(img)
    return {COLOURS[k] for k in range(4) if (lab == k).sum() >= min_px}


def solve_3d(s):
    words = bare(s.question).rstrip("?").split()
    lab = colour_map(s.images[0])
    if s.qtype == "count":
        return str(len(set().union(*(visible_colours(im) for im in s.images))))
    if s.qtype == "left_right":
        xa, xb = [np.nonzero(lab == COLOURS.index(c))[1].mean() for c in (words[6], words[13])]
        return "left" if xa < xb else "right"
    low = {c: np.nonzero(lab == COLOURS.index(c))[0].max() for c in visible_colours(s.images[0])}
    return max(low, key=low.get)


def find_marks(img):
    """[(colour, x, y)] of the fine dot marks: a pure palette pixel whose right and lower neighbours
    are its partner colour (flat shapes have same-colour or grey neighbours)."""
    from minterleave.tasks.render import PALETTE, dot_partner
    a = np.asarray(img).astype(int)
    out = []
    for col in COLOURS:
        c, p = np.array(PALETTE[col]), np.array(dot_partner(PALETTE[col]))
        hit = (a[:-1, :-1] == c).all(-1) & (a[:-1, 1:] == p).all(-1) & (a[1:, :-1] == p).all(-1)
        ys, xs = np.nonzero(hit)
        if len(ys):
            out.append((col, xs.mean(), ys.mean()))
    return out


def solve_multi_patch(s):
    h = s.images[0].width / 2
    marks = find_marks(s.images[0])
    if s.qtype == "mark_colour":
        assert len(marks) == 1
        return marks[0][0]
    col = bare(s.question).split()[5]
    _, x, y = [m for m in marks if m[0] == col][0]
    return tasks.QUADRANTS[2 * int(y >= h) + int(x >= h)]


SOLVERS = {"multi_image": solve_multi_image, "video": solve_video, "3d": solve_3d,
           "multi_patch": solve_multi_patch}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_deterministic_per_seed(domain):
    for seed in (0, 1, 5, 123457):
        a, b = tasks.make_sample(domain, seed), tasks.make_sample(domain, seed)
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
        assert (a.question, a.answer, a.qtype, a.placement) == (b.question, b.answer, b.qtype, b.placement)
    x, y = tasks.make_sample(domain, 3), tasks.make_sample(domain, 3 + 4 * len(tasks.QTYPES[domain]))
    assert [im.tobytes() for im in x.images] != [im.tobytes() for im in y.images]
    assert tasks.make_sample(domain, 3, placement="front").answer == x.answer


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_sample_shape(domain):
    for s in samples(domain)[:40]:
        assert s.domain == domain and s.qtype in tasks.QTYPES[domain]
        assert s.answer in s.choices and s.chance == tasks.CHANCE[domain, s.qtype]
        assert s.question.count("<image>") == len(s.images)
        # both placements; which-image asks first, everything else after its images
        first = s.question.startswith(bare(s.question))
        assert first == (s.qtype in tasks.QUESTION_FIRST) and s.question.endswith("<image>") == first
        assert s.placement == ("front" if "\n" in s.question else "interleaved")
        if s.multi_patch:
            assert len(s.images) == 1 and s.images[0].size == (128, 128)
        else:
            assert all(im.size == (64, 64) and im.mode == "RGB" for im in s.images)
    assert len(tasks.make_sample("video", 0, num_frames=6).images) == 6
    assert len(tasks.make_sample("3d", 0, num_views=4).images) == 4
    assert tasks.make_sample("multi_image", 1, image_size=96).images[0].size == (96, 96)


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_answers_balanced(domain):
    by = defaultdict(Counter)
    for s in samples(domain):
        by[s.qtype][s.answer] += 1
    assert set(by) == set(tasks.QTYPES[domain])
    for qtype, cnt in by.items():
        ch = tasks.choices(domain, qtype)
        assert set(cnt) == set(ch), (qtype, cnt)
        n = sum(cnt.values())
        for a in ch:
            assert abs(cnt[a] / n - 1 / len(ch)) < 0.03, (qtype, cnt)
    if domain == "video":   # the question names two colours: the answer is first or second equally often
        first = [s.answer == bare(s.question).split()[4].rstrip(",") for s in samples(domain) if s.qtype == "order"]
        assert abs(np.mean(first) - 0.5) < 0.1


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_answer_from_pixels(domain):
    """A pixel-based solver (it reads the question's colour/shape words, never the answer) recovers
    every answer."""
    solve = SOLVERS[domain]
    for s in samples(domain)[:240]:
        assert solve(s) == s.answer, (s.qtype, s.question, s.answer)


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_question_text_does_not_give_answer(domain):
    """The same question text comes with several answers; a text-only predictor (majority answer
    per question text, fitted on one half) is near chance on the other half."""
    ss = samples(domain)
    half = len(ss) // 2
    for qtype in tasks.QTYPES[domain]:
        fit = defaultdict(Counter)
        for s in ss[:half]:
            if s.qtype == qtype:
                fit[bare(s.question)][s.answer] += 1
        assert any(len(c) > 1 for c in fit.values())
        test = [s for s in ss[half:] if s.qtype == qtype]
        acc = np.mean([fit[bare(s.question)].most_common(1)[0][0] == s.answer
                       for s in test if bare(s.question) in fit])
        assert acc < tasks.CHANCE[domain, qtype] + 0.15, (qtype, acc)


@pytest.mark.parametrize("size", [64, 96])
def test_grid_scene_labels_are_what_the_pixels_show(size):
    """--patch-words trains each patch on these labels: they must be the drawn shapes."""
    for k in range(30):
        img, cells = tasks.grid_scene(random.Random(k), size)
        assert img.size == (size, size) and 1 <= len(cells) <= 4
        assert grid_scene(img) == cells, k


def test_3d_count_needs_several_views():
    counts = [s for s in samples("3d") if s.qtype == "count"]
    partial = 0
    for s in counts:
        seen = [visible_colours(im) for im in s.images]
        union = set().union(*seen)
        assert len(union) == int(s.answer)
        partial += any(v < union for v in seen)
        hv = [v for v, px in enumerate(s.info["pixels"]) if px[1] == 0]
        assert hv, "the hidden object is fully hidden in some view"
    # an object is fully hidden in some view (and seen in another) in most scenes
    assert partial > 0.8 * len(counts)
    # and the first view alone undercounts often: no single fixed view suffices
    assert np.mean([len(visible_colours(s.images[0])) < int(s.answer) for s in counts]) > 0.2


def test_multi_patch_mark_lost_in_overview_but_kept_in_tiles():
    """Downscale the large image to 64 px as the processor's overview does (Pillow bicubic): what is
    left of the mark (image minus the same image with the mark painted grey) is below 5% of its
    full contrast; a flat mark of the same size ('solid', the control) keeps more than half. In the
    full-resolution 64-px tiles the mark is untouched."""
    worst, solid = 0, 1e9
    for seed in range(24):
        for style in ("dots", "solid"):
            s = tasks.make_sample("multi_patch", seed, mark=style)
            a = np.asarray(s.images[0]).astype(int)
            b = a.copy()
            for _, _, (x0, y0, m) in s.info["marks"]:
                b[y0:y0 + m, x0:x0 + m] = GREY
            full = np.abs(a - b).max()
            down = [np.asarray(Image.fromarray(x.astype(np.uint8)).resize((64, 64), Image.BICUBIC)).astype(int)
                    for x in (a, b)]
            left = np.abs(down[0] - down[1]).max() / full
            if style == "dots":
                worst = max(worst, left)
                tiles = [s.images[0].crop((x, y, x + 64, y + 64)) for y in (0, 64) for x in (0, 64)]
                assert sorted(c for c, *_ in find_marks(s.images[0])) == \
                    sorted(c for t in tiles for c, *_ in find_marks(t))
                assert full >= 100
            else:
                solid = min(solid, left)
    assert worst < 0.05, worst
    assert solid > 0.5, solid


def test_records(tmp_path):
    n = 4 * len(tasks.DOMAINS)
    recs = tasks.write_dataset(str(tmp_path / "train.json"), "all", n, seed=0, out_dir=str(tmp_path),
                               write_video=True)
    assert json.load(open(tmp_path / "train.json")) == recs
    assert Counter(r["metadata"]["domain"] for r in recs) == {d: 4 for d in tasks.DOMAINS}
    assert {r["metadata"]["placement"] for r in recs} == {"front", "interleaved"}
    assert len({r["id"] for r in recs}) == n
    for r in recs:
        assert set(r) >= {"id", "image", "conversations", "metadata"}
        (h, g) = r["conversations"]
        assert h["from"] == "human" and g["from"] == "gpt"
        assert h["value"].count("<image>") == len(r["image"]) >= 1
        assert g["value"] in tasks.choices(r["metadata"]["domain"], r["metadata"]["question_type"])
        assert r["metadata"]["dataset"] == "minterleave-synthetic"
        tiled = getattr(tasks.DOMAINS[r["metadata"]["domain"]], "MULTI_PATCH", False)
        assert r.get("multi_patch", False) == tiled and ("multi_patch" in r) == tiled
        for p in r["image"]:
            assert not os.path.isabs(p) and Image.open(tmp_path / p).size[0] in (64, 128)
        if r["metadata"]["domain"] == "video":
            import av
            with av.open(str(tmp_path / r["video"])) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert len(frames) == len(r["image"]) == 4
            png = np.asarray(Image.open(tmp_path / r["image"][0])).astype(int)
            assert np.abs(frames[0].astype(int) - png).mean() < 12   # lossy, but the same picture
        else:
            assert "video" not in r
    # the same call again gives the same records; another seed gives other files
    again = tasks.make_records("all", n, 0, str(tmp_path))
    assert again == [{k: v for k, v in r.items() if k != "video"} for r in recs]
    other = tasks.make_records("video", 2, 1, str(tmp_path), placement="front")
    assert not set(other[0]["image"]) & {p for r in recs for p in r["image"]}
    assert all(r["conversations"][0]["value"].startswith("<image>" * 4 + "\n") for r in other)


# ------------------------------------------------------------------ the domain list, and a new domain
def test_domains_are_listed_once_and_every_table_reads_them():
    assert tuple(tasks.DOMAINS) == ("multi_image", "video", "3d", "multi_patch") and len(tasks.DOMAINS) == 4
    for d, m in tasks.DOMAINS.items():
        assert isinstance(m.LABEL, str) and callable(m.generate) and tasks.QTYPES[d] == m.QTYPES
        for q in m.QTYPES:
            assert tasks.choices(d, q) == m.choices(q, **m.DEFAULTS)
    assert set(tasks.CHANCE) == {(d, q) for d in tasks.DOMAINS for q in tasks.QTYPES[d]}
    assert tasks.CHANCE["video", "order"] == 0.5 and tasks.CHANCE["multi_image", "spot_diff"] == 0.25
    assert tasks.QUESTION_FIRST == ("which_image",)
    assert [d for d, m in tasks.DOMAINS.items() if getattr(m, "MULTI_PATCH", False)] == ["multi_patch"]
    assert tasks.DEFAULTS == {"num_images": 3, "num_frames": 4, "num_views": 3, "mark": "dots"}
    assert tasks.choices("multi_image", "which_image", num_images=5) == ("1", "2", "3", "4", "5")
    with pytest.raises(ValueError, match="'toy' not in"):
        tasks.make_sample("toy", 0)


TOY = '''"""Toy domain: one shape on black; what colour is it, which side is it on?"""

from minterleave.tasks.render import COLOURS, render_2d

LABEL = "Picture"
QTYPES = ("colour", "side")
DEFAULTS = {"toy_shape": "square"}
QUESTION_FIRST = ("side",)


def choices(qtype, **_):
    return {"colour": COLOURS, "side": ("left", "right")}[qtype]


def generate(rng, qtype, answer, size, toy_shape, **_):
    colour = answer if qtype == "colour" else rng.choice(COLOURS)
    side = answer if qtype == "side" else rng.choice(("left", "right"))
    x = size / 4 if side == "left" else 3 * size / 4
    image = render_2d(size, [(toy_shape, colour, x, size / 2, size / 6)])
    if qtype == "colour":
        return [image], f"What colour is the {toy_shape}?", {"side": side}
    return [image], f"Is the {colour} {toy_shape} on the left or the right?", {"colour": colour}
'''


def test_a_new_domain_is_its_module_plus_one_line_and_trains(tmp_path, monkeypatch):
    """docs/adding-a-domain.md, done: a module file, one entry in tasks.DOMAINS, then every table, the
    records, train.py --domain and its data stream pick it up."""
    (tmp_path / "toy.py").write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy", tmp_path / "toy.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.setitem(tasks.DOMAINS, "toy", toy)   # the one line, undone after the test

    assert tasks.QTYPES["toy"] == ("colour", "side") and tasks.CHANCE["toy", "side"] == 0.5
    assert "side" in tasks.QUESTION_FIRST and tasks.DEFAULTS["toy_shape"] == "square"
    smps = [tasks.make_sample("toy", s, placement="interleaved") for s in range(16)]
    assert [s.qtype for s in smps[:2]] == ["colour", "side"]
    assert Counter(s.answer for s in smps if s.qtype == "colour") == {c: 2 for c in COLOURS}
    assert smps[0].question == "Picture: <image> What colour is the square?"
    assert smps[1].question.startswith("Is the ") and smps[1].question.endswith("right? Picture: <image>")
    assert "circle" in tasks.make_sample("toy", 1, toy_shape="circle").question
    recs = tasks.make_records("all", 10, 0, str(tmp_path / "recs"))
    assert Counter(r["metadata"]["domain"] for r in recs) == {d: 2 for d in tasks.DOMAINS}

    monkeypatch.syspath_prepend(ROOT)
    import train
    out, threads = str(tmp_path / "ckpt"), torch.get_num_threads()
    try:  # (the tokenizer's text, tasks.corpus(), now includes the toy's questions)
        train.main(["--preset", "test", "--domain", "toy", "--max-steps", "2", "--batch-size", "2",
                    "--log-every", "1", "--out", out, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out, "train_log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 1
    assert mi.Model.from_pretrained(out).cfg.vision.image_size == 96


# ------------------------------------------------------------------ --patch-words
@pytest.fixture(scope="module")
def bundled():
    return mi.Model.from_pretrained(BUNDLED, dtype=torch.float32).eval(), mi.Processor.from_pretrained(BUNDLED)


def test_patch_word_targets_are_the_grid_scene_labels(bundled):
    model, proc = bundled
    ids = patch_words.word_ids(proc)
    assert sorted(ids) == sorted(COLOURS + tasks.SHAPES) and len(set(ids.values())) == 7
    assert all(proc.encode(" " + w) == [i] for w, i in ids.items())
    seeds, size = ["0-3-1", "0-3-2", 7], proc.image_size
    pixels, targets = patch_words.batch(proc, seeds, size, ids)
    assert pixels.shape == (3, 3, size, size) and targets.shape == (3, 9, 2)
    for i, seed in enumerate(seeds):
        img, cells = tasks.grid_scene(random.Random(seed), size)
        assert torch.equal(pixels[i], torch.from_numpy(proc.image_pixels(img)))
        for k in range(9):
            assert targets[i, k].tolist() == ([ids[w] for w in cells[k]] if k in cells else [-100, -100])
    with pytest.raises(ValueError, match="splits 'red' into 2 tokens"):
        patch_words.word_ids(types.SimpleNamespace(encode=lambda text: [5, 6]))


def test_patch_word_loss_is_the_mean_nll_of_both_words_per_occupied_cell(bundled):
    model, proc = bundled
    ids = patch_words.word_ids(proc)
    pixels, targets = patch_words.batch(proc, range(6), proc.image_size, ids)
    total, n = patch_words.loss_sum(model, pixels, targets)
    want, cells = 0.0, 0
    with torch.no_grad():   # cell by cell, cross-entropy of the head's logits for that one patch
        feats = model.image_features(pixels)
        for i in range(6):
            for k, (colour, shape) in tasks.grid_scene(random.Random(i), proc.image_size)[1].items():
                logits = model.decoder.logits(model.decoder.norm(feats[i, k])).double()
                want += F.cross_entropy(logits.expand(2, -1), torch.tensor([ids[colour], ids[shape]])).item()
                cells += 1
    assert n == cells and 6 <= n <= 24
    assert abs(total.item() - want) < 1e-5 * want, (total.item(), want)
    total.backward()   # it trains the tower and the projector (and, tied, the word embeddings)
    assert model.vision.patch_embedding.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_patch_words_need_a_3x3_grid(bundled):
    cfg = bundled[0].cfg
    patch_words.check_grid(cfg)
    other = copy.deepcopy(cfg)
    other.vision.patch_size = 16   # 6x6 patches: a grid cell is no longer one patch
    with pytest.raises(ValueError, match="3x3"):
        patch_words.check_grid(other)
