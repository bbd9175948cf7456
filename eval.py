"""Score a model: accuracy on fresh synthetic questions, or on Interleave-Bench-format JSON.

    python eval.py --model weights/minterleave-tiny --domain all --n 200 --seed 1
    python eval.py --model DIR --data multi_image_in_domain.json --image-root eval_images

Synthetic (default): the i-th question of a domain has seed tasks.sample_seed(--seed, i) = seed * 1e7 + i,
below 1e9, the first training seed (minterleave/data.py), so a trained model never saw them.
--data: Interleave-Bench JSON (records with "image", the question in the first human turn, the answer in
the first gpt turn, metadata.question_type "multi-choice" or "open-ended"). How answers are judged
(exact match, option letters, ROUGE-L) and how the tables average is minterleave/scoring.py's docstring.

Printed: a table per question type (synthetic) or per dataset and question type (--data) with the chance
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
from minterleave import cli, data, scoring, tasks

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
    p.add_argument("--domain", default="all", choices=(*tasks.DOMAINS, "all"), help="synthetic domain")
    p.add_argument("--n", type=cli.positive_int, default=200, help="questions per domain")
    p.add_argument("--seed", type=int, default=0, help=f"evaluation seed, 0..{data.EVAL_SEED_LIMIT - 1}")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="Interleave-Bench-format JSON to score (default: none, synthetic questions)")
    p.add_argument("--image-root", default=None, metavar="DIR", help="--data: image folder (default: the JSON's)")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="--data: score the first N records only (default: all)")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="questions per generate call")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=None,
                   help="new tokens per answer (default: 8 for synthetic questions, 16 with --data, as lmms-eval)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute dtype")
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
    if args.data:
        data.load_records(args.data)  # a missing or malformed file is found before the model is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = mi.Model.from_pretrained(args.model, device=device, dtype=args.dtype,
                                     check_finite=not args.no_check_finite, adapter=args.adapter)
    if args.adapter:  # one matmul per projection while decoding
        from minterleave.lora import merge_lora
        merge_lora(model)
    proc = mi.Processor.from_pretrained(args.model)
    t0 = time.time()
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


if __name__ == "__main__":
    sys.exit(cli.run(main))
