"""Training faults: a crash at any step of a save, a torn log line, a diverging loss, bad training data.

Each test states the promise of issue "Reliability": the last good checkpoint is never lost or overwritten by a
worse one, --resume continues exactly, and bad data is reported before step 1, all of it at once.
"""

import json
import os

import pytest
import torch

import minterleave as mi
import train
from minterleave import checkpoint, data, tasks

FAST = ["--preset", "test", "--batch-size", "4", "--log-every", "1", "--warmup", "2", "--lr", "5e-3",
        "--domain", "video", "--seed", "3"]
SAVE_STEPS = ["clear tmp", "assets", "config", "weights", "log", "optimizer", "manifest", "clear old",
              "out -> old", "tmp -> out", "remove old"]


def losses(out):
    with open(os.path.join(out, checkpoint.LOG)) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run (saves after steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("faults") / "full")
    train.main(FAST + ["--max-steps", "4", "--save-every", "2", "--out", out])
    return out


class Crash(Exception):
    pass


def test_the_save_protocol_has_the_steps_this_test_crashes_at(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(checkpoint, "_step", seen.append)
    train.main(FAST + ["--max-steps", "2", "--save-every", "1", "--out", str(tmp_path / "run")])
    assert seen == SAVE_STEPS * 2  # (out already holds the log before the first save, so it too moves aside)


@pytest.mark.parametrize("crash_at", SAVE_STEPS)
def test_a_crash_at_any_step_of_a_save_loses_nothing(reference, monkeypatch, tmp_path, crash_at):
    """Crash during the save after step 4 (step 2's checkpoint on disk), then --resume: the run ends with the
    full log history and exactly the weights of the uninterrupted run."""
    out = str(tmp_path / "run")
    calls = {"n": 0}

    def crash_in_second_save(name):
        calls["n"] += name == "clear tmp"
        if calls["n"] == 2 and name == crash_at:
            raise Crash(name)

    monkeypatch.setattr(checkpoint, "_step", crash_in_second_save)
    with pytest.raises(Crash):
        train.main(FAST + ["--max-steps", "4", "--save-every", "2", "--out", out])
    monkeypatch.setattr(checkpoint, "_step", lambda name: None)
    best = checkpoint.find_latest(out)
    assert best is not None, os.listdir(tmp_path)
    # once the new checkpoint is complete (manifest written) it is the one resumed from
    expect = 4 if SAVE_STEPS.index(crash_at) >= SAVE_STEPS.index("manifest") else 2
    assert checkpoint.read_state(best)["step"] == expect
    train.main(FAST + ["--max-steps", "4", "--save-every", "2", "--out", out, "--resume"])
    assert losses(out) == losses(reference)
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no .tmp / .old / .broken left behind
    a, b = mi.Model.from_pretrained(reference), mi.Model.from_pretrained(out)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


def test_a_torn_last_log_line_is_dropped_on_resume(reference, tmp_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--max-steps", "4", "--save-every", "2", "--stop-at", "2", "--out", out])
    with open(os.path.join(out, checkpoint.LOG), "a") as f:
        f.write('{"step": 3, "loss": 4.2, "lr"')  # the crash came in the middle of this line
    train.main(FAST + ["--max-steps", "4", "--save-every", "2", "--out", out, "--resume"])
    assert losses(out) == losses(reference)


def test_a_nonfinite_loss_stops_at_once_and_keeps_the_checkpoint(monkeypatch, tmp_path, capsys):
    out = str(tmp_path / "run")
    real = train.train_step

    def nan_at_step_3(model, net, batches, *rest):
        loss, patch, n = real(model, net, batches, *rest)
        if batches[0]["ids"][0] == first_of_step_3:
            next(model.parameters()).grad.fill_(float("nan"))
            return float("nan"), patch, n
        return loss, patch, n

    first_of_step_3 = f"video/{data.train_seed(3, 8)}"  # step 3 holds samples 8..11 of the video domain
    monkeypatch.setattr(train, "train_step", nan_at_step_3)
    with pytest.raises(FloatingPointError) as err:
        train.main(FAST + ["--max-steps", "5", "--save-every", "2", "--out", out])
    msg = str(err.value)
    assert "step 3" in msg and "loss is nan" in msg and first_of_step_3 in msg and "at step 2" in msg, msg
    assert "\n" not in msg
    state = checkpoint.read_state(out)
    assert state["step"] == 2  # the last good checkpoint, untouched
    assert all(bool(torch.isfinite(p).all()) for p in mi.Model.from_pretrained(out).parameters())
    # --skip-nonfinite: the bad step is skipped with a warning and training goes on
    out2 = str(tmp_path / "skip")
    train.main(FAST + ["--max-steps", "5", "--save-every", "2", "--out", out2, "--skip-nonfinite", "1"])
    assert "skipped (1 of --skip-nonfinite 1)" in capsys.readouterr().err
    assert checkpoint.read_state(out2)["step"] == 5
    assert all(bool(torch.isfinite(p).all()) for p in mi.Model.from_pretrained(out2).parameters())


def test_nan_weights_are_never_saved_over_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    train.main(FAST + ["--max-steps", "1", "--out", out])
    model = mi.Model.from_pretrained(out)
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    with torch.no_grad():
        model.decoder.norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match="decoder.norm.weight holds NaN/Inf"):
        checkpoint.save(out, model, out, optimizer=torch.optim.AdamW(model.parameters()), state={"step": 9})
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    assert checkpoint.read_state(out)["step"] == 1


# ------------------------------------------------------------------------------------- data, before step 1

def _write_records(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    outside = tmp_path / "outside.png"
    s = tasks.make_sample("multi_image", 1)
    s.images[0].save(root / "a.png")
    s.images[0].save(outside)
    os.symlink(outside, root / "link.png")
    (root / "dir.png").mkdir()
    good = {"id": "good", "image": ["a.png"], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    recs = [good,
            dict(good, id="abs", image=["/etc/passwd"]),
            dict(good, id="escape", image=["../outside.png"]),
            dict(good, id="symlink", image=["link.png"]),
            dict(good, id="missing", image=["nope.png"]),
            dict(good, id="dir", image=["dir.png"]),
            dict(good, id="no-answer", conversations=good["conversations"][:1]),
            dict(good, id="count", image=["a.png", "a.png"])]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    return path, root


def test_every_bad_record_is_reported_before_step_1(tmp_path):
    path, root = _write_records(tmp_path)
    out = str(tmp_path / "run")
    with pytest.raises(data.DataError) as err:
        train.main(FAST + ["--max-steps", "1", "--data", str(path), "--image-root", str(root), "--out", out])
    msg = str(err.value)
    assert msg.startswith(f"{path}: 7 bad record(s)") and "\n" not in msg
    for rid, problem in [("abs", "absolute"), ("escape", "escapes the image root"),
                         ("symlink", "resolves outside the image root"), ("missing", "not found"),
                         ("dir", "is a directory"), ("no-answer", "no user turn followed by an assistant"),
                         ("count", "placeholder")]:
        assert f"record '{rid}'" in msg and problem in msg, (rid, msg)
    assert "record 'good'" not in msg
    assert not os.path.exists(out)  # nothing was trained, nothing written


def test_malformed_json_names_the_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": 1},\n  {"id": 2,,}\n]')
    with pytest.raises(data.DataError, match=r"bad.json: line 3, column \d+: invalid JSON"):
        data.load_records(str(bad))
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"id": 1}\n{"id": 2}\n{"id": \n')
    with pytest.raises(data.DataError, match=r"bad.jsonl: line 3 \(record #2\): invalid JSON"):
        data.load_records(str(lines))


def test_more_than_20_problems_are_counted(tmp_path):
    recs = [{"id": i, "image": ["missing.png"], "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]} for i in range(25)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(data.DataError, match=r"25 bad record\(s\): .*\.\.\. and 5 more$"):
        data.JsonDataset(str(path), str(tmp_path))
