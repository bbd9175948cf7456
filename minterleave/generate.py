"""Autoregressive generation with a preallocated KV cache (gpt-fast style).

    prefill:      the whole prompt (text + image features) in one pass -> cache + last logits
    decode_step:  one new token per sequence, attending to everything cached
    sample:       greedy, or temperature / top-k / top-p with a seeded generator

Batches of prompts of different lengths are left-padded; positions are counted from the
attention mask, so each row gets exactly the tokens it would get alone.
"""

import torch

from .decoder import KVCache


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) float -> next token ids (B,). temperature 0 means greedy (argmax)."""
    if not temperature or temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # mass before this token already enough
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, input_ids, pixel_values, attention_mask, cache):
    """Run the prompt through the model, filling `cache`; logits of the last position (B, V)."""
    return model(input_ids, pixel_values, attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]


def decode_step(model, tokens, attention_mask, cache):
    """tokens (B,) -> logits (B, V) for the next position; attention_mask covers cache + token."""
    return model(tokens[:, None], attention_mask=attention_mask, cache=cache, last_only=True)[:, -1]


def generate(model, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=64, temperature=0.0,
             top_k=None, top_p=None, seed=None, eos_token_id=None, pad_token_id=None, stream=None):
    """New token ids (B, n), n <= max_new_tokens; rows that finished early are padded.

    eos_token_id: an id or a list of ids that end a row (default: the checkpoint's
    generation_config.json). stream: called with the (B,) new tokens after every step.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    limit = model.cfg.text.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit}")
    if eos_token_id is None:
        eos_token_id = getattr(model, "eos_token_ids", [])
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       dtype=torch.long, device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: the plain causal path

    cache = KVCache(model.cfg.text, B, T + max_new_tokens, model.dtype, model.device)
    logits = prefill(model, input_ids, pixel_values, attention_mask, cache)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = token.masked_fill(done, pad)
        out[:, step] = token
        if stream is not None:
            stream(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            return out[:, : step + 1]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        logits = decode_step(model, token, attention_mask, cache)
    return out[:, :0]
