"""Score a model: accuracy on fresh synthetic questions, or Interleave-Bench as the paper and lmms-eval score it.

    python eval.py --model weights/minterleave-tiny --domain all --n 200 --seed 1
    python eval.py --model DIR --bench LLaVA-NeXT-Interleave-Bench --split all --out preds.jsonl
    python eval.py --rescore preds.jsonl
    python eval.py --model DIR --data multi_image_in_domain.json --image-root eval_images

Synthetic (default): the i-th question of a domain has seed tasks.sample_seed(--seed, i) = seed * 1e7 + i,
below 1e9, the first training seed (minterleave/data.py), so a trained model never saw them.
--data: Interleave-Bench JSON (records with "image", the question in the first human turn, the answer in
the first gpt turn, metadata.question_type "multi-choice" or "open-ended"). How answers are judged
(as --bench: mcq_acc, ROUGE-L) and how the tables average is minterleave/scoring.py's docstring.

--bench: the benchmark's parquet snapshot folder (or its JSON release), read, prompted and scored as
minterleave/interleave_bench.py and minterleave/bench_scoring.py say (lmms-eval's rules: mcq_acc, ROUGE-L, a
split's score the mean of its category means). Prints a table per split (category, n, score; sub-tasks in no
category apart), then ONE JSON line per split {"split", "overall", "categories", "n", "unknown"}. --out FILE
keeps one line per answered sample and resumes from it; --rescore FILE prints the tables of such a file alone.
Progress (done/total, samples/s, ETA) goes to stderr.

Printed otherwise: a table per question type (synthetic) or per dataset and question type (--data) with the chance
level, then ONE JSON line {"domain", "accuracy", "chance", "n"} (--domain all adds "per_domain"; --data
adds "macro", the mean over the table's rows). Bad input ends with one line on stderr (`eval.py: error: ...`,
exit status 1; 2 for a bad flag); --debug shows the traceback instead.
"""

import argparse
import json
import os
import sys
import time

import torch

import minterleave as mi
from minterleave import bench_scoring, cli, data, interleave_bench, scoring, tasks

BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "minterleave-tiny")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; an option whose default is None says in its own help what None means."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    p.add_argument("--model", default=BUNDLED, help="checkpoint folder or hub id")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT's format) or hub id, merged into the weights (default: none)")
    p.add_argument("--domain", default="all", choices=(*tasks.DOMAINS, *tasks.EXTRA, "all"), help="synthetic domain")
    p.add_argument("--n", type=cli.positive_int, default=200, help="questions per domain")
    p.add_argument("--seed", type=int, default=0, help=f"evaluation seed, 0..{data.EVAL_SEED_LIMIT - 1}")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="Interleave-Bench-format JSON to score (default: none, synthetic questions)")
    p.add_argument("--image-root", default=None, metavar="DIR", help="--data: image folder (default: the JSON's)")
    p.add_argument("--bench", default=None, metavar="PATH",
                   help="Interleave-Bench: the hub snapshot folder (parquet) or the JSON release (default: none)")
    p.add_argument("--split", default="all", choices=(*interleave_bench.SPLITS, "all"), help="--bench: which split")
    p.add_argument("--aspect", default="pad", choices=interleave_bench.ASPECTS,
                   help="--bench: pad each image to a square of the mean colour first (the original evaluation), "
                        "or resize it as it is (the llava-hf processor)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="--bench: write one JSON line per sample; rerun with it to resume (default: none)")
    p.add_argument("--rescore", default=None, metavar="FILE",
                   help="print the --bench tables of a predictions file, no model needed (default: none)")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="--data: score the first N records only; --bench: the first N of each split (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="new tokens per answer (default: 8 for synthetic questions, 16 with --data or --bench, "
                        "as lmms-eval)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute dtype")
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help="weight-only int8 (per row) or int4 (--group-size) decoder (default: none)")
    p.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128), help="--quantize int4: columns per scale")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--attn", default=None, choices=mi.attention.BACKENDS,
                   help="attention backend (default: the library's choice for the device)")
    p.add_argument("--verbose", action="store_true", help="print every wrong synthetic answer")
    p.add_argument("--no-check-finite", action="store_true", help="skip the NaN/Inf check of the weights (faster load)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = p.parse_args(argv)
    if not 0 <= args.seed < data.EVAL_SEED_LIMIT:
        p.error(f"--seed must be in [0, {data.EVAL_SEED_LIMIT}): larger seeds reach the training range")
    if args.attn:
        mi.set_backend(args.attn)
    if args.rescore:
        return rescore(args.rescore)
    if args.data:
        data.load_records(args.data)  # a missing or malformed file is found before the model is loaded
    if args.bench:  # the data and the --out file are checked before the model is loaded
        sources = interleave_bench.find_splits(args.bench, args.split)
        for source in sources.values():
            interleave_bench.count(source)
        if args.out:
            check_out(args.out)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = mi.Model.from_pretrained(args.model, device=device, dtype=args.dtype,
                                     check_finite=not args.no_check_finite, adapter=args.adapter)
    if args.adapter:  # one matmul per projection while decoding
        from minterleave.lora import merge_lora
        merge_lora(model)
    if args.quantize:  # after any merge: the adapter's product is quantized with its base
        from minterleave.quantize import quantize
        quantize(model, args.quantize, args.group_size if args.quantize == "int4" else None)
    proc = mi.Processor.from_pretrained(args.model)
    t0 = time.time()
    if args.bench:
        preds = interleave_bench.evaluate(model, proc, sources, args.batch_size, args.limit, args.out, args.aspect,
                                          args.max_new_tokens or 16)
        print_tables(preds, args.aspect)
        print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
        return 0
    if args.data:
        res = scoring.evaluate_records(model, proc, args.data, args.image_root, args.batch_size,
                                       args.max_new_tokens or 16, args.limit)
        print(scoring.format_table(res, "per_group"))
        line = {k: res[k] for k in ("domain", "accuracy", "macro", "chance", "n")}
    else:
        domains = tuple(tasks.DOMAINS) if args.domain == "all" else (args.domain,)
        results = []
        for d in domains:
            res = scoring.evaluate_synthetic(model, proc, d, args.n, args.seed, args.batch_size,
                                             args.max_new_tokens or 8, verbose=args.verbose)
            print(scoring.format_table(res, "per_qtype"))
            results.append(res)
        if len(results) == 1:
            line = {k: results[0][k] for k in ("domain", "accuracy", "chance", "n")}
        else:
            line = scoring.combine(results)
            print(f"{'all':24s} {line['n']:6d} {line['accuracy']:9.3f} {line['chance']:7.3f}")
    print(f"({time.time() - t0:.1f} s)", file=sys.stderr)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in line.items()}))
    return 0


def check_out(path):
    """--out must be a file we can append to (and, if it exists, a predictions file): refused up front."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path}: is a directory, not a predictions file")
    try:
        open(path, "a").close()
    except OSError as e:
        raise type(e)(f"--out {path}: cannot write there ({(e.strerror or str(e)).lower()})") from None
    bench_scoring.read_predictions(path)


def print_tables(preds, aspect=None):
    """A table per split, then one JSON line per split."""
    tables = bench_scoring.tables(preds)
    for split, table in tables.items():
        print(bench_scoring.format_bench_table(split, table, aspect))
    for split, table in tables.items():
        print(json.dumps(bench_scoring.summary_line(split, table)))


def rescore(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--rescore {path}: no such predictions file")
    lines = bench_scoring.read_predictions(path)
    if not lines:
        raise data.DataError(f"--rescore {path}: no prediction lines")
    aspects = sorted({str(r.get("aspect")) for r in lines})
    print_tables(bench_scoring.group(lines), "/".join(aspects))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
