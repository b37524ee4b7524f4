"""Small heads on the policy's features: the Flow-Noise std head and value-head ensembles."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowrl.models.gemma import linear_f32

__all__ = ["NoiseHead", "ValueEnsemble"]


class NoiseHead(nn.Module):
    """Flow-Noise: per-element std of a denoising transition from the expert's action-token features.

    ``s = exp(½·(log s_min² + (log s_max² − log s_min²)·(tanh(h) + 1)/2))`` with ``h`` from a
    2-layer MLP (DESIGN §1), so ``s ∈ [s_min, s_max]``. The last layer starts at zero (``s`` at the
    geometric middle of the bounds).
    """

    def __init__(self, width: int, hidden: int, action_dim: int, std_min: float, std_max: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, action_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.log_var_min = 2.0 * math.log(std_min)
        self.log_var_max = 2.0 * math.log(std_max)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: ``(B, H, W)`` → std ``(B, H, D)`` float32 in ``[s_min, s_max]``."""
        h = linear_f32(self.fc2, F.silu(linear_f32(self.fc1, feats)))  # float32 whatever the weights' dtype
        log_var = self.log_var_min + (self.log_var_max - self.log_var_min) * (torch.tanh(h) + 1.0) / 2.0
        return torch.exp(0.5 * log_var)


class ValueEnsemble(nn.Module):
    """M independent value MLPs ``W → hidden → hidden → 1`` evaluated as one batched op.

    Weights are stacked ``(M, ·, ·)`` (one bmm per layer for the whole ensemble).
    """

    def __init__(self, width: int, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

        def init(fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
            bound = 1.0 / math.sqrt(fan_in)
            w = torch.empty(num_heads, fan_in, fan_out).uniform_(-bound, bound)
            b = torch.empty(num_heads, 1, fan_out).uniform_(-bound, bound)
            return nn.Parameter(w), nn.Parameter(b)

        self.w1, self.b1 = init(width, hidden)
        self.w2, self.b2 = init(hidden, hidden)
        self.w3, self.b3 = init(hidden, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: ``(B, W)`` → values ``(B, M)`` float32."""
        x = feats.to(self.w1.dtype)[None].expand(self.num_heads, -1, -1)  # (M, B, W), in the weights' dtype
        x = F.silu(torch.baddbmm(self.b1, x, self.w1))
        x = F.silu(torch.baddbmm(self.b2, x, self.w2))
        return torch.baddbmm(self.b3, x, self.w3)[..., 0].transpose(0, 1).float()
