"""Hub ids load as folders do: from a pre-filled hub cache, offline; anything else is one clear error.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is first imported, so the cache tests run
in a fresh interpreter with those set, as a user's shell would, from a folder outside the repository.
"""

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from minterleave import hub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "weights", "minterleave-tiny")
REPO_ID = "minterleave/tiny-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

LOAD_BOTH = """
import json, sys, torch
import minterleave as mi
repo_id, folder = sys.argv[1], sys.argv[2]
by_id, by_folder = mi.Model.from_pretrained(repo_id), mi.Model.from_pretrained(folder)
a, b = by_id.state_dict(), by_folder.state_dict()
same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
p, q = mi.Processor.from_pretrained(repo_id), mi.Processor.from_pretrained(folder)
fields = lambda proc: repr(sorted((k, repr(v)) for k, v in vars(proc).items() if k != "tokenizer"))
same_processor = fields(p) == fields(q) and p.tokenizer.to_str() == q.tokenizer.to_str()
errors = []
for load in (mi.Model.from_pretrained, mi.Processor.from_pretrained):
    try:
        load("nobody/no-such-model")
    except FileNotFoundError as e:
        errors.append(str(e))
print(json.dumps(dict(path=mi.hub.resolve(repo_id), same_weights=same_weights, same_processor=same_processor,
                      errors=errors, n_params=len(a))))
"""


def fill_cache(cache, folder, repo_id, commit):
    """The hub cache layout: models--org--name/{blobs/<hash>, refs/main, snapshots/<commit>/<file> -> blob}."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "refs"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot)
    files = [f for f in sorted(os.listdir(folder)) if any(fnmatch.fnmatch(f, p) for p in hub.FILES)]
    for f in files:
        with open(os.path.join(folder, f), "rb") as fh:
            blob = hashlib.sha256(fh.read()).hexdigest()
        shutil.copyfile(os.path.join(folder, f), os.path.join(repo, "blobs", blob))
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, f))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(commit)
    return snapshot, files


def offline_env(cache):
    return dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")


def test_hub_id_loads_from_the_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    snapshot, files = fill_cache(str(tmp_path / "hub"), TINY, REPO_ID, COMMIT)
    assert "model.safetensors" in files and "tokenizer.json" in files and "train_log.jsonl" not in files
    run = subprocess.run([sys.executable, "-c", LOAD_BOTH, REPO_ID, TINY], capture_output=True, text=True,
                         cwd=tmp_path, env=offline_env(tmp_path / "hub"), timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert os.path.realpath(res["path"]) == os.path.realpath(snapshot)  # the cached snapshot, not the repo's folder
    assert res["n_params"] > 0 and res["same_weights"] and res["same_processor"]
    # an id that is in no cache: one line naming it, from the model and the processor alike
    assert len(res["errors"]) == 2
    for e in res["errors"]:
        assert "nobody/no-such-model" in e and "\n" not in e


def test_unknown_hub_id_offline_is_one_line_from_sample(tmp_path):
    pytest.importorskip("huggingface_hub")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--model", "nobody/no-such-model",
                          "--prompt", "hi"], capture_output=True, text=True, cwd=tmp_path,
                         env=offline_env(tmp_path / "empty-hub"), timeout=300)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0], run.stderr


def test_folders_are_returned_as_they_are_and_paths_never_reach_the_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any import of it would now fail
    assert hub.resolve(TINY) == TINY
    for name in ("./no/such", "no/such/folder", "/no/such", "no-such-folder", "a/../b", "org--x/name"):
        with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
            hub.resolve(name)


def test_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(FileNotFoundError) as e:
        hub.resolve("llava-hf/llava-interleave-qwen-0.5b-hf")
    assert "llava-hf/llava-interleave-qwen-0.5b-hf" in str(e.value) and 'pip install "minterleave[hub]"' in str(e.value)
