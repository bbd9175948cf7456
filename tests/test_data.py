"""minterleave.data: M4-Instruct records → token ids, masked labels, pixels, batches; path safety."""

import json
import os

import pytest
import torch

import minterleave as mi
from minterleave import data, tasks
from minterleave.tokenizer import write_tokenizer_files

S, PATCH = 64, 16
TPI = (S // PATCH) ** 2


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc")
    write_tokenizer_files(d, vocab_size=600, image_size=S, patch_size=PATCH, num_frames=4)
    return mi.Processor.from_pretrained(d)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m4")
    recs = tasks.write_dataset(str(d / "train.json"), "all", 8, seed=3, out_dir=str(d), write_video=True)
    return d, recs


def supervised_text(proc, item):
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert all(lab in (data.IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    return proc.decode([i for i, lab in zip(ids, labels) if lab != data.IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("domain", tasks.DOMAINS)
def test_only_the_answer_and_im_end_are_supervised(proc, domain):
    smp = tasks.make_sample(domain, 5)
    item = data.encode_sample(proc, smp)
    assert supervised_text(proc, item) == smp.answer + "<|im_end|>"
    # the prompt part is exactly the inference prompt, images expanded in place
    n_img = 5 if domain == "multi_patch" else len(smp.images)
    assert item["pixel_values"].shape == (n_img, 3, S, S)
    ids = item["input_ids"].tolist()
    assert ids.count(proc.image_token_id) == n_img * TPI
    prompt = proc(data.prompt_for(proc, smp), images=smp.images, multi_patch=domain == "multi_patch")
    k = prompt["input_ids"].shape[1]
    assert ids[:k] == prompt["input_ids"][0].tolist()
    assert torch.equal(item["pixel_values"], prompt["pixel_values"])
    assert proc.decode(ids[k:], skip_special_tokens=False) == smp.answer + "<|im_end|>\n"


def test_front_placement_prompt_equals_the_chat_template(proc):
    smp = tasks.make_sample("3d", 1, placement="front")
    q = smp.question.split("\n", 1)[1]
    messages = [{"role": "user", "content": [{"type": "image"}] * len(smp.images) + [{"type": "text", "text": q}]}]
    assert data.prompt_for(proc, smp) == proc.apply_chat_template(messages)


def test_multi_turn_record_supervises_every_answer(proc, dataset_dir):
    d, recs = dataset_dir
    rec = dict(recs[0])
    rec["conversations"] = [{"from": "gpt", "value": "stray leading turn"},
                            {"from": "human", "value": recs[0]["conversations"][0]["value"]},
                            {"from": "gpt", "value": "first answer"},
                            {"from": "human", "value": "And again?"},
                            {"from": "gpt", "value": "second"}]
    item = data.encode_record(proc, rec, str(d))
    assert supervised_text(proc, item) == "first answer<|im_end|>second<|im_end|>"
    text = proc.decode(item["input_ids"], skip_special_tokens=False)
    assert "stray" not in text and text.count("<|im_start|>assistant\n") == 2


def test_records_without_placeholders_get_images_in_front(proc, dataset_dir):
    d, recs = dataset_dir
    rec = dict(recs[0])
    q = rec["conversations"][0]["value"]
    rec["conversations"] = [{"from": "human", "value": q.replace("<image>", "")}, rec["conversations"][1]]
    item = data.encode_record(proc, rec, str(d))
    assert item["pixel_values"].shape[0] == len(rec["image"])
    text = proc.decode(item["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\n" + "<image>" * (TPI * len(rec["image"])) + "\n")
    bad = dict(rec, conversations=[{"from": "human", "value": "<image> one only"}, rec["conversations"][1]])
    with pytest.raises(data.DataError, match="1 <image>.*2 image"):
        data.encode_record(proc, bad, str(d))


def test_collate_right_pads_and_masks(proc):
    items = [data.encode_sample(proc, tasks.make_sample(dom, 2)) for dom in ("multi_image", "multi_patch")]
    b = data.collate(items, proc.pad_token_id)
    n0, n1 = (len(it["input_ids"]) for it in items)
    assert b["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert b["attention_mask"][short].tolist() == [1] * n + [0] * (max(n0, n1) - n)
    assert (b["input_ids"][short, n:] == proc.pad_token_id).all()
    assert (b["labels"][short, n:] == data.IGNORE_INDEX).all()
    assert torch.equal(b["pixel_values"], torch.cat([it["pixel_values"] for it in items]))


def test_json_dataset_reads_m4_records(proc, dataset_dir):
    d, recs = dataset_dir
    ds = data.JsonDataset(str(d / "train.json"), str(d), proc)
    assert len(ds) == len(recs)
    for i, rec in enumerate(recs):
        item = ds[i]
        assert supervised_text(proc, item) == rec["conversations"][1]["value"] + "<|im_end|>"
        n = 5 if rec["metadata"]["domain"] == "multi_patch" else len(rec["image"])
        assert item["pixel_values"].shape[0] == n  # multi-patch records are tiled


def test_video_records_can_use_the_video_file(proc, dataset_dir):
    d, recs = dataset_dir
    i = next(i for i, r in enumerate(recs) if "video" in r)
    frames = data.encode_record(proc, recs[i], str(d), video_mode="frames")
    video = data.encode_record(proc, recs[i], str(d), video_mode="video", num_frames=4)
    assert video["pixel_values"].shape == frames["pixel_values"].shape == (4, 3, S, S)
    assert video["input_ids"].tolist().count(proc.image_token_id) == 4 * TPI
    assert supervised_text(proc, video) == recs[i]["conversations"][1]["value"] + "<|im_end|>"


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.png", "video/../../outside.png", "a/../../b.png"])
def test_unsafe_image_paths_are_refused(proc, dataset_dir, tmp_path, path):
    d, recs = dataset_dir
    rec = dict(recs[0], id="bad-record")
    rec["image"] = [path] + rec["image"][1:]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([recs[1], rec]))
    with pytest.raises(data.DataError) as e:
        data.JsonDataset(str(f), str(d), proc)
    assert "bad-record" in str(e.value) and repr(path) in str(e.value)
    assert "absolute" in str(e.value) or "escapes the image root" in str(e.value)
    with pytest.raises(data.DataError, match="bad-record"):
        data.encode_record(proc, rec, str(d))


def test_missing_images_are_reported_by_path(proc, dataset_dir, tmp_path):
    d, recs = dataset_dir
    rec = dict(recs[0], id="gone")
    rec["image"] = ["multi_image/does_not_exist.png"] + rec["image"][1:]
    f = tmp_path / "missing.json"
    f.write_text(json.dumps([rec]))
    want = os.path.join(str(d), "multi_image", "does_not_exist.png")
    with pytest.raises(data.DataError, match="not found") as e:
        data.JsonDataset(str(f), str(d), proc)
    assert want in str(e.value) and "gone" in str(e.value)
    with pytest.raises(data.DataError) as e:
        data.encode_record(proc, rec, str(d))
    assert want in str(e.value)


def test_training_and_evaluation_seeds_are_disjoint():
    assert data.train_seed(0, 0) >= data.TRAIN_SEED_BASE
    assert tasks.sample_seed(data.EVAL_SEED_LIMIT - 1, 10_000_000 - 1) < data.TRAIN_SEED_BASE
    assert data.train_seed(1, 0) == data.train_seed(0, 100_000_000 - 1) + 1


def test_a_collated_batch_goes_straight_into_the_model(proc):
    """collate's keys are the model's arguments (the sample ids only on request, for train.py)."""
    import inspect
    import minterleave as mi
    items = [data.encode_sample(proc, tasks.make_sample(d, 3), f"{d}/3") for d in ("multi_image", "video")]
    batch = data.collate(items, proc.pad_token_id)
    assert set(batch) <= set(inspect.signature(mi.Model.forward).parameters)
    assert data.collate(items, proc.pad_token_id, with_ids=True)["ids"] == ["multi_image/3", "video/3"]
