"""SigLIP vision tower (a plain pre-LayerNorm ViT without CLS token).

pixels (N, 3, S, S) -> 14x14 patches by a strided conv -> + learned position embeddings ->
L encoder blocks (bidirectional attention, GELU-tanh MLP). LLaVA-Interleave takes the output of
the last block as the image feature, *before* `post_layernorm`: the checkpoint ships that
LayerNorm but never uses it (docs/checkpoint-layouts.md), so this module does not even build it.
References: Zhai et al. 2023 "Sigmoid Loss for Language Image Pre-Training" (SigLIP);
Dosovitskiy et al. 2020 (ViT); transformers' modeling_siglip.py for the exact layer order.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import attend
from .config import VisionConfig
from .decoder import skip_init_on_meta


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        N, T, C = x.shape
        q = self.q_proj(x).view(N, T, self.n_head, self.head_dim).transpose(1, 2)  # (N, nh, T, hs)
        k = self.k_proj(x).view(N, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(N, T, self.n_head, self.head_dim).transpose(1, 2)
        y = attend(q, k, v, causal=False)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(N, T, C))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        """num_layers: how many encoder blocks to build (those after the feature layer are never run)."""
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size,
                                               _weight=skip_init_on_meta(cfg.num_patches, cfg.hidden_size))
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(num_layers))
        self.grad_checkpoint = False  # Model.set_grad_checkpointing: recompute each layer in backward

    def forward(self, pixel_values):
        """pixel_values (N, 3, S, S) -> features (N, P, C), P = (S // patch)^2."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, S/p, S/p)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C)
        x = x + self.position_embedding.weight  # (P, C) broadcast over images
        for block in self.layers:
            if self.grad_checkpoint and torch.is_grad_enabled():  # keep only each layer's input; redo the rest
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def sincos_2d(grid, dim):
    """(grid * grid, dim) fixed 2D sine-cosine position table (MAE): half the channels encode the row,
    half the column, each at dim / 4 frequencies. Used to initialise a tower trained from scratch."""
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        a = coord[:, None] * omega[None, :]
        parts += [a.sin(), a.cos()]
    pe = torch.cat(parts, dim=1)
    return F.pad(pe, (0, dim - pe.shape[1])).float()
