"""Parity of the model with transformers' LlavaForConditionalGeneration, stage by stage,
for every checkpoint layout and attention backend; strict loading; bad configs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import minterleave as mi
from minterleave.config import ConfigError
from minterleave.weights import WeightsError
from tiny_model import hf_model, save_checkpoint

LAYOUTS = ["llava-hf", "hf5", "lmms-lab"]
BACKENDS = ["naive", "sdpa"]
# two shapes: GQA + tied head + 70 px images (25 tokens); MHA + untied head + 28 px (4 tokens)
VARIANTS = {
    "gqa-tied-70px": dict(kv_heads=2, tied=True, image_size=70),
    "mha-untied-28px": dict(kv_heads=4, tied=False, image_size=28, v_layers=2),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    """(transformers model, {layout: checkpoint dir}) for one variant."""
    model = hf_model(seed=1, **VARIANTS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    dirs = {layout: save_checkpoint(model, str(root / layout), layout, shards=2 if layout == "llava-hf" else 1)
            for layout in LAYOUTS}
    return model, dirs


def interleaved_prompt(hf, n_images=3, seed=0):
    """Text, image, text, image, ... as ids, plus matching random pixels."""
    g = torch.Generator().manual_seed(seed)
    cfg = hf.config
    per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = []
    for i in range(n_images):
        ids += torch.randint(0, cfg.image_token_index, (3 + i,), generator=g).tolist()
        ids += [cfg.image_token_index] * per_image
    ids += torch.randint(0, cfg.image_token_index, (5,), generator=g).tolist()
    s = cfg.vision_config.image_size
    pixels = torch.rand(n_images, 3, s, s, generator=g) * 2 - 1
    return torch.tensor([ids]), pixels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_stage_by_stage(reference, layout, backend):
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs[layout])
    ids, pixels = interleaved_prompt(hf)
    # the same math on both sides: explicit softmax against eager, fused kernels against sdpa
    hf.set_attn_implementation({"naive": "eager", "sdpa": "sdpa"}[backend])
    with torch.no_grad(), mi.use_backend(backend):
        ref_vision = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        ours_vision = model.vision(pixels)
        ref_proj = hf.model.multi_modal_projector(ref_vision)
        ours_proj = model.image_features(pixels)
        ref_logits = hf(input_ids=ids, pixel_values=pixels).logits
        ours_logits = model(input_ids=ids, pixel_values=pixels)
    errors = {"vision": (ours_vision - ref_vision).abs().max().item(),
              "projector": (ours_proj - ref_proj).abs().max().item(),
              "logits": (ours_logits - ref_logits).abs().max().item()}
    print(f"max abs error ({layout}, {backend}):", errors)
    assert ours_logits.shape == ref_logits.shape
    assert all(e <= 1e-5 for e in errors.values()), errors
    # the post_layernorm output differs, so using it by mistake would have been caught
    post = hf.model.vision_tower.post_layernorm(ref_vision)
    assert (post - ref_vision).abs().max() > 1e-2


def test_loss_matches_transformers(reference):
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"])
    ids, pixels = interleaved_prompt(hf, n_images=2)
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = -100
    labels[ids == hf.config.image_token_index] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
        _, loss = model(input_ids=ids, pixel_values=pixels, labels=labels)
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_batched_padding_equals_single(reference):
    """Left-padded rows give the logits each prompt has alone."""
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"])
    a_ids, a_px = interleaved_prompt(hf, n_images=1, seed=1)
    b_ids, b_px = interleaved_prompt(hf, n_images=2, seed=2)
    T = b_ids.shape[1]
    pad = T - a_ids.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), a_ids], 1), b_ids])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    with torch.no_grad():
        both = model(ids, torch.cat([a_px, b_px]), attention_mask=mask)
        a = model(a_ids, a_px)
        b = model(b_ids, b_px)
    assert (both[0, pad:] - a[0]).abs().max() <= 1e-5
    assert (both[1] - b[0]).abs().max() <= 1e-5


def test_a_misspelt_argument_is_a_type_error_naming_it(reference):
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"])
    ids, pixels = interleaved_prompt(hf, n_images=1)
    with pytest.raises(TypeError, match="pixel_value"):
        model(ids, pixel_value=pixels)
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(ids, pixels, max_new_token=3)
    with pytest.raises(TypeError, match="image_sizes"):  # a key another processor returns is not ignored
        model(ids, pixels, image_sizes=[(70, 70)])


def test_image_count_mismatch_is_an_error(reference):
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"])
    ids, pixels = interleaved_prompt(hf, n_images=3)
    with pytest.raises(ValueError, match=r"image tokens but 2 images"):
        model(ids, pixels[:2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_runs(reference, dtype):
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"], dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    ids, pixels = interleaved_prompt(hf)
    with torch.no_grad():
        ours = model(ids, pixels)
        ref = hf(input_ids=ids, pixel_values=pixels).logits
    assert torch.isfinite(ours).all()
    # bf16 keeps 8 bits of mantissa: a loose sanity bound on logits of scale ~10
    assert (ours - ref).abs().max() < 0.5 * ref.abs().max()


# ---------------------------------------------------------------- strict loading


@pytest.fixture()
def broken(reference, tmp_path):
    """A writable single-file llava-hf copy of the tiny checkpoint and its tensors."""
    hf, _ = reference
    path = save_checkpoint(hf, str(tmp_path / "ckpt"), "llava-hf")
    file = os.path.join(path, "model.safetensors")
    return path, file, load_file(file)


def test_missing_tensor_is_named(broken):
    path, file, tensors = broken
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(WeightsError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        mi.Model.from_pretrained(path)


def test_unexpected_tensor_is_named(broken):
    path, file, tensors = broken
    tensors["language_model.model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, file)
    with pytest.raises(WeightsError, match=r"model\.safetensors: unexpected tensor language_model\.model\.layers\.0\.self_attn\.extra\.weight"):
        mi.Model.from_pretrained(path)


def test_misshaped_tensor_is_named(broken):
    path, file, tensors = broken
    tensors["multi_modal_projector.linear_1.bias"] = torch.zeros(7)
    save_file(tensors, file)
    with pytest.raises(WeightsError, match=r"multi_modal_projector\.linear_1\.bias has shape \[7\]"):
        mi.Model.from_pretrained(path)


def test_unused_tensors_are_accepted_explicitly(broken):
    """post_layernorm is in the file and deliberately unused; a SigLIP head is too."""
    path, file, tensors = broken
    assert "vision_tower.vision_model.post_layernorm.weight" in tensors
    tensors["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 4)
    save_file(tensors, file)
    mi.Model.from_pretrained(path)


def test_folder_without_weights(tmp_path, broken):
    path, file, _ = broken
    os.remove(file)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        mi.Model.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mi.Model.from_pretrained(str(tmp_path))


def test_corrupt_weights_file(broken):
    path, file, _ = broken
    with open(file, "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        mi.Model.from_pretrained(path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["vision_config"].update(model_type="clip_vision_model"), "only SigLIP"),
    (lambda c: c.update(vision_feature_select_strategy="spatial"), "vision_feature_select_strategy"),
    (lambda c: c["text_config"].update(model_type="llama"), "only Qwen2"),
    (lambda c: c.update(model_type="mllama"), "model_type 'mllama' is not supported"),
    (lambda c: c.update(vision_feature_layer=[-2, -1]), "single layer index"),
])
def test_unsupported_config(broken, edit, message):
    path, _, _ = broken
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ConfigError, match=message):
        mi.Model.from_pretrained(path)


# ---------------------------------------------------------------- the real 0.5B shape

QWEN_05B = dict(vocab=152000, hidden=1024, inter=2816, layers=24, heads=16, kv_heads=16, tied=True,
                image_size=384, patch=14, v_hidden=1152, v_inter=4304, v_layers=26, v_heads=16,
                image_token=151646, max_pos=32768)


@pytest.mark.slow
def test_official_05b_shape(tmp_path):
    """The llava-interleave-qwen-0.5b-hf configuration, random weights, bf16 on disk like the hub."""
    torch.manual_seed(0)
    from tiny_model import hf_config
    from transformers import LlavaForConditionalGeneration
    hf = LlavaForConditionalGeneration(hf_config(**QWEN_05B)).eval()
    path = save_checkpoint(hf, str(tmp_path / "05b"), "llava-hf", dtype=torch.bfloat16)
    with torch.no_grad():  # the reference sees the same rounded weights (parameters only: a
        for p in hf.parameters():  # blanket .to(bf16) would also round HF's RoPE frequencies)
            p.copy_(p.to(torch.bfloat16))
    model = mi.Model.from_pretrained(path)
    ids, pixels = interleaved_prompt(hf, n_images=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        ours = model(ids, pixels)
    err = (ours - ref).abs().max().item()
    print("0.5B max abs logit error:", err)
    assert err <= 1e-4  # 24 + 26 layers in fp32


def test_triton_backend_matches_naive(reference):
    """The whole model with the hand-written kernel (interpreted on a CPU) against the reference math."""
    from minterleave.kernels import flash_attention
    if not flash_attention.is_available():
        pytest.skip("triton kernel unavailable (no triton, or imported without TRITON_INTERPRET on CPU)")
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"])
    ids, pixels = interleaved_prompt(hf, n_images=2)
    with torch.no_grad():
        with mi.use_backend("naive"):
            ref = model(ids, pixels)
        with mi.use_backend("triton"):
            ours = model(ids, pixels)
    err = (ours - ref).abs().max().item()
    print("triton vs naive, max abs logit error:", err)
    assert err <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_on_cuda(reference, dtype):
    """On a GPU the default backend is the Triton kernel; it matches sdpa on the whole model."""
    hf, dirs = reference
    model = mi.Model.from_pretrained(dirs["llava-hf"], device="cuda", dtype=dtype)
    ids, pixels = interleaved_prompt(hf, n_images=3)
    ids, pixels = ids.cuda(), pixels.cuda()
    with torch.no_grad():
        with mi.use_backend("sdpa"):
            ref = model(ids, pixels)
        ours = model(ids, pixels)  # default on CUDA: triton
        tokens_ref = model.generate(ids, pixels, max_new_tokens=8)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    print(f"cuda {dtype}: triton vs sdpa relative logit error {err:.2e}")
    assert err <= (1e-3 if dtype == torch.float32 else 3e-2)  # tf32 / bf16 rounding
    assert tokens_ref.shape == (1, 8)
