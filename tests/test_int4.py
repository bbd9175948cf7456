"""Int4 (and int8) weight-only decoders: the kernel computes the dequantised weights, quantizing while loading
gives the same model as quantizing a loaded one, quantized checkpoints round-trip exactly, and the logits stay
close to float (greedy tokens equal on the bundled model)."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import minterleave as mi
from minterleave.int4 import Int4Linear, bytes_to_nibbles, quantize_groups
from minterleave.qcheckpoint import save_quantized
from minterleave.quantize import Int8Embedding, Int8Linear, quantize
from test_model import interleaved_prompt
from tiny_model import hf_model, save_checkpoint

BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "minterleave-tiny")


@pytest.mark.parametrize("group", [32, 64, 128])
def test_groups_round_trip_and_kernel_is_the_dequantised_matmul(group):
    torch.manual_seed(0)
    w = torch.randn(200, 256) * 0.05  # 200 rows: not a multiple of the kernel's 64-row blocks (padded)
    q, s, z = quantize_groups(w, group, torch.float32)
    assert q.min() >= 0 and q.max() <= 15
    deq = ((q.float().view(200, -1, group) - 8) * s[..., None] + z[..., None]).view(200, 256)
    assert ((deq - w).abs().view(200, -1, group) <= s[..., None] / 2 + 1e-6).all()  # half a step at most
    m = Int4Linear.from_weight(w, group)
    x = torch.randn(3, 7, 256)
    y = m(x)
    assert y.shape == (3, 7, 200)
    assert torch.allclose(y, x @ deq.t(), rtol=1e-5, atol=1e-5)
    plain = m.plain()  # the checkpoint form: two columns a byte, even column in the low nibble
    assert plain["qweight"].shape == (200, 128) and torch.equal(bytes_to_nibbles(plain["qweight"]), q)
    again = Int4Linear(256, 200, group, dtype=torch.float32).load_plain(**plain)
    assert torch.equal(again(x), y)


def test_bad_group_sizes_are_refused():
    with pytest.raises(ValueError, match="group size 16"):
        Int4Linear.from_weight(torch.randn(64, 64), 16)
    with pytest.raises(ValueError, match="96 input features are not a multiple of the int4 group size 64"):
        Int4Linear.from_weight(torch.randn(64, 96), 64)
    with pytest.raises(ValueError, match="int8 is per output row"):
        quantize(None, "int8", 32)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize(None, "int3")


def dequantised(model, scheme, group):
    """`model` (float) with every matrix the quantized decoder reads replaced by its dequantised values: what
    the int8/int4 kernels must compute, up to the summation order."""
    from minterleave.quantize import quantize_rows, targets

    def deq(w):
        if scheme == "int8":
            q, s = quantize_rows(w)
            return q.float() * s.to(w.dtype).float()[:, None]
        q, s, z = quantize_groups(w, group, w.dtype)
        return ((q.float().view(w.shape[0], -1, group) - 8) * s.float()[..., None] + z.float()[..., None]).view(w.shape)

    dec = model.decoder
    with torch.no_grad():
        for parent, attr, _ in targets(dec):
            getattr(parent, attr).weight.copy_(deq(getattr(parent, attr).weight))
        emb = dec.embed_tokens.weight
        if dec.lm_head is None:  # the quantized model's head is its own copy (int8: the same rows)
            dec.lm_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False, dtype=emb.dtype)
            dec.lm_head.weight.copy_(deq(emb))
        else:
            dec.lm_head.weight.copy_(deq(dec.lm_head.weight))
        q, s = quantize_rows(emb)  # the lookup: int8 rows in both schemes
        emb.copy_(q.float() * s.to(emb.dtype).float()[:, None])
    return model


@pytest.mark.parametrize("scheme,group,tied", [("int8", None, True), ("int4", 32, False), ("int4", 128, True)])
def test_quantized_while_loading_equals_quantized_after_and_round_trips(tmp_path, tied, scheme, group):
    hf = hf_model(seed=4, tied=tied, kv_heads=2, image_size=28, hidden=128, inter=256, vocab=1000, image_token=999)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))
    dtype = torch.bfloat16
    ref = mi.Model.from_pretrained(path, dtype=dtype)
    after = quantize(mi.Model.from_pretrained(path, dtype=dtype), scheme, group)
    loading = mi.Model.from_pretrained(path, dtype=dtype, quantize=scheme, group_size=group)
    dec = loading.decoder
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert isinstance(dec.layers[0].mlp.down_proj, kind) and isinstance(dec.lm_head, kind)  # the head too
    assert isinstance(dec.embed_tokens, Int8Embedding)
    ids, pixels = interleaved_prompt(hf, n_images=2)
    with torch.no_grad():
        r, a, b = ref(ids, pixels), after(ids, pixels), loading(ids, pixels)
    assert torch.equal(a, b)
    with torch.no_grad():
        expected = dequantised(mi.Model.from_pretrained(path, dtype=dtype), scheme, group)(ids, pixels)
    off = ((b - expected).abs().max() / expected.abs().max()).item()
    drift = ((b - r).abs().max() / r.abs().max()).item()
    print(f"{scheme} g{group} tied={tied}: vs dequantised {off:.4f}; vs float: drift {drift:.4f}, argmax "
          f"agreement {(b.argmax(-1) == r.argmax(-1)).float().mean().item():.2f}")
    assert off < 0.05  # bf16 rounding of activations only (random weights amplify it; float drift is ~10x more)

    out = save_quantized(loading, str(tmp_path / "q"), path)
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)["minterleave_quantization"]
    assert saved["scheme"] == scheme and saved["group_size"] == group
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = list(f.keys())
        # no float copy of any decoder matrix in the file (only norms and biases stay float)
        floats = [n for n in names if n.startswith("decoder.") and f.get_slice(n).get_dtype() in ("BF16", "F32")]
        assert all(n.endswith(("norm.weight", ".bias", ".scales", ".zeros")) for n in floats), floats
    size = lambda folder: os.path.getsize(os.path.join(folder, "model.safetensors"))  # noqa: E731
    assert size(out) < size(path)
    back = mi.Model.from_pretrained(out, dtype=dtype)
    assert back.quantization == {"scheme": scheme, "group_size": group}
    with torch.no_grad():
        assert torch.equal(back(ids, pixels), b)
    assert back.generate(ids, pixels, max_new_tokens=6).tolist() == \
        loading.generate(ids, pixels, max_new_tokens=6).tolist()
    other = "int4" if scheme == "int8" else "int8"
    with pytest.raises(ValueError, match=f"holds a {scheme} checkpoint"):
        mi.Model.from_pretrained(out, quantize=other)


def test_bundled_model_greedy_answers_survive_quantization():
    """The bundled model answers a question of each domain with the same greedy tokens at 8 and 4 bits."""
    from minterleave import tasks
    from minterleave.data import prompt_for
    proc = mi.Processor.from_pretrained(BUNDLED)
    models = {"float": mi.Model.from_pretrained(BUNDLED), "int8": mi.Model.from_pretrained(BUNDLED, quantize="int8"),
              "int4": mi.Model.from_pretrained(BUNDLED, quantize="int4", group_size=32)}
    for i, domain in enumerate(tasks.DOMAINS):  # evaluation-range seeds (< 1e9): never seen in training
        sample = tasks.make_sample(domain, 4242 + i, image_size=proc.image_size)
        inputs = proc(prompt_for(proc, sample.question), images=sample.images, num_frames=len(sample.images),
                      multi_patch=sample.multi_patch)
        answers = {k: m.generate(**inputs, max_new_tokens=4).tolist() for k, m in models.items()}
        assert answers["int8"] == answers["float"] and answers["int4"] == answers["float"], (domain, answers)
