"""Int8 weight-only quantisation: small, measured logit drift; the same greedy answer mostly."""

import pytest
import torch

import minterleave as mi
from minterleave.quantize import quantize_int8, quantize_rows
from test_model import interleaved_prompt
from tiny_model import hf_model, save_checkpoint


def test_rows_round_trip_within_half_a_step():
    w = torch.randn(64, 32)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_logit_drift(tmp_path, tied, dtype):
    hf = hf_model(seed=4, tied=tied, kv_heads=2, image_size=28)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))
    ref_model = mi.Model.from_pretrained(path, dtype=dtype)
    model = quantize_int8(mi.Model.from_pretrained(path, dtype=dtype))
    ids, pixels = interleaved_prompt(hf, n_images=2)
    with torch.no_grad():
        ref, ours = ref_model(ids, pixels), model(ids, pixels)
    drift = ((ours - ref).abs().max() / ref.abs().max()).item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"int8 (tied={tied}, {dtype}): relative logit drift {drift:.4f}, argmax agreement {agree:.2f}")
    assert drift < 0.1 and agree > 0.7  # random tiny weights: a loose bound; bench.py measures the 0.5B

    # the int8 kernels compute exactly the dequantised model: same weights rounded, in float
    fake = mi.Model.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        for name, p in fake.decoder.named_parameters():
            if p.ndim == 2:  # every matrix of the decoder (and the tied/untied head) was quantised
                q, s = quantize_rows(p)
                p.copy_(q.float() * s.to(dtype).float()[:, None])
        expected = fake(ids, pixels)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < tol
    out = model.generate(ids, pixels, max_new_tokens=5)  # the decode path runs on int8 weights
    assert out.shape == (1, 5)


def test_packed_bf16_decoder_is_bit_identical(tmp_path):
    from minterleave.packing import PackedLinear, can_pack
    hf = hf_model(seed=6, tied=False, kv_heads=2, image_size=28)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))
    plain = mi.Model.from_pretrained(path, dtype=torch.bfloat16)
    if not can_pack(plain.decoder.norm.weight):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    packed = mi.Model.from_pretrained(path, dtype=torch.bfloat16).prepare_for_inference(path)
    assert isinstance(packed.decoder.layers[0].mlp.gate_up_proj, PackedLinear)
    assert isinstance(packed.decoder.lm_head, PackedLinear)
    ids, pixels = interleaved_prompt(hf, n_images=2)
    with torch.no_grad():
        assert torch.equal(packed(ids, pixels), plain(ids, pixels))
    assert packed.generate(ids, pixels, max_new_tokens=8).tolist() == plain.generate(ids, pixels, max_new_tokens=8).tolist()


def test_a_matrix_packed_in_blocks_of_rows_gives_the_same_bits():
    """An output head is packed in blocks of rows (less memory while packing): same values as F.linear."""
    from minterleave.packing import PackedLinear, can_pack
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(1000, 96, generator=g).bfloat16(), torch.randn(1000, generator=g).bfloat16()
    if not can_pack(w):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    blocks = PackedLinear(w, b, block_rows=384)
    assert blocks.n_blocks == 3
    for rows in (1, 5):
        x = torch.randn(1, rows, 96, generator=g).bfloat16()
        assert torch.equal(blocks(x), torch.nn.functional.linear(x, w, b))


def test_tied_bf16_head_is_packed_and_embedding_rows_come_from_the_file(tmp_path):
    from minterleave.packing import FileEmbedding, PackedLinear, can_pack
    hf = hf_model(seed=7, tied=True, kv_heads=2, image_size=28)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))  # fp32 on disk: rows are converted on lookup
    plain = mi.Model.from_pretrained(path, dtype=torch.bfloat16)
    if not can_pack(plain.decoder.norm.weight):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    packed = mi.Model.from_pretrained(path, dtype=torch.bfloat16).prepare_for_inference(path)
    assert isinstance(packed.decoder.lm_head, PackedLinear)
    assert isinstance(packed.decoder.embed_tokens, FileEmbedding)  # the packed head is the only copy
    ids, pixels = interleaved_prompt(hf, n_images=2)
    with torch.no_grad():
        assert torch.equal(packed(ids, pixels), plain(ids, pixels))
    assert packed.generate(ids, pixels, max_new_tokens=8).tolist() == plain.generate(ids, pixels, max_new_tokens=8).tolist()

    # an embedding changed in memory (fine-tuned after loading) no longer matches the file: keep it
    edited = mi.Model.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        edited.decoder.embed_tokens.weight[3] += 1
    edited.prepare_for_inference(path)
    assert isinstance(edited.decoder.embed_tokens, torch.nn.Embedding) and edited.decoder.lm_head is None
    # without the checkpoint folder the tied head stays unpacked: nothing says where the rows lie on disk
    unknown = mi.Model.from_pretrained(path, dtype=torch.bfloat16).prepare_for_inference()
    assert isinstance(unknown.decoder.embed_tokens, torch.nn.Embedding) and unknown.decoder.lm_head is None


def test_a_tied_head_is_checked_against_the_file_in_every_block(tmp_path):
    """pack_if_file_holds packs the head block by block as it compares each block with the file: a row that
    differs in the last block still leaves the head unpacked (None), after the earlier blocks were packed."""
    from minterleave import weights
    from minterleave.packing import can_pack, pack_if_file_holds
    hf = hf_model(seed=7, tied=True, kv_heads=2, image_size=28)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))
    model = mi.Model.from_pretrained(path, dtype=torch.bfloat16)
    w = model.decoder.embed_tokens.weight
    if not can_pack(w):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    source = weights.embedding_location(path, model.cfg)
    head = pack_if_file_holds(source, w, block_rows=64)
    assert head.n_blocks == -(-w.shape[0] // 64) > 2 and head.out_features == w.shape[0]
    x = torch.randn(1, 1, w.shape[1]).bfloat16()
    assert torch.equal(head(x), torch.nn.functional.linear(x, w))
    with torch.no_grad():
        w[-1] += 1
    assert pack_if_file_holds(source, w, block_rows=64) is None


@pytest.mark.parametrize("tied", [True, False])
def test_fp32_packed_decoder_keeps_greedy_tokens(tmp_path, tied):
    from minterleave.packing import FileEmbedding, PackedLinear, can_pack
    hf = hf_model(seed=8, tied=tied, kv_heads=2, image_size=28)
    path = save_checkpoint(hf, str(tmp_path / "ckpt"))
    plain = mi.Model.from_pretrained(path)
    if not can_pack(plain.decoder.norm.weight):
        pytest.skip("oneDNN weight packing is not available in this torch build")
    fast = mi.Model.from_pretrained(path).prepare_for_inference(path)
    assert isinstance(fast.decoder.layers[0].self_attn.qkv_proj, PackedLinear)
    assert isinstance(fast.decoder.lm_head, PackedLinear)
    assert isinstance(fast.decoder.embed_tokens, FileEmbedding if tied else torch.nn.Embedding)
    ids, pixels = interleaved_prompt(hf, n_images=2)
    assert fast.generate(ids, pixels, max_new_tokens=8).tolist() == plain.generate(ids, pixels, max_new_tokens=8).tolist()
    with torch.no_grad():
        a, b = fast(ids, pixels), plain(ids, pixels)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5  # another summation order, nothing more
