"""Qwen2 decoder (the language model of LLaVA-Interleave) with a preallocated KV cache.

Per block: h += o_proj(attention(RMSNorm(h))); h += down(silu(gate(x)) * up(x)), x = RMSNorm(h).
Attention: q/k/v projections with bias, o_proj without; rotary position embeddings (RoPE,
rotate-half convention, theta from the config); grouped-query attention when the config has
fewer key/value heads than query heads; causal.
References: Qwen2 technical report (Yang et al. 2024); RoFormer (Su et al. 2021);
transformers' modeling_qwen2.py for the exact order of casts; gpt-fast for the cache.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attend
from .config import TextConfig


def skip_init_on_meta(*shape):
    """An empty weight when modules are built on the meta device (from_pretrained), so that
    nn.Embedding skips its random init there: on meta tensors that init pulls in torch._dynamo
    (about 1 s and 170 MB) to produce values that the checkpoint overwrites anyway."""
    return torch.empty(shape) if torch.get_default_device().type == "meta" else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (a bf16 mean of squares loses too much), scale in the input dtype;
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), bit for bit, in one call instead of five
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float):
    """(head_dim/2,) fp32 rotation frequencies theta^(-2i/d)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(inv_freq, positions, dtype):
    """positions (B, T) long -> cos, sin (B, T, head_dim), computed in fp32 then cast."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): rotate-half pairs dim i with i + hd/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos/sin (B, T, hs)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer, allocated once for the whole request (gpt-fast style).

    k, v: (L, B, n_kv, max_len, hs); `length` tokens are filled. New tokens are written in place,
    so decoding allocates nothing per step.
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store k, v (B, n_kv, T, hs) after the cached tokens; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v in one matmul (checkpoints store them apart; weights.py stacks their rows)
        self.split = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim)
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.split), bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache=None, mask=None):
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # (B, T, (nh + 2 nkv) hs)
        # q and k heads side by side get the same rotation per position: one RoPE for both (fewer small ops)
        qk = qkv[..., :self.split[0] + self.split[1]].view(B, T, self.n_head + self.n_kv, self.head_dim)
        q, k = apply_rope(qk.transpose(1, 2), cos, sin).split((self.n_head, self.n_kv), dim=1)  # (B, nh|nkv, T, hs)
        v = qkv[..., self.split[0] + self.split[1]:].view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, cached + T, hs)
        y = attend(q, k, v, causal=True, mask=mask)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        # gate and up in one matmul (stacked rows, see weights.py)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache=None, mask=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=skip_init_on_meta(
            cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # tied: the output head is the embedding matrix itself (no second copy)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # kept out of the state dict and out of .to(dtype): frequencies must stay fp32
        self._inv_freq = {}
        self.grad_checkpoint = False  # Model.set_grad_checkpointing: recompute each layer in backward

    def forward(self, h, positions, cache=None, mask=None):
        """h (B, T, C) input embeddings, positions (B, T) -> final hidden states (B, T, C).

        With a cache, h holds only the new tokens; keys/values of earlier ones come from the cache.
        mask: optional bool (B, 1, T, cached + T), True = may attend (left padding).
        """
        if h.device not in self._inv_freq:
            self._inv_freq[h.device] = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).to(h.device)
        cos, sin = rope_cos_sin(self._inv_freq[h.device], positions, h.dtype)
        for block in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():  # keep only each layer's input; redo the rest
                h = checkpoint(block, h, cos, sin, cache, mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, cache, mask)
        if cache is not None:
            cache.length += h.shape[1]
        return self.norm(h)

    def logits(self, h):
        if self.lm_head is None:  # tied: the embedding matrix is the output head
            return F.linear(h, self.embed_tokens.weight)  # (B, T, vocab)
        return self.lm_head(h)
