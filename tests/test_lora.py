"""LoRA (minterleave/lora.py) against PEFT on transformers' LlavaForConditionalGeneration: adapters written here
load in PEFT and adapters made by PEFT load here, with the same logits (fp32, tiny GQA checkpoint); the
unsupported configs are refused by name; merging; training touches only the adapters; the CLI flags."""

import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minterleave as mi
from minterleave.lora import add_lora, load_adapter, lora_layers, merge_lora, save_adapter
from minterleave.weights import save_weights
from tiny_model import hf_model, save_checkpoint

peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "weights", "minterleave-tiny")
DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(transformers model, its llava-hf checkpoint folder, input_ids, pixel_values): GQA, tied head, 2 images."""
    hf = hf_model(seed=1, kv_heads=2, tied=True, image_size=70)
    hf.set_attn_implementation("eager")
    ckpt = save_checkpoint(hf, str(tmp_path_factory.mktemp("lora") / "ckpt"))
    g = torch.Generator().manual_seed(0)
    per_image, image = 25, hf.config.image_token_index
    ids = torch.tensor([[5, 6, 7] + [image] * per_image + [8, 9, 10, 11] + [image] * per_image + [3, 4, 12]])
    pixels = torch.rand(2, 3, 70, 70, generator=g) * 2 - 1
    return hf, ckpt, ids, pixels


def logits(model, ids, pixels):
    with torch.no_grad(), mi.use_backend("naive"):
        if isinstance(model, mi.Model):
            return model(ids, pixels)
        return model(input_ids=ids, pixel_values=pixels).logits


def randomise(model, std=0.1, seed=0):
    """Non-zero B (and new A): a fresh adapter is a no-op, which would prove nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def peft_lora_modules(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})))


def our_lora_modules(model):
    return sorted(name for _, layer in lora_layers(model) for name in layer.adapted.values())


@pytest.mark.parametrize("targets,parts,rslora", [
    (DECODER, ("decoder",), False),
    (DECODER, ("decoder", "vision"), True),
    (["q_proj", "v_proj", "out_proj", "fc2"], ("decoder", "vision"), False),
    (["k_proj", "up_proj"], ("decoder",), True),  # one slice of each fused layer
])
def test_minterleave_adapter_loads_in_peft_with_equal_logits(reference, tmp_path, targets, parts, rslora):
    hf, ckpt, ids, pixels = reference
    model = randomise(add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8, targets=targets, parts=parts,
                               use_rslora=rslora))
    save_adapter(model, str(tmp_path), base_model_name_or_path="tiny")
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is rslora
    assert set(os.listdir(tmp_path)) == {"adapter_config.json", "adapter_model.safetensors"}
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn." + [t for t in targets if t in DECODER][0] \
        + ".lora_A.weight" in keys

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    assert peft_lora_modules(ref) == our_lora_modules(model)  # PEFT adapts exactly the same modules
    ours, theirs = logits(model, ids, pixels), logits(ref, ids, pixels)
    err = (ours - theirs).abs().max().item()
    print(f"max abs logit difference, minterleave adapter in PEFT ({'+'.join(parts)}, {len(targets)} targets, "
          f"rslora={rslora}): {err:.3g}")
    assert err <= 1e-5
    assert (ours - logits(hf, ids, pixels)).abs().max() > 1e-2  # the adapter does change the logits


@pytest.mark.parametrize("target_modules,rslora", [
    (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)", False),  # decoder only
    (sorted(set(DECODER + VISION)), False),  # decoder + vision
    (sorted(set(DECODER + VISION)), True),
    (["q_proj", "v_proj"], False),  # the classic choice: in both towers, as PEFT's rule picks them
])
def test_peft_adapter_loads_in_minterleave_with_equal_logits(reference, tmp_path, target_modules, rslora):
    hf, ckpt, ids, pixels = reference
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, use_rslora=rslora,
                             init_lora_weights=False)  # random A and B: not a no-op
    ref = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    ref.save_pretrained(str(tmp_path))
    model = mi.Model.from_pretrained(ckpt, adapter=str(tmp_path))
    assert not model.training and all(not m.training for m in model.modules())
    assert peft_lora_modules(ref) == our_lora_modules(model)
    ours, theirs = logits(model, ids, pixels), logits(ref, ids, pixels)
    err = (ours - theirs).abs().max().item()
    kind = "decoder" if isinstance(target_modules, str) else "+".join(target_modules) if len(target_modules) < 3 \
        else "decoder+vision"
    print(f"max abs logit difference, PEFT adapter in minterleave ({kind}, rslora={rslora}): {err:.3g}")
    assert err <= 1e-5
    assert (ours - logits(hf, ids, pixels)).abs().max() > 1e-2

    # saved again by minterleave: the same tensors under the same keys, the same target_modules
    save_adapter(model, str(tmp_path / "again"))
    a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" /
                                                                             "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    again = json.load(open(tmp_path / "again" / "adapter_config.json"))
    assert again["target_modules"] == json.load(open(tmp_path / "adapter_config.json"))["target_modules"]


def test_projector_trained_fully_beside_the_adapters_is_peft_modules_to_save_both_ways(reference, tmp_path):
    """parts=(..., "projector"): the projector trains fully, saved as PEFT's modules_to_save=["multi_modal_projector"]."""
    hf, ckpt, ids, pixels = reference
    # PEFT -> minterleave: random adapters and a changed projector copy (the one PEFT trains and saves)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "fc1"], init_lora_weights=False,
                             modules_to_save=["multi_modal_projector"])
    ref = peft.get_peft_model(copy.deepcopy(hf), config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(str(tmp_path / "peft"))
    model = mi.Model.from_pretrained(ckpt, adapter=str(tmp_path / "peft"))
    err = (logits(model, ids, pixels) - logits(ref, ids, pixels)).abs().max().item()
    print(f"max abs logit difference, PEFT adapter + modules_to_save projector in minterleave: {err:.3g}")
    assert err <= 1e-5
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {"projector.linear_1.weight", "projector.linear_1.bias",
                                                         "projector.linear_2.weight", "projector.linear_2.bias"}
    # minterleave -> PEFT: add_lora with the projector part on a bfloat16 base, projector trained in float32
    half = add_lora(mi.Model.from_pretrained(ckpt, dtype=torch.bfloat16), r=4, alpha=8, targets=["v_proj"],
                    parts=("decoder", "projector"))
    assert half.projector.linear_1.weight.dtype == torch.float32 and half.projector.linear_1.weight.requires_grad
    assert half(ids, pixels).dtype == torch.float32  # runs: the tower's bf16 features go into the fp32 projector
    ours = randomise(add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8, targets=["v_proj"],
                              parts=("decoder", "projector")))
    with torch.no_grad():
        for p in ours.projector.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_adapter(ours, str(tmp_path / "ours"))
    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["modules_to_save"] == ["multi_modal_projector"]
    assert "base_model.model.model.multi_modal_projector.linear_2.bias" in load_file(
        str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    err = (logits(ours, ids, pixels) - logits(theirs, ids, pixels)).abs().max().item()
    print(f"max abs logit difference, minterleave adapter + projector in PEFT: {err:.3g}")
    assert err <= 1e-5
    assert (logits(ours, ids, pixels) - logits(hf, ids, pixels)).abs().max() > 1e-2
    # merged: the projector's trained weights are the model's own, in its dtype
    merged = merge_lora(ours)
    assert (logits(merged, ids, pixels) - logits(theirs, ids, pixels)).abs().max().item() <= 1e-4
    # a file that says modules_to_save but lacks the projector's tensors is refused, naming the problem
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "projector" not in k}, str(tmp_path / "ours" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="projector's 4 tensors"):
        mi.Model.from_pretrained(ckpt, adapter=str(tmp_path / "ours"))


def test_transformers_4_adapter_keys_load_too(reference, tmp_path):
    """Adapters trained on transformers 4 name the layers language_model.model.layers.N and
    vision_tower.vision_model.encoder.layers.N."""
    hf, ckpt, ids, pixels = reference
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                 target_modules=["q_proj", "fc1"])).eval()
    ref.save_pretrained(str(tmp_path))
    file = str(tmp_path / "adapter_model.safetensors")
    old = {k.replace("model.model.language_model.", "model.language_model.model.")
            .replace("model.model.vision_tower.", "model.vision_tower.vision_model."): t
           for k, t in load_file(file).items()}
    assert any(".language_model.model.layers." in k for k in old) and any(".vision_model.encoder." in k for k in old)
    save_file(old, file)
    model = mi.Model.from_pretrained(ckpt, adapter=str(tmp_path))
    assert (logits(model, ids, pixels) - logits(ref, ids, pixels)).abs().max() <= 1e-5


def test_rslora_scale(reference):
    _, ckpt, _, _ = reference
    plain = add_lora(mi.Model.from_pretrained(ckpt), r=16, alpha=8)
    rs = add_lora(mi.Model.from_pretrained(ckpt), r=16, alpha=8, use_rslora=True)
    assert lora_layers(plain)[0][1].scale == 0.5 and lora_layers(rs)[0][1].scale == 2.0


@pytest.fixture
def valid_adapter(reference, tmp_path):
    _, ckpt, _, _ = reference
    save_adapter(randomise(add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8)), str(tmp_path / "ok"))
    return ckpt, tmp_path / "ok"


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("modules_to_save", ["lm_head"]),
    ("modules_to_save", ["multi_modal_projector", "lm_head"]),
    ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 32}), ("layers_to_transform", [0]),
    ("fan_in_fan_out", True), ("lora_bias", True), ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"),
    ("peft_type", "IA3"), ("task_type", "SEQ_CLS"), ("trainable_token_indices", [1, 2]),
    ("a_future_option", {"on": True}), ("target_modules", "all-linear"), ("target_modules", ".*lm_head"),
    ("target_modules", ["linear_1"]), ("target_modules", r".*\.nothing_here"), ("target_modules", None),
])
def test_unsupported_adapter_configs_are_refused_by_name(valid_adapter, field, value):
    ckpt, folder = valid_adapter
    file = folder / "adapter_config.json"
    config = json.load(open(file))
    config[field] = value
    json.dump(config, open(file, "w"))
    with pytest.raises(ValueError, match=field) as e:
        mi.Model.from_pretrained(ckpt, adapter=str(folder))
    assert "\n" not in str(e.value)
    print(e.value)


def test_init_and_runtime_options_that_change_nothing_are_accepted(valid_adapter):
    ckpt, folder = valid_adapter
    config = json.load(open(folder / "adapter_config.json"))
    config.update(init_lora_weights="gaussian", inference_mode=False, peft_version="0.9.0", revision="main",
                  loftq_config={}, eva_config=None, megatron_core="megatron.core", task_type="CAUSAL_LM")
    json.dump(config, open(folder / "adapter_config.json", "w"))
    mi.Model.from_pretrained(ckpt, adapter=str(folder))


def test_bad_adapter_files_name_the_tensor(valid_adapter):
    ckpt, folder = valid_adapter
    file = str(folder / "adapter_model.safetensors")
    good = load_file(file)
    key = "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight"
    cases = {"missing": {k: t for k, t in good.items() if k != key},
             "shape": {**good, key: torch.zeros(3, 3)},
             "unexpected": {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
             "not a LoRA weight": {**good, "base_model.model.model.language_model.layers.0.mlp.down_proj."
                                           "lora_magnitude_vector": torch.zeros(64)}}
    for why, tensors in cases.items():
        save_file(tensors, file)
        with pytest.raises(ValueError, match=why) as e:
            load_adapter(mi.Model.from_pretrained(ckpt), str(folder))
        assert "lora" in str(e.value)
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(mi.Model.from_pretrained(ckpt), str(folder))
    with pytest.raises(FileNotFoundError, match="no such"):
        load_adapter(mi.Model.from_pretrained(ckpt), str(folder / "absent"))


def test_only_the_adapters_train(reference):
    _, ckpt, ids, pixels = reference
    model = add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8, parts=("decoder", "vision"), dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n) != ("lora_B" in n) for n in trainable)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # a fresh adapter is a no-op (B = 0), in eval mode exactly
    assert torch.equal(logits(model, ids, pixels), logits(mi.Model.from_pretrained(ckpt), ids, pixels))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # B moves on the first step, A on the second (its gradient is zero while B = 0)
        _, loss = model(ids, pixels, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lora_" in n), n


def test_adapters_on_a_bfloat16_base_are_float32_and_train(reference):
    """As PEFT does (autocast_adapter_dtype): a half-precision base gets float32 adapters; the update is
    computed in float32 and added in the base's dtype."""
    _, ckpt, ids, pixels = reference
    model = add_lora(mi.Model.from_pretrained(ckpt, dtype=torch.bfloat16), r=4, alpha=8, parts=("decoder", "vision"))
    randomise(model).train()
    _, loss = model(ids, pixels, labels=ids)
    loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)


def test_merge_gives_the_same_logits_and_a_plain_checkpoint_transformers_loads(reference, tmp_path):
    from transformers import LlavaForConditionalGeneration
    hf, ckpt, ids, pixels = reference
    names = [n for n, _ in mi.Model.from_pretrained(ckpt).named_parameters()]
    model = randomise(add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8, parts=("decoder", "vision"),
                               targets=DECODER + ["out_proj", "fc1", "fc2"]))
    unmerged = logits(model, ids, pixels)
    merge_lora(model)
    merged = logits(model, ids, pixels)
    assert [n for n, _ in model.named_parameters()] == names and not lora_layers(model)
    err = (merged - unmerged).abs().max().item()
    print(f"max abs logit difference, merged vs unmerged: {err:.3g}")
    assert err <= 1e-5
    out = str(tmp_path / "merged")
    save_weights(model, out, model.cfg)
    shutil.copy(os.path.join(ckpt, "config.json"), out)
    ref = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ref.set_attn_implementation("eager")
    err = (logits(ref, ids, pixels) - merged).abs().max().item()
    print(f"max abs logit difference, merged checkpoint in transformers: {err:.3g}")
    assert err <= 1e-5
    # and PEFT's own merge of the same adapter agrees
    save_adapter(randomise(add_lora(mi.Model.from_pretrained(ckpt), r=4, alpha=8, parts=("decoder", "vision"),
                                    targets=DECODER + ["out_proj", "fc1", "fc2"])), str(tmp_path / "ad"))
    peft_merged = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).merge_and_unload()
    assert (logits(peft_merged, ids, pixels) - merged).abs().max() <= 1e-5


def test_add_lora_refuses_what_it_cannot_do(reference):
    _, ckpt, _, _ = reference
    model = mi.Model.from_pretrained(ckpt)
    for kw, word in ((dict(targets=["fc1"]), "fc1"), (dict(parts=["projector"]), "projector"), (dict(r=0), "rank"),
                     (dict(dropout=1.0), "dropout"), (dict(alpha=0), "alpha")):
        with pytest.raises(ValueError, match=word):
            add_lora(model, **{"r": 4, "alpha": 8, **kw})
    add_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match="already"):
        add_lora(model, r=4, alpha=8)


def bundled_adapter(folder):
    model = randomise(add_lora(mi.Model.from_pretrained(BUNDLED), r=2, alpha=4), std=0.01)
    return save_adapter(model, folder)


def spy_on_from_pretrained(monkeypatch):
    calls = []
    real = mi.Model.from_pretrained.__func__

    def spy(cls, path, **kw):
        calls.append(kw)
        return real(cls, path, **kw)
    monkeypatch.setattr(mi.Model, "from_pretrained", classmethod(spy))
    return calls


def test_sample_py_adapter_flag(tmp_path, monkeypatch, capsys):
    import sample
    adapter = bundled_adapter(str(tmp_path / "adapter"))
    calls = spy_on_from_pretrained(monkeypatch)
    assert sample.main(["--adapter", adapter, "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert calls[-1]["adapter"] == adapter
    assert sample.parse_args([]).adapter is None


def test_eval_py_adapter_flag(tmp_path, monkeypatch, capsys):
    import eval as eval_py
    adapter = bundled_adapter(str(tmp_path / "adapter"))
    calls = spy_on_from_pretrained(monkeypatch)
    assert eval_py.main(["--adapter", adapter, "--domain", "multi_image", "--n", "2", "--batch-size", "2",
                         "--device", "cpu"]) == 0
    assert calls[-1]["adapter"] == adapter
