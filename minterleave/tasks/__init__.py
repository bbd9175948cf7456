"""Synthetic, seeded stand-ins for M4-Instruct: one task family per domain, one module per domain.

    from minterleave import tasks
    s = tasks.make_sample("video", seed=7)          # s.images, s.question, s.answer, s.chance, ...
    tasks.write_dataset("out/train.json", "all", 4000, seed=0, out_dir="out")

Built to train a tiny LLaVA (64 px images, 9 vision patches each) on a CPU: big flat shapes in four
colours on a plain background, one-word answers, few fixed question templates. The answer is only
derivable from the pixels; every question template is seen with every answer. Sample seed s fixes everything:
question type = s mod (number of types), answer = (s // number of types) mod (number of answers),
so consecutive seeds are exactly balanced; the rest is drawn from `random.Random(f"{domain}:{s}")`.

A domain module provides LABEL (the word before each image: "Image 1: <image>"), QTYPES, choices(qtype,
**opts) and generate(rng, qtype, answer, size, **opts) -> (images, question, info); optionally DEFAULTS
(its options), QUESTION_FIRST (question types asked before their images), CHANCE ({qtype: accuracy of a
blind guess} where that is not 1 / number of choices) and MULTI_PATCH (True: its one large image goes
through the processor's multi-patch tiling). DOMAINS below is the one list of domains; the
tables QTYPES, CHANCE, QUESTION_FIRST and DEFAULTS are read from it whenever they are used, so adding a
domain is its module plus one line there (docs/adding-a-domain.md).
"""

import functools
import json
import os
import random
from dataclasses import dataclass, field

from . import multi_image, multi_patch, three_d, video, which_colour
from .multi_patch import QUADRANTS  # noqa: F401 (re-exported)
from .render import COLOURS, SHAPES, grid_scene, save_video  # noqa: F401 (re-exported)

DOMAINS = {  # name -> module, in the order --domain all cycles through them
    "multi_image": multi_image,
    "video": video,
    "3d": three_d,
    "multi_patch": multi_patch,
}
# Question types that are not part of "all": selectable by name (--domain which_colour), so adding one changes
# neither what `--domain all` trains and scores nor any sample of the domains above. The tables below
# (QTYPES, CHANCE, ...) describe DOMAINS; make_sample, choices and chance take these names too.
EXTRA = {
    "which_colour": which_colour,   # the reverse of which_image, taught to the bundled model by LoRA (README)
}


def __getattr__(name):
    """tasks.QTYPES, CHANCE, QUESTION_FIRST, DEFAULTS: built from DOMAINS when read (so never stale)."""
    if name == "QTYPES":
        return {d: m.QTYPES for d, m in DOMAINS.items()}
    if name == "CHANCE":
        return {(d, q): chance(d, q) for d, m in DOMAINS.items() for q in m.QTYPES}
    if name == "QUESTION_FIRST":
        return tuple(q for m in DOMAINS.values() for q in getattr(m, "QUESTION_FIRST", ()))
    if name == "DEFAULTS":
        return {k: v for m in DOMAINS.values() for k, v in getattr(m, "DEFAULTS", {}).items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _module(domain):
    if domain not in DOMAINS and domain not in EXTRA:
        raise ValueError(f"domain {domain!r} not in {(*DOMAINS, *EXTRA)}")
    return DOMAINS.get(domain) or EXTRA[domain]


def choices(domain, qtype, **opts):
    """All answers of a question type (each equally likely). opts: the domain's options (num_images)."""
    m = _module(domain)
    return m.choices(qtype, **{**getattr(m, "DEFAULTS", {}), **opts})


def chance(domain, qtype, **opts):
    """Accuracy of a blind guess: 1/len(choices), unless the domain says otherwise (video/order names its
    two candidate colours in the question, so 1/2)."""
    override = getattr(_module(domain), "CHANCE", {}).get(qtype)
    return override if override is not None else 1 / len(choices(domain, qtype, **opts))


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
    multi_patch: bool = False   # its one large image goes through the processor's multi-patch tiling


def make_sample(domain, seed, image_size=64, placement=None, **opts):
    """One sample; deterministic per (domain, seed, image_size, placement, opts). opts: num_images
    (which_image, default 3), num_frames (video, >= 2, default 4), num_views (3d, 3), mark
    (multi_patch: 'dots', lost in a 2x downscale, or 'solid', a control that survives it)."""
    m = _module(domain)
    o = {**getattr(m, "DEFAULTS", {}), **opts}
    rng = random.Random(f"{domain}:{seed}")
    qtype = m.QTYPES[seed % len(m.QTYPES)]
    ch = m.choices(qtype, **o)
    ans = ch[(seed // len(m.QTYPES)) % len(ch)]
    images, q, info = m.generate(rng, qtype, ans, image_size, **o)
    placement = placement or rng.choice(("front", "interleaved"))
    n = len(images)
    if placement == "front":
        shown, sep = "<image>" * n, "\n"
    elif placement == "interleaved":
        shown, sep = (f"{m.LABEL}: <image>" if n == 1 else
                      " ".join(f"{m.LABEL} {i + 1}: <image>" for i in range(n))), " "
    else:
        raise ValueError(placement)
    text = q + sep + shown if qtype in getattr(m, "QUESTION_FIRST", ()) else shown + sep + q
    return Sample(images, text, ans, list(ch), chance(domain, qtype, **o), qtype, domain, placement, info,
                  getattr(m, "MULTI_PATCH", False))


def corpus(n_per_domain=60, seed=0):
    """Question, answer and choice lines of the synthetic tasks (training text for a tokenizer that knows their
    words; train.py builds the bundled model's tokenizer from it). Cached per set of domains."""
    return _corpus(tuple(DOMAINS), n_per_domain, seed)


@functools.lru_cache(maxsize=None)
def _corpus(domains, n_per_domain, seed):
    from ..data import train_seed  # training-range seeds, as the training stream uses
    lines = []
    for d in domains:
        for k in range(n_per_domain):
            s = make_sample(d, train_seed(seed, k))
            lines += [s.question.replace("<image>", " "), s.answer, " ".join(s.choices)]
    return tuple(lines * 4)


def sample_seed(seed, index):
    """Seed of the index-th sample of a split (per domain): disjoint streams for seeds 0, 1, ..."""
    return seed * 10_000_000 + index


def make_records(domain, n, seed, out_dir, image_size=64, write_video=False, placement=None, **opts):
    """n M4-Instruct-shaped records; images go to out_dir/<domain>/<sampleseed>_<k>.png (relative
    paths in the record), the j-th sample of a domain has seed sample_seed(seed, j). domain='all'
    cycles through DOMAINS (equal shares). write_video: video records also get a "video" file."""
    names, recs = tuple(DOMAINS), []
    for i in range(n):
        dom, j = (names[i % len(names)], i // len(names)) if domain == "all" else (domain, i)
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
        if smp.multi_patch:   # the record says so itself (data.py reads it)
            rec["multi_patch"] = True
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
