"""Interleave-Bench's scorer, as lmms-eval's `llava_interleave_bench` tasks define it.

    from minterleave import bench_scoring as bs
    bs.score(pred, answer, "multi-choice")     # 1 / 0 (mcq_acc)
    bs.score(pred, answer, "open-ended")       # ROUGE-L F of the `rouge` package
    table = bs.bench_table([(sub_task, score), ...])   # categories, unknown sub-tasks, mean of category means

References: Li et al. 2024, "LLaVA-NeXT-Interleave" (arXiv 2407.07895), the LLaVA-Interleave Bench;
lmms-eval, lmms_eval/tasks/llava_interleave_bench/utils.py (mcq_acc, oe_rogue, overall_score); the `rouge`
PyPI package 1.0.1 (rouge_score.rouge_l_summary_level), which lmms-eval calls. The definitions are
reproduced with their quirks, because the point is a number comparable with theirs (docs/interleave-bench.md
lists the quirks; tests/test_interleave_bench.py checks this code against the `rouge` package itself):
- multiple choice: an "X. text" answer is its letter X (A-E); anything else goes through the VQA punctuation
  rules, is lower-cased, and becomes the first standalone letter a-e in it if there is one (so "a cat" is
  "A"), else stays the text; 1 if prediction and answer come out equal;
- open-ended: 0 for an empty prediction, else ROUGE-L F of the prediction cut at 512 characters against the
  answer: case-sensitive, sentences split at ".", and counted over *distinct* words (the package's default
  `exclusive=True`), with the union of the per-sentence LCS words; where the package raises (a text that is
  only periods) the score is 0;
- a split's overall score is the mean of its categories' means (a category's mean is over its samples); a
  sub-task in no category is reported under "unknown" and counted in no category.
"""

import json
import os
import re

from .data import DataError

# the 18 categories and their sub-tasks (lmms-eval's overall_score), in its order
CATEGORIES = {
    "Spot-the-Diff": ("Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"),
    "Image-Edit": ("IEdit", "HQ-Edit", "MagicBrush"),
    "Visual-Story-Telling": ("AESOP", "FlintstonesSV", "PororoSV", "VIST"),
    "Visual-Cloze": ("COMICS_Dialogue", "RecipeQA_VisualCloze"),
    "Text-Rich-VQA": ("WebQA", "TQA", "OCR-VQA", "DocVQA"),
    "Multi-Image-VQA": ("MIT-States_StateCoherence", "MIT-States_PropertyCoherence", "VISION",
                        "RecipeQA_ImageCoherence"),
    "Puzzle": ("RAVEN",),
    "NLVR2": ("NLVR2_Mantis",),
    "QBench": ("QBench",),
    **{name: (name,) for name in ("ScanQA", "ALFRED", "nuscenes", "ScanNet_chat", "ScanNet_task", "BLINK",
                                  "MathVerse", "SciVerse", "Mantis")},
}
CATEGORY_OF = {sub: cat for cat, subs in CATEGORIES.items() for sub in subs}
QUESTION_TYPES = ("multi-choice", "open-ended")
SPLITS = ("in_domain", "out_of_domain", "multi_view_in_domain")
# a prediction line's fields (and "pred"; lmms-eval's per-sample logs call it "parsed_pred")
NEEDED = {"split", "sample_id", "sub_task", "question_type", "answer"}
ROUGE_CHARS = 512  # predictions are cut here before ROUGE-L (lmms-eval's oe_rogue)

# ------------------------------------------------------------------------------------ multiple choice
OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# the VQA evaluation's patterns, verbatim: the first group is a typo'd look-behind that is a look-ahead for
# "<=digit", always true before a ".", so this drops every period not followed by a digit
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _punctuation(text):
    out = text
    for p in PUNCT:
        # a mark next to a space (or any "1,000"-style number in the text) is deleted, else it becomes a space
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # lmms-eval passes re.UNICODE (32) where Pattern.sub takes `count`: at most 32 periods are dropped
    return PERIOD_STRIP.sub("", out, count=32)


def mcq_normalize(text):
    """An answer or prediction → the string mcq_acc compares (an upper-case letter A-E, or lower-case text)."""
    m = OPTION.match(text.strip())
    if m:
        return m.group(1).upper()
    t = text.replace("\n", " ").replace("\t", " ").strip()
    t = _punctuation(t)
    t = t.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = LETTER.search(t)
    return m.group(1).upper() if m else t


def mcq_acc(pred, answer):
    """1 if prediction and answer normalise to the same string, else 0 (lmms-eval's mcq_acc)."""
    return int(mcq_normalize(pred) == mcq_normalize(answer))


# ------------------------------------------------------------------------------------ ROUGE-L
def _sentences(text):
    # the package: split at ".", drop empty pieces, collapse whitespace (a piece of spaces becomes "")
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def _lcs_words(x, y):
    """The words of one longest common subsequence of x and y, traced back as the package does (ties go
    to the y side), since which LCS is picked changes the union below."""
    n, m = len(x), len(y)
    t = [[0] * (m + 1) for _ in range(n + 1)]  # (n+1, m+1) LCS lengths
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    out, i, j = [], n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l(pred, answer):
    """ROUGE-L F of a prediction against an answer, as lmms-eval's oe_rogue computes it (module docstring)."""
    if pred == "":
        return 0.0
    hyp, ref = _sentences(pred[:ROUGE_CHARS]), _sentences(answer)
    if not hyp or not ref:
        return 0.0  # the package raises "Collections must contain at least 1 sentence."
    n = len({w for s in hyp for w in s.split(" ")})  # distinct words of the prediction
    m = len({w for s in ref for w in s.split(" ")})  # ... and of the answer
    union = set()
    for r in ref:
        for h in hyp:
            union.update(_lcs_words(r.split(" "), h.split(" ")))
    p, r = len(union) / n, len(union) / m
    return 2.0 * ((p * r) / (p + r + 1e-8))


def score(pred, answer, question_type):
    """One sample's score: mcq_acc for "multi-choice", ROUGE-L F for "open-ended"."""
    if question_type == "multi-choice":
        return float(mcq_acc(pred, answer))
    if question_type == "open-ended":
        return rouge_l(pred, answer)
    raise ValueError(f"unknown question_type {question_type!r} (expected one of {', '.join(QUESTION_TYPES)})")


# ------------------------------------------------------------------------------------ tables
def bench_table(rows):
    """[(sub_task, score)] → {"n", "overall", "categories": {cat: {"n", "score"}}, "unknown": {sub: {"n",
    "score"}}}: categories in CATEGORIES order (those present), overall = mean of their means (None if none)."""
    sums = {}
    for sub, s in rows:
        key = CATEGORY_OF.get(sub, (None, sub))  # unknown sub-tasks keyed apart from categories
        n, tot = sums.get(key, (0, 0.0))
        sums[key] = (n + 1, tot + s)
    cats = {c: {"n": sums[c][0], "score": sums[c][1] / sums[c][0]} for c in CATEGORIES if c in sums}
    unknown = {k[1]: {"n": n, "score": tot / n} for k, (n, tot) in sorted(sums.items(), key=lambda kv: str(kv[0]))
               if isinstance(k, tuple)}
    overall = sum(c["score"] for c in cats.values()) / len(cats) if cats else None
    return {"n": len(rows), "overall": overall, "categories": cats, "unknown": unknown}


def format_bench_table(split, table, aspect=None):
    """The printable table of one split: category, n, score; then unknown sub-tasks; then the overall line."""
    head = split + (f"  (images: --aspect {aspect})" if aspect else "")
    lines = [head, f"  {'category':28s} {'n':>6s} {'score':>7s}"]
    lines += [f"  {c:28s} {v['n']:6d} {v['score']:7.3f}" for c, v in table["categories"].items()]
    for sub, v in table["unknown"].items():
        lines.append(f"  {'(unknown) ' + sub:28s} {v['n']:6d} {v['score']:7.3f}   not in any category")
    overall = "-" if table["overall"] is None else f"{table['overall']:7.3f}"
    lines.append(f"  {'overall (mean of categories)':28s} {table['n']:6d} {overall:>7s}")
    return "\n".join(lines)


def summary_line(split, table):
    """The JSON-able summary of one split: {"split", "overall", "categories": {name: score}, "n", "unknown"}."""
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"split": split, "overall": r(table["overall"]),
            "categories": {c: r(v["score"]) for c, v in table["categories"].items()}, "n": table["n"],
            "unknown": {s: {"n": v["n"], "score": r(v["score"])} for s, v in table["unknown"].items()}}


# ------------------------------------------------------------------------------------ predictions files
def read_predictions(path, repair=False):
    """The prediction lines of a file. A torn last line (no newline, or not JSON) is dropped, and with
    repair=True cut off the file; a bad line before the last is a DataError naming it."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a directory, not a predictions file")
    with open(path, "rb") as f:
        raw = f.read()
    lines, out, good = raw.split(b"\n"), [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        last = i == len(lines) - 1 or all(not x.strip() for x in lines[i + 1:])
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            missing = NEEDED - set(rec)
            if missing or not ({"pred", "parsed_pred"} & set(rec)):
                raise ValueError(f"no {', '.join(sorted(missing) or ['pred'])} field")
        except ValueError as e:
            if last:
                break  # torn by an interrupted write: answered again
            raise DataError(f"{path}: line {i + 1}: not a prediction line ({e})") from None
        if last and not raw.endswith(b"\n"):
            break
        out.append(rec)
        good += len(line) + 1
    if repair and good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return out


def tables(preds):
    """{split: [prediction line]} → {split: bench_table}; scores are recomputed from each
    line's pred and answer (so a file from an older scorer, or edited by hand, is scored the same way)."""
    return {split: bench_table([(r["sub_task"], score(r.get("pred", r.get("parsed_pred")) or "", r["answer"] or "",
                                                      r["question_type"])) for r in rows])
            for split, rows in preds.items()}


def group(lines):
    """Prediction lines (a --rescore file) → {split: lines}, splits in SPLITS order then any others."""
    out = {}
    for r in lines:
        out.setdefault(r["split"], []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (SPLITS.index(kv[0]) if kv[0] in SPLITS else 99, kv[0])))
