"""The multimodal projector: vision features -> the decoder's embedding space.

LLaVA-1.5's "mlp2x_gelu": Linear(vision_dim -> hidden), exact (erf) GELU, Linear(hidden -> hidden),
both with bias. Reference: Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning".
"""

import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    def __init__(self, vision_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x):  # (N, P, vision_dim) -> (N, P, hidden)
        x = x.to(self.linear_1.weight.dtype)  # a projector trained in fp32 on a bf16 tower (lora.train_projector)
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact GELU, not the tanh one of the ViT
