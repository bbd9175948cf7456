"""The documentation stands alone, and the numbers it states are the ones the code and the logs give.

1. No text file of the repository refers to something that is not in it: notes kept outside the
   repository, experiment branches, folders that do not exist (FORBIDDEN).
2. Every relative link of a markdown file, or of a notebook's markdown cells, resolves to a file or folder
   of the repository, and an #anchor into a markdown file to one of its headings.
3. The numbers of README.md, weights/README.md and docs/ are measured here: the bundled model's tables
   (by evaluating it), its training figures (from its log and files), the parity bounds (against the
   tests that enforce them), token counts and tensor counts (from the code).
"""

import json
import math
import os
import re
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")

# what must never be referred to, and why (written so that this file does not match itself)
FORBIDDEN = {
    r"\.\./shared\b": "a folder outside the repository",
    r"\bDESIGN\.md\b": "a design note that is not in the repository",
    r"\bcheckpoints\.md\b": "a reference note that is not in the repository (docs/checkpoint-layouts.md says it)",
    r"(?<![\w-])reference[/]": "a reference folder that is not in the repository",
    r"\bexperiment[/][\w.-]+": "an experiment branch",
    r"\bexperiments[/]": "an experiments folder that is not in the repository",
    r"\b(?:on|from|in) the branch\b": "a branch instead of the repository's own files",
}
TEXT_EXTENSIONS = (".py", ".md", ".ipynb", ".sh", ".toml", ".txt", ".ini", ".cfg", ".json", ".jsonl", ".yml",
                   ".yaml", ".jinja", ".gitignore", "run")


def repo_files():
    """Paths (relative to ROOT) of the files a commit holds: tracked plus new, not ignored ones."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if os.path.isfile(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", "out", "cache"}
        files = []
        for top, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(top, n), ROOT) for n in names]
    return sorted(f.replace(os.sep, "/") for f in files)


FILES = repo_files()
FOLDERS = {"/".join(f.split("/")[:i]) for f in FILES for i in range(1, f.count("/") + 1)}


def read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def text_files():
    for rel in FILES:
        if not rel.endswith(TEXT_EXTENSIONS) or os.path.getsize(os.path.join(ROOT, rel)) > 5_000_000:
            continue
        try:
            yield rel, read(rel)
        except UnicodeDecodeError:
            continue


def test_the_file_list_is_the_repository():
    assert "README.md" in FILES and "tests/test_docs.py" in FILES and "docs" in FOLDERS


def test_nothing_refers_to_files_folders_or_branches_outside_the_repository():
    hits = []
    for rel, text in text_files():
        for pattern, why in FORBIDDEN.items():
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{rel}:{line}: {m.group(0)!r} ({why})")
    assert not hits, "references to what is not in the repository:\n" + "\n".join(hits)


# ------------------------------------------------------------------------------------------ links
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)|(?:href|src)=\"([^\"]+)\"",
                  re.M)


def markdown_texts():
    """(file, markdown text) for every markdown file and every notebook's markdown cells."""
    for rel in FILES:
        if rel.endswith(".md"):
            yield rel, read(rel)
        elif rel.endswith(".ipynb"):
            cells = json.loads(read(rel))["cells"]
            yield rel, "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def strip_code(text):
    """Markdown without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(rel):
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", strip_code_blocks(read(rel)), re.M)}


def strip_code_blocks(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_every_relative_link_resolves_to_a_file_of_the_repository():
    bad = []
    for rel, text in markdown_texts():
        for m in LINK.finditer(strip_code(text)):
            target = next(g for g in m.groups() if g)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            if not path:  # an anchor in the same file
                dest = rel
            else:
                dest = os.path.normpath(os.path.join(os.path.dirname(rel), path)).replace(os.sep, "/")
                if dest.startswith("../") or dest == ".." or os.path.isabs(path):
                    bad.append(f"{rel}: {target} leaves the repository")
                    continue
                if dest not in FILES and dest.rstrip("/") not in FOLDERS:
                    bad.append(f"{rel}: {target} -> {dest} is not in the repository")
                    continue
            if anchor and dest.endswith(".md") and anchor not in anchors(dest):
                bad.append(f"{rel}: {target}: {dest} has no heading with the anchor #{anchor}")
    assert not bad, "broken links:\n" + "\n".join(bad)


# --------------------------------------------------------------------- the bundled model's numbers
needs_bundled = pytest.mark.skipif(not os.path.isfile(os.path.join(BUNDLED, "model.safetensors")),
                                   reason="weights/minterleave-tiny is not there")
DOMAIN_NAMES = {"multi-image": "multi_image", "video": "video", "3D": "3d", "multi-patch": "multi_patch"}
QTYPE_NAMES = {"spot the difference": "spot_diff", "which image": "which_image", "count": "count",
               "appear/disappear": "appear", "direction": "direction", "order": "order",
               "left/right": "left_right", "nearest": "nearest", "mark colour": "mark_colour",
               "quadrant": "quadrant"}
EVAL_COMMAND = re.compile(r"python eval\.py --model weights/minterleave-tiny --domain all --n (\d+) --seed (\d+)")


def accuracy_table(text):
    """{domain: (accuracy, chance, {qtype: accuracy} or None)} from a README's accuracy table."""
    rows = re.findall(r"^\| (multi-image|video|3D|multi-patch) \| ([\d.]+) \| ([\d.]+) \|(?: ([^|\n]+) \|)?$", text,
                      re.M)
    table = {}
    for name, acc, chance, per in rows:
        qtypes = None
        if per:
            qtypes = {QTYPE_NAMES[q]: float(v) for q, v in (item.strip().rsplit(" ", 1) for item in per.split(","))}
        table[DOMAIN_NAMES[name]] = (float(acc), float(chance), qtypes)
    return table


def test_readme_and_weights_readme_state_the_same_accuracy_table():
    main, weights = read("README.md"), read("weights/README.md")
    flat = lambda text: " ".join(text.split())  # noqa: E731  (commands may wrap)
    assert EVAL_COMMAND.search(flat(main)).groups() == EVAL_COMMAND.search(flat(weights)).groups()
    a, b = accuracy_table(main), accuracy_table(weights)
    assert set(a) == set(b) == set(DOMAIN_NAMES.values()), (a, b)
    assert {d: v[:2] for d, v in a.items()} == {d: v[:2] for d, v in b.items()}
    assert all(v[2] for v in b.values()), "weights/README.md's table lists the question types"


@pytest.mark.slow  # (the default run checks the same numbers through eval.py's command line: tests/test_eval.py)
@needs_bundled
def test_weights_readme_table_is_what_eval_measures():
    """Every number of the table, the question types' too, is what its eval command prints, exactly."""
    import minterleave as mi
    from minterleave import scoring
    text = read("weights/README.md")
    n, seed = map(int, EVAL_COMMAND.search(" ".join(text.split())).groups())
    model, proc = mi.Model.from_pretrained(BUNDLED), mi.Processor.from_pretrained(BUNDLED)
    for domain, (acc, chance, qtypes) in accuracy_table(text).items():
        res = scoring.evaluate_synthetic(model, proc, domain, n, seed)
        measured = {q: round(r["correct"] / r["n"], 3) for q, r in res["per_qtype"].items()}
        assert (round(res["accuracy"], 3), round(res["chance"], 3)) == (acc, chance), (domain, res)
        assert measured == qtypes, (domain, measured, qtypes)


def code_blocks(text, lang):
    """The fenced blocks of a markdown text whose info string is `lang`, in order."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)
            if m.group(1) == lang]


@needs_bundled
def test_the_which_image_script_of_the_experiments_page_prints_what_the_page_says():
    page = read("docs/experiments.md")
    script, = code_blocks(page, "python")
    expected = code_blocks(page, "")[0]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == expected, r.stdout
    # the figures the pages quote from it
    which, lookup = re.search(r"which-image: ([\d.]+) on 600 questions; colour lookup ([\d.]+)", expected).groups()
    weights = " ".join(read("weights/README.md").split())
    assert f"on 600 questions the model scores {which} against {lookup} for a colour lookup" in weights
    split = re.findall(r"accuracy ([\d.]+)", expected)
    last_row = re.search(r"^\| 20,000 \| ([\d.]+) \| ([\d.]+) / ([\d.]+) / ([\d.]+) \|", page, re.M).groups()
    assert float(last_row[0]) == round(float(which), 2)
    assert [float(x) for x in last_row[1:]] == [round(float(x), 2) for x in split]


def train_log():
    with open(os.path.join(BUNDLED, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@needs_bundled
def test_the_experiments_table_quotes_the_runs_own_checks():
    """The last column of the step table is the multi-image quick check the run logged."""
    checks = {r["step"]: r["eval"]["multi_image"] for r in train_log() if "eval" in r}
    quoted = re.findall(r"\| ([\d.]+) \(step ([\d,]+)\) \|$", read("docs/experiments.md"), re.M)
    assert len(quoted) >= 4, quoted
    for value, step in quoted:
        assert round(checks[int(step.replace(",", ""))], 2) == float(value), (step, value)


@needs_bundled
def test_the_bundled_runs_figures_come_from_its_log_and_files():
    log = train_log()
    steps = {r["step"]: r for r in log if "loss" in r}
    weights, main, experiments = read("weights/README.md"), read("README.md"), read("docs/experiments.md")
    command = weights.split("    torchrun", 1)[1].split("\n\n")[0]
    max_steps = int(re.search(r"--max-steps (\d+)", command).group(1))
    procs = int(re.search(r"--nproc_per_node (\d+)", command).group(1))
    batch = int(re.search(r"--batch-size (\d+)", command).group(1))
    # the step time on the quiet stretch of the log, and the run time it gives
    a, b = [int(x.replace(",", "")) for x in re.search(r"log's steps ([\d,]+) to ([\d,]+)", weights).groups()]
    per_step = (steps[b]["elapsed_s"] - steps[a]["elapsed_s"]) / (b - a)
    assert f"a step takes {per_step:.3f} s" in weights
    minutes = round(per_step * max_steps / 60)
    assert re.search(rf"about {minutes}\s+minutes", weights) and re.search(rf"about {minutes}\s+minutes", main)
    assert re.search(rf"about {minutes}\s+minutes on two cores", experiments)
    # samples: processes x batch x steps
    assert steps[max_steps]["samples"] == procs * batch * max_steps
    assert f"global batch of {procs * batch}" in weights and f"{procs * batch * max_steps:,} samples" in weights
    # parameters and size
    with open(os.path.join(BUNDLED, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    params = sum(math.prod(t["shape"]) for t in header.values())
    mib = sum(os.path.getsize(os.path.join(BUNDLED, f)) for f in os.listdir(BUNDLED) if f != "train_log.jsonl") / 2 ** 20
    for text in (weights, main):
        assert f"{params / 1e6:.1f}M parameters" in text
        assert f"{mib:.1f} MiB" in text
    # the patch-word loss reaches its floor, ln 2, within 0.02 by the step the page says
    by = int(re.search(r"within 0\.02 of it by step (\d+)", experiments).group(1))
    first = min(s for s, r in steps.items() if r.get("patch_loss", 9) < math.log(2) + 0.02)
    assert first <= by < first + 50, (first, by)


# -------------------------------------------------------------------------------- parity bounds
def test_parity_bounds_in_the_readme_are_the_tests_bounds():
    """README's parity table names, per row, the bound its test asserts: the test file must assert it."""
    main = read("README.md")
    section = main.split("## How parity is proven")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows and rows[0][-1].strip() == "bound in the test", rows[0]
    for cells in rows[1:]:
        bound = cells[-1]
        tests = re.findall(r"`(tests/[\w/]+\.py)`", bound)
        assert tests, f"no test named for {cells[0].strip()!r}"
        source = "".join(read(t) for t in tests)
        for number in re.findall(r"\b\d+(?:\.\d+)?e-\d+\b", bound):
            assert re.search(rf"(?:<=|==|=)\s*{re.escape(number)}\b", source), (cells[0].strip(), number, tests)
        if "equal" in bound:
            assert "==" in source or "torch.equal" in source or "assert_equal" in source, (cells[0], tests)
    # loading memory: the bound quoted is the test's
    fp32, bf16 = re.search(r"\(the bounds are\s+([\d.]+)× and ([\d.]+)×\)", main).groups()
    source = read("tests/test_loading_memory.py")
    assert f'("float32", {fp32})' in source and f'("bfloat16", {bf16})' in source, (fp32, bf16)


# --------------------------------------------------------------------- docs/ against the code
def test_data_flow_token_table_is_the_processors_arithmetic():
    from minterleave.config import tokens_per_image
    import minterleave as mi
    page = read("docs/data-flow.md")
    official = tokens_per_image(384, 14)
    tiny = mi.Processor.from_pretrained(BUNDLED).tokens_per_image
    rows = {r[0].strip(): r[1:] for r in (line.split("|")[1:-1] for line in page.splitlines())
            if len(r) == 4 and r[1].strip()[:1].isdigit()}
    assert rows["one image, one video frame, one 3D view"] == [" 1 ", f" {official} ", f" {tiny} "]
    assert rows["a video at the default 16 frames"] == [" 16 ", f" {16 * official:,} ", f" {16 * tiny:,} "]
    assert rows["a multi-patch image (overview + 2 to 4 tiles)"] == \
        [" 3 to 5 ", f" {3 * official:,} to {5 * official:,} ", f" {3 * tiny} to {5 * tiny} "]
    fit = 32768 // official
    assert f"at most {fit} images or frames fit ({fit * official:,} tokens), leaving {32768 - fit * official}" in \
        " ".join(page.split())


def test_checkpoint_layouts_page_matches_the_loader(tmp_path):
    """The defaults, the official model's tensor count and row blocks, and the lmms-lab tower dimensions."""
    from minterleave.config import KNOWN_VISION_TOWERS, load_config
    from minterleave.weights import tensor_map
    page = " ".join(read("docs/checkpoint-layouts.md").split())

    def config(d):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(d))
        return load_config(str(folder))

    bare = config({"model_type": "llava", "text_config": {"model_type": "qwen2"}, "vision_config": {}})
    t, v = bare.text, bare.vision
    assert f"`text_config.vocab_size`, `hidden_size`, `intermediate_size` | {t.vocab_size}, {t.hidden_size}, " \
           f"{t.intermediate_size} |" in page
    assert f"`text_config.num_hidden_layers`, `num_attention_heads` | {t.num_layers}, {t.num_heads} |" in page
    assert f"`text_config.rope_theta` (or `rope_parameters.rope_theta`) | {t.rope_theta:g} |" in page
    assert f"`text_config.max_position_embeddings` | {t.max_position_embeddings} |" in page
    assert f"`vision_config.hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads` | " \
           f"{v.hidden_size}, {v.intermediate_size}, {v.num_layers}, {v.num_heads} |" in page
    assert f"`vision_config.image_size`, `patch_size`, `num_channels`, `layer_norm_eps` | {v.image_size}, " \
           f"{v.patch_size}, {v.num_channels}, {v.layer_norm_eps:.0e} |".replace("e-0", "e-") in page
    assert f"`image_token_index` (or `image_token_id`) | {bare.image_token_id} |" in page
    assert f"`vision_feature_layer` | {bare.feature_layer} |" in page
    assert f"`vision_feature_select_strategy` | `{bare.feature_select}` |" in page
    assert not t.tie_word_embeddings and "| false | tied if either says true" in page

    official = config({
        "model_type": "llava", "image_token_index": 151646, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
        "text_config": {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816,
                        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                        "rope_theta": 1e6, "vocab_size": 152000, "tie_word_embeddings": True},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}})
    names = tensor_map(official, "llava-hf", official.vision_layers_used)
    assert f"For the 0.5B model that is {len(names)} tensors loaded" in page
    rows = {ck.rsplit(".", 2)[-2]: r for ck, (_, r) in names.items() if ".layers.0." in ck and r and "weight" in ck
            and ck.startswith("language_model")}
    q, k, v_, gate, up = (rows[n] for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    assert f"q, k, v in `qkv_proj` rows `[{q[0]}, {q[1]})`, `[{k[0]}, {k[1]})`, `[{v_[0]}, {v_[1]})`" in page
    assert f"gate and up in `gate_up_proj` rows `[{gate[0]}, {gate[1]})` and `[{up[0]}, {up[1]})`" in page

    tower = KNOWN_VISION_TOWERS["google/siglip-so400m-patch14-384"]
    assert f"{tower.num_layers} layers, width {tower.hidden_size}, MLP {tower.intermediate_size}, " \
           f"{tower.num_heads} heads, {tower.image_size} px, patch {tower.patch_size}" in page


def test_kernel_tuning_figures_are_the_recorded_runs():
    """README's account of the tuning: candidate counts (tune.json) and the untuned speeds (baseline run)."""
    import collections
    section = " ".join(read("README.md").split("## Attention backends and the Triton kernel")[1].split("\n## ")[0].split())
    runs = os.path.join(ROOT, "kernels", "gpu_runs")
    with open(os.path.join(runs, "2026-11-30-tune", "tune.json")) as f:
        counts = collections.Counter((r["kernel"], r["shape"]) for r in json.load(f))
    per_kernel = {k: {n for (kk, _), n in counts.items() if kk == k} for k in ("fwd", "dkdv", "dq")}
    assert all(len(v) == 1 for v in per_kernel.values()), per_kernel  # the same number at every shape
    (fwd,), (dkdv,), (dq,) = per_kernel.values()
    assert f"It times {fwd} forward and {dkdv} + {dq} backward candidates at each shape" in section
    with open(os.path.join(runs, "2026-11-30-baseline", "bench_bf16.md")) as f:
        speeds = [line.split("|")[9].strip() for line in f if "| fwd+bwd |" in line]
    assert f"the first run measured fwd+bwd at {' / '.join(speeds)} of SDPA" in section
    with open(os.path.join(runs, "2026-11-30-tuned", "gpu.txt")) as f:
        machine = f.read()
    gpu, = re.search(r"NVIDIA (\w+)", machine).groups()
    torch_v, triton_v = re.search(r"torch (\S+) triton (\S+)", machine).groups()
    assert f"on an NVIDIA {gpu}, torch {torch_v}, triton {triton_v}" in section
    # SigLIP's head dim 72 in a 128-wide tile, and the ratios the prose sums up from the table
    assert f"which wastes {round(100 * (1 - 72 / 128))}% of every matrix product" in section
    table = re.findall(r"\| (SigLIP, 8 images|0\.5B prefill|7B prefill) \| \S+ \| \w+ \| (fwd\+bwd|fwd) \|"
                       r"(?: [\d.]+ \|){4} ([\d.]+) \|", section)
    decoder = [float(r) for name, _, r in table if name != "SigLIP, 8 images"]
    siglip_fwd = [r for name, p, r in table if name == "SigLIP, 8 images" and p == "fwd"]
    assert len(table) == 6, table
    assert f"reach {min(decoder):.1f}–{max(decoder):.2f} of a production kernel" in section
    assert f"keep it at {siglip_fwd[0]}" in section


def test_readme_defaults_are_the_codes():
    """The frame count and the multi-patch grids the README names are the code's defaults."""
    from minterleave.config import DEFAULT_NUM_FRAMES
    from minterleave.media import DEFAULT_PINPOINTS
    main = " ".join(read("README.md").split())
    assert f"else the checkpoint's `num_frames`, else {DEFAULT_NUM_FRAMES}" in main
    grids = ", ".join(f"{w}×{h}" for w, h in DEFAULT_PINPOINTS[:-1]) + f" or {DEFAULT_PINPOINTS[-1][0]}×" \
        f"{DEFAULT_PINPOINTS[-1][1]} tiles"
    assert f"the best LLaVA-NeXT grid ({grids})" in main
    page = " ".join(read("docs/data-flow.md").split())
    assert f"else {DEFAULT_NUM_FRAMES}. Frames are sampled" in page


def test_the_decode_table_is_arithmetic_of_its_own_measurements():
    """README's `bench.py decode` table: bandwidth = MB per token x tok/s, its fraction of the measured machine
    bandwidth, and every ratio (vs transformers, vs llama.cpp at the same bits) are what its own columns give,
    and the text quotes the ratios of the table."""
    main = read("README.md")
    header = next(line for line in main.splitlines() if line.startswith("| 0.5B shape, 758-token prompt, 2 threads"))
    machine = float(re.search(r"of ([\d.]+) GB/s", header).group(1))
    rows = {}
    for line in main.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(decode=float(cells[1]), prefill=float(cells[2]), rss=float(cells[3]), mb=float(cells[4]),
                              gbs=float(cells[5]), frac=float(cells[6].rstrip("%")) / 100, vs_tf=cells[7], vs_ll=cells[8])
    assert len(rows) == 7, list(rows)
    same_bits = {"bf16": "llama.cpp bf16", "int8": "llama.cpp q8_0", "int4, g32": "llama.cpp q4_0"}

    def ratios(cell):
        return [float(x) for x in re.findall(r"([\d.]+)×", cell)]

    for name, r in rows.items():
        assert math.isclose(r["gbs"], r["mb"] * r["decode"] / 1000, abs_tol=0.15), name
        assert math.isclose(r["frac"], r["gbs"] / machine, abs_tol=0.011), name
        if not name.startswith("minterleave"):
            continue
        tf, ll = rows["transformers bf16"], rows[same_bits[name.split(" ", 1)[1]]]
        for ref, cell in ((tf, r["vs_tf"]), (ll, r["vs_ll"])):
            for got, key in zip(ratios(cell), ("decode", "prefill", "rss")):
                assert math.isclose(got, r[key] / ref[key], rel_tol=0.02, abs_tol=0.011), (name, key, got)
    quoted = re.search(r"decoding is not at llama\.cpp's speed: ([\d.]+)× in bf16, ([\d.]+)× at 8 bits, ([\d.]+)× "
                       r"at 4", " ".join(main.split())).groups()
    assert [float(q) for q in quoted] == [ratios(rows[n]["vs_ll"])[0] for n in
                                          ("minterleave bf16", "minterleave int8", "minterleave int4, g32")]

    # the second table of the same run: time per token, the two parts timed alone, and llama.cpp's step
    header = next(line for line in main.splitlines() if line.startswith("| ms per decoded token, same run"))
    parts = {}
    for line in main.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        parts[cells[0]] = [float(c.rstrip("×")) for c in cells[1:]]
    assert list(parts) == ["minterleave bf16", "minterleave int8", "minterleave int4, g32"]
    for name, (step, matrices, attention, llama_step, floor_ratio) in parts.items():
        assert math.isclose(step, 1000 / rows[name]["decode"], rel_tol=0.01), name
        assert math.isclose(llama_step, 1000 / rows[same_bits[name.split(" ", 1)[1]]]["decode"], rel_tol=0.01), name
        assert math.isclose(floor_ratio, (matrices + attention) / llama_step, abs_tol=0.011), name
        assert matrices + attention < step, name
        mode = name.split()[1].rstrip(",")
        assert f"{mode} {floor_ratio:.2f}×" in " ".join(main.split()), name  # quoted in the text
