"""LoRA on a frozen int8 weight-only base: Int8Linear's backward gives the input gradient of the
dequantised weights (none for the int8 tables), its forward is the same kernel bit for bit, an adapter
trains on it, and train.py --base-dtype int8 runs."""

import json
import math
import os

import pytest
import torch

import minterleave as mi
from minterleave import lora
from minterleave.quantize import Int8Linear, Int8MatMul, quantize_int8, quantize_rows
from test_model import interleaved_prompt
from tiny_model import hf_model, save_checkpoint

import train


def dequantized(path, dtype):
    """The float model whose decoder matrices are the int8 model's, dequantised (as test_quantize.py)."""
    fake = mi.Model.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        for p in fake.decoder.parameters():
            if p.ndim == 2:
                q, s = quantize_rows(p)
                p.copy_(q.float() * s.to(dtype).float()[:, None])
    return fake


def kernel_forward(self, x):
    """Int8Linear.forward before the autograd Function: the kernel called directly."""
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales).reshape(*shape[:-1], -1)
    return y if self.bias is None else y + self.bias


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = hf_model(seed=11, tied=False, kv_heads=2, image_size=28)
    return hf, save_checkpoint(hf, str(tmp_path_factory.mktemp("q") / "ckpt"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 40])  # 40: the backward dequantises a few input columns at a time
def test_int8_linear_input_gradient_is_that_of_the_dequantized_weight(dtype, block, monkeypatch):
    if block:
        monkeypatch.setattr(Int8MatMul, "BLOCK", block)
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 20, bias=True).to(dtype)
    layer = Int8Linear.from_linear(lin)
    w = (layer.weight.float() * layer.scales.float()[:, None]).to(dtype)
    x = torch.randn(2, 7, 48, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 7, 20, dtype=dtype)
    y = layer(x)
    assert torch.equal(y, kernel_forward(layer, x.detach()))  # the forward is the kernel, bit for bit
    y.backward(dy)
    torch.nn.functional.linear(x_ref, w, layer.bias).backward(dy)
    err = ((x.grad.float() - x_ref.grad.float()).abs().max() / x_ref.grad.float().abs().max()).item()
    print(f"Int8Linear dx ({dtype}, block {block}): relative error {err:.2e}")
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)
    assert layer.weight.grad is None and layer.scales.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_gradients_through_int8_decoder_equal_the_dequantized_models(ckpt, dtype, monkeypatch):
    """Every float parameter left (vision tower, projector, norms) gets its gradient through all the int8 layers
    (head included); they equal those of the model holding the dequantised weights. Logits: bit-identical to
    the kernel called directly (the forward is unchanged)."""
    hf, path = ckpt
    ids, pixels = interleaved_prompt(hf, n_images=2)
    model, ref = quantize_int8(mi.Model.from_pretrained(path, dtype=dtype)), dequantized(path, dtype)
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(Int8Linear, "forward", kernel_forward)
            before = model(ids, pixels)
        assert torch.equal(model(ids, pixels), before)
    weights = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))
    (model(ids, pixels) * weights).sum().backward()
    (ref(ids, pixels) * weights).sum().backward()
    grads = dict(ref.named_parameters())
    worst, n = 0.0, 0
    for name, p in model.named_parameters():
        if p.grad is None:  # the int8 layers' biases (frozen), or a weight the forward does not use
            assert not p.requires_grad or grads[name].grad is None, name
            continue
        if name.endswith("k_proj.bias"):  # softmax ignores it: its gradient is 0 up to rounding noise
            continue
        g, r = p.grad.float(), grads[name].grad.float()
        worst, n = max(worst, ((g - r).abs().max() / r.abs().max()).item()), n + 1
    print(f"int8 vs dequantized model gradients ({dtype}): {n} tensors, worst relative error {worst:.2e}")
    # bf16: the kernel and the float matmul round their forward sums differently, and the backward through
    # bf16 layers carries that; Int8Linear's own dx is exact (the test above)
    assert n > 20 and worst < (1e-4 if dtype == torch.float32 else 0.1)
    assert model.decoder.layers[0].input_layernorm.weight.grad is not None  # the input side of every int8 layer
    assert all(b.grad is None for b in model.buffers())


def test_lora_on_int8_base_lowers_the_loss_and_changes_only_the_adapter(ckpt):
    hf, path = ckpt
    ids, pixels = interleaved_prompt(hf, n_images=2)
    labels = ids.masked_fill(ids == hf.config.image_token_index, -100)
    torch.manual_seed(3)
    model = lora.add_lora(quantize_int8(mi.Model.from_pretrained(path, dtype=torch.bfloat16)), r=4, alpha=8)
    layer = model.decoder.layers[0].self_attn.qkv_proj
    assert isinstance(layer, lora.LoRALinear) and isinstance(layer.base, Int8Linear)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)  # as PEFT keeps them
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        _, loss = model(ids, pixels, labels=labels, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"LoRA r=4 on the int8 bf16 base: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses})")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.9 * losses[0]
    end = model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all("lora_B" in k or "lora_A" in k for k in changed)
    assert any(end[k].dtype == torch.int8 for k in start)  # the int8 tables are there, unchanged
    with pytest.raises(ValueError, match="Int8Linear base; merging needs float weights"):
        lora.merge_lora(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "ckpt")
    train.main(["--preset", "test", "--batch-size", "2", "--max-steps", "1", "--out", out])
    return out


def test_train_lora_on_int8_base_runs_and_resumes(trained, tmp_path, capsys):
    args = ["--init", trained, "--preset", "test", "--batch-size", "2", "--log-every", "1", "--lora-r", "4",
            "--base-dtype", "int8", "--max-steps", "2", "--lr", "5e-3"]
    with pytest.raises(SystemExit):  # merging needs float weights: refused before anything is loaded
        train.main(args + ["--out", str(tmp_path / "merged"), "--export", str(tmp_path / "x"), "--merge"])
    assert "--merge needs float base weights" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "merged")
    out, cut = str(tmp_path / "int8"), str(tmp_path / "cut")
    train.main(args + ["--out", out])
    losses = logged(out)
    print(f"train.py --base-dtype int8: losses {losses}")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    train.main(args + ["--out", cut, "--stop-at", "1"])  # --resume: the adapter loads onto the int8 base again
    train.main(args + ["--out", cut, "--resume"])
    assert logged(cut) == losses


def logged(out):
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]
