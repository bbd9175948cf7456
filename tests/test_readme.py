"""The README's claims are checked here so they cannot drift from the code."""

import glob
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def commands(prefix):
    """Indented command lines of the README that start with `prefix`."""
    return [line.strip() for line in README.splitlines() if line.startswith("    " + prefix)]


def test_quick_start_is_two_commands_and_ci_runs_both():
    quick = README.split("## Quick start")[1].split("##")[0]
    cmds = [line.strip() for line in quick.splitlines() if line.startswith("    ")]
    assert len(cmds) == 2
    run, test = ([s.strip() for s in c.split("&&")] for c in cmds)
    assert run[-1] == "python sample.py" and test[-1] == "python -m pytest -q"
    # the same set-up, the test one with the test extra: torch first, then this project, editable
    assert run[:3] == test[:3] and run[2] == "pip install torch==2.13.0"
    assert run[3] == "pip install -e ." and test[3] == 'pip install -e ".[test]"'
    # CI runs every step of the test command in order, and the run command's sample.py after the install
    ci = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run")) if line.strip()
          and not line.startswith("#")]
    positions = [ci.index(step) if step in ci else -1 for step in test]
    assert -1 not in positions and positions == sorted(positions), (test, ci)
    assert positions[3] < ci.index(run[-1]), (run, ci)


def test_layout_table_lists_every_module():
    modules = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "minterleave", "*.py"))
                     + glob.glob(os.path.join(ROOT, "kernels", "*.py")))
    table = README.split("## Layout")[1].split("##")[0]
    missing = [m for m in modules if os.path.basename(m) not in table and not m.endswith("__init__.py")
               and not m.startswith("kernels/bench")]
    assert not missing, f"README layout table lacks {missing}"


def test_sample_examples_use_real_flags():
    import sample
    examples = commands("python sample.py")
    assert len(examples) >= 5
    for line in examples:
        argv = shlex.split(line.split("#")[0])[2:]
        args = sample.parse_args(argv)  # argparse exits on an unknown flag
        assert args is not None


def test_token_cost_table_matches_the_processor_arithmetic():
    per_image = (384 // 14) ** 2
    assert f"| {per_image} (27 × 27 patches)" in README
    assert f"{16 * per_image:,}" in README
    fit = 32768 // per_image
    assert f"{fit} images or frames ({fit * per_image:,} tokens), leaving {32768 - fit * per_image}" in README
    assert re.search(rf"{3 * per_image:,} to {5 * per_image:,}", README)


def test_gpu_table_matches_the_recorded_run():
    """The README's kernel table is the bf16 benchmark recorded in kernels/gpu_runs (no hand-copied drift)."""
    run = os.path.join(ROOT, "kernels", "gpu_runs", "2026-11-30-tuned")
    with open(os.path.join(run, "bench_bf16.md")) as f:
        bench = [line.split("|")[1:-1] for line in f if re.match(r"\| [^|]+\| \d+x", line)]
    section = README.split("## Attention backends and the Triton kernel")[1].split("\n## ")[0]
    table = [line.split("|")[1:-1] for line in section.splitlines() if re.match(r"\| [^|]+\| \d+x", line)]
    assert len(bench) == len(table) == 6
    for b, t in zip(bench, table):
        assert b[1].strip() == t[1].strip() and b[3].strip() == t[3].strip(), (b, t)  # shape, pass
        assert [float(x) for x in b[4:6]] == [float(x) for x in t[4:6]], (b, t)  # ms, SDPA ms
        assert [round(float(x)) for x in b[6:8]] == [int(x) for x in t[6:8]], (b, t)  # TFLOP/s
        assert f"{float(b[8]):.2f}" == t[8].strip(), (b, t)  # speed ratio
    with open(os.path.join(run, "gpu_tests.log")) as f:
        passed = f.read().split(" passed")[0].split()[-1]
    assert f"the {passed} GPU tests pass" in section
    # tutorial 04 repeats the table (ours ms, SDPA ms, ours TFLOP/s, ratio)
    import json
    with open(os.path.join(ROOT, "tutorials", "04_flash_attention.ipynb"), encoding="utf-8") as f:
        text = "".join("".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "markdown")
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| [^|]+\| \d+x", line)]
    assert len(rows) == 6
    for b, t in zip(bench, rows):
        assert [float(x) for x in t[4:6]] == [float(x) for x in b[4:6]], (b, t)
        assert int(t[6]) == round(float(b[6])) and t[7].strip() == f"{float(b[8]):.2f}", (b, t)
