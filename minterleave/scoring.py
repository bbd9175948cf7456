"""Scoring: how an answer is judged, the evaluation loops, and per-category tables.

    from minterleave import scoring
    res = scoring.evaluate_synthetic(model, proc, "video", n=200, seed=7)    # fresh synthetic questions
    res = scoring.evaluate_records(model, proc, "bench.json", "images/")      # Interleave-Bench-format JSON
    # (the benchmark's own protocol, categories and all: minterleave/interleave_bench.py, eval.py --bench)
    print(scoring.format_table(res, "per_qtype"))

Prompts: a question (its text with `<image>`/`<video>` placeholders where the media go) becomes
`proc.apply_chat_template([{"role": "user", "content": question}])`, the layout training uses before the
answer (records: `data.record_question`, which does the same). Greedy generation; the answer is cut at
the first end-of-turn id.

Judging:
- synthetic questions: exact match after `normalize` (lower case, first line only, outer punctuation
  and a leading "the/a/an" dropped, runs of spaces collapsed);
- records (Interleave-Bench-format JSON): Interleave-Bench's own rules, minterleave/bench_scoring.py (as
  lmms-eval: `mcq_acc` for multiple choice, the `rouge` package's ROUGE-L F for open-ended questions).
Chance: a synthetic question knows its own (a blind guess among its possible answers); a multiple-choice
record's is 1 / the number of options its question lists ("(A) ..", "B. .."), else unknown (None).

Tables: each question adds its score (1/0, or ROUGE-L) to one category — its question type for synthetic
questions, "dataset/question-type" for records. A row holds {"n", "correct": the sum of the scores,
"chance": the mean chance, None unless every question's is known}. "accuracy" is the mean over all
questions; Interleave-Bench instead averages the categories with equal weight (`macro`, and
`category_scores` for its second level, sub-tasks grouped into categories).
"""

import os
import re
import string

import torch

from . import bench_scoring, data, tasks
from .bench_scoring import mcq_acc, rouge_l  # noqa: F401  (the judging of records, re-exported)

ARTICLES = re.compile(r"^(the|a|an)\s+")


# ---------------------------------------------------------------------------------------- judging
def normalize(text):
    t = text.strip().lower()
    t = t.split("\n")[0].strip() if t else t
    t = t.strip(string.punctuation + " ")
    t = ARTICLES.sub("", t)
    return " ".join(t.split())


def exact_match(pred, answer):
    return normalize(pred) == normalize(answer)


def score(pred, answer, question_type):
    """One record's score: Interleave-Bench's (bench_scoring.score); a question type that is not "open-ended"
    counts as multiple choice, as records without metadata default to it."""
    return bench_scoring.score(pred, answer, "open-ended" if is_open_ended(question_type) else "multi-choice")


def is_open_ended(question_type):
    return "open" in question_type.lower()


def count_options(question):
    """Number of options listed in a question ("(A) x (B) y", "A. x\\nB. y"); None below two."""
    letters = set(re.findall(r"(?:^|\n|\s)\(?([A-H])[.)]\s", question))
    return len(letters) if len(letters) >= 2 else None


# ---------------------------------------------------------------------------------------- tables
def tally(rows):
    """[(category, score, chance or None)] → {category: {"n", "correct", "chance"}} (module docstring)."""
    acc = {}
    for cat, s, ch in rows:
        r = acc.setdefault(cat, {"n": 0, "correct": 0, "chances": []})
        r["n"] += 1
        r["correct"] += s
        if ch is not None:
            r["chances"].append(ch)
    return {cat: {"n": r["n"], "correct": r["correct"], "chance": _mean_if_all(r["chances"], r["n"])}
            for cat, r in acc.items()}


def _mean_if_all(values, n):
    return sum(values) / n if n and len(values) == n else None


def overall(table):
    """(n, accuracy = mean over questions, chance or None) of a tally."""
    n = sum(r["n"] for r in table.values())
    known = all(r["chance"] is not None for r in table.values())
    chance = sum(r["chance"] * r["n"] for r in table.values()) / n if n and known else None
    return n, sum(r["correct"] for r in table.values()) / max(n, 1), chance


def macro(table):
    """Mean of the categories' mean scores: every category counts once, whatever its size."""
    means = [r["correct"] / r["n"] for r in table.values() if r["n"]]
    return sum(means) / len(means) if means else 0.0


def category_scores(table, categories):
    """Interleave-Bench's second level: {category: [row name, ...]} → {category: mean of its rows' mean
    scores}, over the rows present; categories with none present are left out."""
    out = {}
    for cat, names in categories.items():
        means = [table[k]["correct"] / table[k]["n"] for k in names if k in table and table[k]["n"]]
        if means:
            out[cat] = sum(means) / len(means)
    return out


def combine(results):
    """Several results (one per domain) → one, weighted by question count, with "per_domain"."""
    n = sum(r["n"] for r in results)
    chance = (sum(r["chance"] * r["n"] for r in results) / n
              if n and all(r["chance"] is not None for r in results) else None)
    return {"domain": "all", "accuracy": sum(r["accuracy"] * r["n"] for r in results) / max(n, 1),
            "chance": chance, "n": n,
            "per_domain": {r["domain"]: {"accuracy": r["accuracy"], "chance": r["chance"], "n": r["n"]}
                           for r in results}}


def format_table(res, key):
    """The printable table of a result: one line per category of res[key] (sorted), then the overall
    line, and the category mean when the result has one."""
    fmt = lambda ch: "-" if ch is None else f"{ch:.3f}"  # noqa: E731
    lines = [res["domain"], f"  {'':22s} {'n':>6s} {'accuracy':>9s} {'chance':>7s}"]
    for name, v in sorted(res[key].items()):
        lines.append(f"  {name:22s} {v['n']:6d} {v['correct'] / max(v['n'], 1):9.3f} {fmt(v['chance']):>7s}")
    lines.append(f"  {'overall':22s} {res['n']:6d} {res['accuracy']:9.3f} {fmt(res['chance']):>7s}")
    if "macro" in res:
        lines.append(f"  {'mean of categories':22s} {len(res[key]):6d} {res['macro']:9.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_batch(model, proc, prompts, images, multi_patch=False, max_new_tokens=8):
    """Greedy answers (decoded strings) to a batch of prompts; images: flat list in prompt order."""
    inputs = proc(prompts, images=images, multi_patch=multi_patch)
    pixels = inputs.get("pixel_values")
    out = model.generate(inputs["input_ids"].to(model.device),
                         pixel_values=None if pixels is None else pixels.to(model.device),
                         attention_mask=inputs["attention_mask"].to(model.device), max_new_tokens=max_new_tokens,
                         eos_token_id=proc.eos_token_ids, pad_token_id=proc.pad_token_id)
    texts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in proc.eos_token_ids), len(row))
        texts.append(proc.decode(row[:cut]))
    return texts


def evaluate_synthetic(model, proc, domain, n, seed=0, batch_size=16, max_new_tokens=8, image_size=None,
                       verbose=False):
    """{"domain", "accuracy", "chance", "n", "per_qtype": {qtype: {"n", "correct", "chance"}}} on the first
    n questions of evaluation seed `seed` (sample seeds tasks.sample_seed(seed, i), never trained on)."""
    if not 0 <= seed < data.EVAL_SEED_LIMIT:
        raise ValueError(f"evaluation seeds must be in [0, {data.EVAL_SEED_LIMIT}) to stay clear of training seeds")
    size = image_size or proc.image_size
    rows = []
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        # videos get the checkpoint's frame count, as in training (streams.SyntheticStream)
        smps = [tasks.make_sample(domain, tasks.sample_seed(seed, i), size, num_frames=proc.num_frames)
                for i in range(start, min(n, start + batch_size))]
        prompts = [data.prompt_for(proc, s) for s in smps]
        preds = answer_batch(model, proc, prompts, [im for s in smps for im in s.images], smps[0].multi_patch,
                             max_new_tokens)
        for s, p in zip(smps, preds):
            ok = exact_match(p, s.answer)
            rows.append((s.qtype, int(ok), s.chance))
            if verbose and not ok:
                print(f"  miss {s.domain}/{s.qtype}: {s.question!r} -> {p!r} (answer {s.answer!r})")
    model.train(was_training)
    table = tally(rows)
    _, accuracy, chance = overall(table)
    return {"domain": domain, "accuracy": accuracy, "chance": chance if n else 0.0, "n": n, "per_qtype": table}


def evaluate_records(model, proc, path, image_root=None, batch_size=8, max_new_tokens=16, limit=None):
    """{"domain": file name, "accuracy", "macro", "chance", "n", "per_group": {"dataset/type": row}} for
    Interleave-Bench-format records (first human turn = question, first gpt turn = answer; metadata
    "question_type" multi-choice or open-ended, "dataset" or the record's "sub_task" = its group).
    Images are found under image_root (default: the JSON file's folder)."""
    recs = data.load_records(path)[:limit]
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    for i, r in enumerate(recs):
        prompt, files, answer, mp = data.record_question(proc, r, root, i)
        meta = r.get("metadata") or {}
        qtype = meta.get("question_type") or r.get("question_type") or "multi-choice"
        qtype = "open-ended" if is_open_ended(qtype) else "multi-choice"
        group = f"{meta.get('dataset') or r.get('sub_task') or 'all'}/{qtype}"
        items.append((prompt, files, answer, mp, qtype, group))
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for mp in (False, True):  # rows of one generate call must agree on multi_patch
            sub = [it for it in chunk if it[3] == mp]
            if sub:
                preds = answer_batch(model, proc, [it[0] for it in sub], [f for it in sub for f in it[1]], mp,
                                     max_new_tokens)
                for (prompt, _, answer, _, qtype, group), p in zip(sub, preds):
                    k = None if is_open_ended(qtype) else count_options(prompt)
                    rows.append((group, score(p, answer, qtype), 1 / k if k else None))
    table = tally(rows)
    n, accuracy, chance = overall(table)
    return {"domain": os.path.basename(path), "accuracy": accuracy, "macro": macro(table), "chance": chance,
            "n": n, "per_group": table}
