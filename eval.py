"""Score a model: accuracy on fresh synthetic questions, or on Interleave-Bench-format JSON.

    python eval.py --model weights/minterleave-tiny --domain all --n 200 --seed 1
    python eval.py --model DIR --data multi_image_in_domain.json --image-root eval_images

Synthetic (default): the i-th question of a domain has seed tasks.sample_seed(--seed, i) = seed * 1e7 + i,
below 1e9, the first training seed (minterleave/data.py), so a trained model never saw them. Greedy
generation, then exact match of the normalised answer (lower case, punctuation and a leading "the/a/an"
dropped). Printed: a table per question type and overall, with the chance level (a blind guess among the
question's answers), then ONE JSON line {"domain", "accuracy", "chance", "n"} (for --domain all also
"per_domain").

--data: Interleave-Bench JSON (LLaVA-NeXT docs/LLaVA-NeXT-Interleave.md; records with "image", the question
in the first human turn, the answer in the first gpt turn, metadata.question_type "multi-choice" or
"open-ended"). Multiple choice: exact match after normalisation (an option letter answer also accepts
"(B)", "B.", "B) text", "Answer: B"); open-ended: ROUGE-L F1 on lower-cased whitespace tokens, prediction
cut to 512 characters (as lmms-eval). Generation: greedy, --max-new-tokens (16 as lmms-eval). The
chance level is 1/number-of-options where the options can be read from the question, else null.
"""

import argparse
import json
import os
import re
import string
import sys
import time
from collections import defaultdict

import torch

import minterleave as mi
from minterleave import data, tasks

ARTICLES = re.compile(r"^(the|a|an)\s+")


def normalize(text):
    t = text.strip().lower()
    t = t.split("\n")[0].strip() if t else t
    t = t.strip(string.punctuation + " ")
    t = ARTICLES.sub("", t)
    return " ".join(t.split())


def option_letter(text):
    """'B', '(B)', 'B.', 'B) foo', 'Answer: B' → 'b'; None if the text does not start with an option."""
    t = text.strip()
    t = re.sub(r"^(the\s+)?(answer|option)\s*(is)?\s*:?\s*", "", t, flags=re.I)
    m = re.match(r"^\(?([A-Ha-h])\)?(?:[.):,\s]|$)", t)
    return m.group(1).lower() if m else None


def multi_choice_correct(pred, answer):
    a = normalize(answer)
    if len(a) == 1 and a.isalpha():
        return option_letter(pred) == a
    return normalize(pred) == a


def rouge_l(pred, ref):
    """ROUGE-L F1 of two strings (longest common subsequence of lower-cased whitespace tokens)."""
    p, r = pred[:512].lower().split(), ref.lower().split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for x in p:
        cur = [0] * (len(r) + 1)
        for j, y in enumerate(r):
            cur[j + 1] = prev[j] + 1 if x == y else max(prev[j + 1], cur[j])
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def count_options(question):
    letters = re.findall(r"(?:^|\n|\s)\(?([A-H])[.)]\s", question)
    return len(set(letters)) if len(set(letters)) >= 2 else None


@torch.no_grad()
def answer_batch(model, proc, prompts, images, multi_patch=False, max_new_tokens=8):
    """Greedy answers (decoded strings) for a batch of prompts; images: flat list in prompt order."""
    inputs = proc(prompts, images=images, multi_patch=multi_patch)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=proc.eos_token_ids,
                         pad_token_id=proc.pad_token_id)
    texts = []
    for row in out.tolist():
        cut = next((i for i, t in enumerate(row) if t in proc.eos_token_ids), len(row))
        texts.append(proc.decode(row[:cut]))
    return texts


def evaluate_synthetic(model, proc, domain, n, seed=0, batch_size=16, max_new_tokens=8, image_size=None,
                       verbose=False):
    """{"domain", "accuracy", "chance", "n", "per_qtype": {qtype: {"n", "correct", "chance"}}}."""
    if not 0 <= seed < data.EVAL_SEED_LIMIT:
        raise ValueError(f"evaluation seeds must be in [0, {data.EVAL_SEED_LIMIT}) to stay clear of training seeds")
    size = image_size or proc.image_size
    per = defaultdict(lambda: {"n": 0, "correct": 0, "chance": 0.0})
    correct, chance = 0, 0.0
    was_training = model.training
    model.eval()
    for start in range(0, n, batch_size):
        smps = [tasks.make_sample(domain, tasks.sample_seed(seed, i), size)
                for i in range(start, min(n, start + batch_size))]
        preds = answer_batch(model, proc, [data.prompt_for(s) for s in smps],
                             [im for s in smps for im in s.images], domain == "multi_patch", max_new_tokens)
        for s, p in zip(smps, preds):
            ok = normalize(p) == normalize(s.answer)
            q = per[s.qtype]
            q["n"] += 1
            q["correct"] += ok
            q["chance"] = s.chance
            correct += ok
            chance += s.chance
            if verbose and not ok:
                print(f"  miss {s.domain}/{s.qtype}: {s.question!r} -> {p!r} (answer {s.answer!r})")
    model.train(was_training)
    return {"domain": domain, "accuracy": correct / max(n, 1), "chance": chance / max(n, 1), "n": n,
            "per_qtype": dict(per)}


def evaluate_records(model, proc, path, image_root, batch_size=8, max_new_tokens=16, limit=None):
    recs = data.load_records(path)[:limit]
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    per = defaultdict(lambda: {"n": 0, "score": 0.0, "chance": [], "type": ""})
    total, chances, n = 0.0, [], 0
    items = []
    for i, r in enumerate(recs):
        prompt, files, answer, mp = data.record_question(r, root, i, proc.image_token)
        meta = r.get("metadata") or {}
        qtype = meta.get("question_type") or r.get("question_type") or "multi-choice"
        group = meta.get("dataset") or r.get("sub_task") or "all"
        items.append((prompt, files, answer, mp, qtype, group))
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # rows of one generate call must agree on multi_patch; split where they do not
        for mp in (False, True):
            sub = [it for it in chunk if it[3] == mp]
            if not sub:
                continue
            preds = answer_batch(model, proc, [it[0] for it in sub], [f for it in sub for f in it[1]], mp,
                                 max_new_tokens)
            for (prompt, _, answer, _, qtype, group), p in zip(sub, preds):
                open_ended = "open" in qtype.lower()
                s = rouge_l(p, answer) if open_ended else float(multi_choice_correct(p, answer))
                k = count_options(prompt) if not open_ended else None
                g = per[(group, "open-ended" if open_ended else "multi-choice")]
                g["n"] += 1
                g["score"] += s
                if k:
                    g["chance"].append(1 / k)
                    chances.append(1 / k)
                total += s
                n += 1
    chance = sum(chances) / len(chances) if chances and len(chances) == n else None
    return {"domain": os.path.basename(path), "accuracy": total / max(n, 1), "chance": chance, "n": n,
            "per_group": {f"{g}/{t}": {"n": v["n"], "correct": v["score"],
                                       "chance": (sum(v["chance"]) / len(v["chance"]) if v["chance"] else None)}
                          for (g, t), v in per.items()}}


def print_table(res, key):
    rows = res[key]
    print(f"{res['domain']}")
    print(f"  {'':22s} {'n':>6s} {'accuracy':>9s} {'chance':>7s}")
    for name, v in sorted(rows.items()):
        ch = "-" if v["chance"] is None else f"{v['chance']:.3f}"
        print(f"  {name:22s} {v['n']:6d} {v['correct'] / max(v['n'], 1):9.3f} {ch:>7s}")
    ch = "-" if res["chance"] is None else f"{res['chance']:.3f}"
    print(f"  {'overall':22s} {res['n']:6d} {res['accuracy']:9.3f} {ch:>7s}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "weights", "minterleave-tiny"), help="checkpoint folder")
    p.add_argument("--domain", default="all", choices=tasks.DOMAINS + ("all",))
    p.add_argument("--n", type=int, default=200, help="questions per domain")
    p.add_argument("--seed", type=int, default=0, help=f"evaluation seed, 0..{data.EVAL_SEED_LIMIT - 1}")
    p.add_argument("--data", default=None, metavar="FILE", help="Interleave-Bench-format JSON instead")
    p.add_argument("--image-root", default=None, metavar="DIR")
    p.add_argument("--limit", type=int, default=None, help="--data: score the first N records only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 8 (synthetic), 16 (--data)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default=None)
    p.add_argument("--attn", default=None, choices=mi.attention.BACKENDS)
    p.add_argument("--verbose", action="store_true", help="print every wrong answer")
    args = p.parse_args(argv)
    if not 0 <= args.seed < data.EVAL_SEED_LIMIT:
        p.error(f"--seed must be in [0, {data.EVAL_SEED_LIMIT}): larger seeds reach the training range")
    if args.attn:
        mi.set_backend(args.attn)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = mi.Model.from_pretrained(args.model, device=device, dtype=args.dtype)
    proc = mi.Processor.from_pretrained(args.model)
    t0 = time.time()
    if args.data:
        res = evaluate_records(model, proc, args.data, args.image_root, args.batch_size,
                               args.max_new_tokens or 16, args.limit)
        print_table(res, "per_group")
        line = {k: res[k] for k in ("domain", "accuracy", "chance", "n")}
    else:
        domains = tasks.DOMAINS if args.domain == "all" else (args.domain,)
        results = []
        for d in domains:
            res = evaluate_synthetic(model, proc, d, args.n, args.seed, args.batch_size,
                                     args.max_new_tokens or 8, verbose=args.verbose)
            print_table(res, "per_qtype")
            results.append(res)
        if len(results) == 1:
            line = {k: results[0][k] for k in ("domain", "accuracy", "chance", "n")}
        else:
            n = sum(r["n"] for r in results)
            line = {"domain": "all", "accuracy": sum(r["accuracy"] * r["n"] for r in results) / n,
                    "chance": sum(r["chance"] * r["n"] for r in results) / n, "n": n,
                    "per_domain": {r["domain"]: {"accuracy": r["accuracy"], "chance": r["chance"], "n": r["n"]}
                                   for r in results}}
            print(f"{'all':24s} {n:6d} {line['accuracy']:9.3f} {line['chance']:7.3f}")
    print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
