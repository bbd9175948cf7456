"""Generation: token parity with transformers, cache == recomputation, batching, sampling."""

import pytest
import torch

import minterleave as mi
from minterleave.decoder import KVCache
from minterleave.generate import sample
from test_model import interleaved_prompt
from tiny_model import hf_model, save_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_model(seed=3, kv_heads=2, tied=True, image_size=70)
    path = save_checkpoint(hf, str(tmp_path_factory.mktemp("gen") / "ckpt"))
    return hf, mi.Model.from_pretrained(path)


def test_greedy_tokens_match_transformers(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=3)
    n = 24
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, do_sample=False,
                          pad_token_id=0)[:, ids.shape[1]:]
    ours = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n)
    assert ours.shape == (1, n)
    assert ours.tolist() == ref.tolist()


def test_cached_decoding_equals_recomputation(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=2)
    ids_more = torch.cat([ids, torch.tensor([[5, 17, 42, 8]])], dim=1)
    with torch.no_grad():
        full = model(ids_more, pixels)  # (1, T + 4, V) in one pass
        cache = KVCache(model.cfg.text, 1, ids_more.shape[1], model.dtype, model.device)
        steps = [model(ids, pixels, cache=cache)]
        for t in range(ids.shape[1], ids_more.shape[1]):
            steps.append(model(ids_more[:, t:t + 1], cache=cache))
    cached = torch.cat(steps, dim=1)
    assert (cached - full).abs().max() <= 1e-5


def test_batched_generation_equals_one_by_one(pair):
    hf, model = pair
    prompts = [interleaved_prompt(hf, n_images=k, seed=10 + k) for k in (1, 2, 3)]
    T = max(p[0].shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (p_ids, _) in enumerate(prompts):  # left padding
        ids[row, T - p_ids.shape[1]:] = p_ids[0]
        mask[row, T - p_ids.shape[1]:] = 1
    pixels = torch.cat([p[1] for p in prompts])
    batched = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=12)
    for row, (p_ids, p_px) in enumerate(prompts):
        alone = model.generate(p_ids, p_px, max_new_tokens=12)
        assert batched[row].tolist() == alone[0].tolist()


def test_stops_at_eos_and_pads(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=1)
    free = model.generate(ids, pixels, max_new_tokens=10)[0].tolist()
    stop = free[3]
    out = model.generate(ids, pixels, max_new_tokens=10, eos_token_id=[stop])[0].tolist()
    assert out == free[: free.index(stop) + 1]


def test_seeded_sampling_is_reproducible(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=1)
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.9)
    a = model.generate(ids, pixels, seed=7, **kw)
    b = model.generate(ids, pixels, seed=7, **kw)
    c = model.generate(ids, pixels, seed=8, **kw)
    greedy = model.generate(ids, pixels, max_new_tokens=16)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist() or a.tolist() != greedy.tolist()


def test_streaming_callback_sees_every_token(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=1)
    seen = []
    out = model.generate(ids, pixels, max_new_tokens=6, stream=lambda tok: seen.append(int(tok[0])))
    assert seen == out[0].tolist()


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits).tolist() == [3]
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    # top_p: p(3) = 0.64, p(2) = 0.24: 0.5 keeps only the best, 0.8 keeps two
    assert {int(sample(logits, 1.0, top_p=0.5, generator=g)) for _ in range(100)} == {3}
    assert {int(sample(logits, 1.0, top_p=0.8, generator=g)) for _ in range(300)} == {2, 3}


def test_context_limit_is_an_error(pair):
    hf, model = pair
    ids, pixels = interleaved_prompt(hf, n_images=1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model.generate(ids, pixels, max_new_tokens=model.cfg.text.max_position_embeddings)
