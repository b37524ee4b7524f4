"""Gemma building blocks with Gemma's exact math (the π0 VLM and action expert).

* RMSNorm ``x·rsqrt(mean(x²) + eps)·(1 + w)`` computed in float32, returned in x's dtype; the
  adaptive variant (π0.5 adaRMS) takes ``(scale, shift, gate)`` from a ``dense`` layer on a
  condition: ``x̂·(1 + scale) + shift`` and a gated residual ``x + gate·y``.
* GeGLU MLP ``down(gelu_tanh(gate(x))·up(x))``.
* RoPE θ = 10⁴, rotate-half, cos/sin computed in float32 and cast to the activations' dtype.

Parameter names follow transformers' Gemma (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``), so checkpoints map by prefix only (see :mod:`flowrl.models.weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GemmaAttentionProj", "GemmaLayer", "GemmaMLP", "GemmaStack", "RMSNorm", "apply_rope", "linear_f32",
           "rope_cos_sin"]


def linear_f32(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` computed in the layer's parameter dtype, returned as float32.

    The policy's small projections and heads are float32 islands by default, but a wrapper may cast
    every parameter (DeepSpeed's bf16 mode, ``policy.to(torch.bfloat16)``): the input follows the
    weight's dtype, the output is float32 for the float32 math around it. ``x (..., in)`` → ``(..., out)``.
    """
    return lin(x.to(lin.weight.dtype)).float()


class RMSNorm(nn.Module):
    """Gemma RMSNorm, optionally adaptive (adaRMS).

    Plain: parameter ``weight (W,)``. Adaptive: ``dense: Linear(cond_dim, 3W)`` giving
    ``(scale, shift, gate)``; :meth:`modulation` computes them once per condition so that callers
    can precompute them for a time grid.
    """

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.eps = eps
        self.dim = dim
        self.adaptive = cond_dim is not None
        if self.adaptive:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)
        else:
            self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().square().mean(-1, keepdim=True)
        return x.float() * torch.rsqrt(var + self.eps)

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``cond (..., cond_dim)`` → ``(scale, shift, gate)``, each ``(..., W)`` (float32 dense)."""
        scale, shift, gate = linear_f32(self.dense, cond).chunk(3, dim=-1)
        return scale, shift, gate

    def forward(
        self, x: torch.Tensor, mod: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: ``(B, S, W)``; mod: ``(scale, shift, gate)`` broadcastable to ``(B, S, W)`` (adaptive only).

        Returns ``(normed in x.dtype, gate in x.dtype or None)``.
        """
        normed = self._norm(x)
        if not self.adaptive:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if mod is None:
            raise ValueError("RMSNorm: an adaptive norm needs its (scale, shift, gate) modulation")
        scale, shift, gate = mod
        normed = normed * (1 + scale.float()) + shift.float()
        return normed.to(x.dtype), gate.to(x.dtype)


class GemmaMLP(nn.Module):
    """GeGLU MLP with tanh-approximated gelu (Gemma's ``gelu_pytorch_tanh``)."""

    def __init__(self, width: int, mlp_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaAttentionProj(nn.Module):
    """The q/k/v/o projections of one Gemma attention (no bias); the attention itself is joint."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=False)


class GemmaLayer(nn.Module):
    """One decoder layer's weights: norms, attention projections, MLP."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 cond_dim: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(width, eps, cond_dim)
        self.self_attn = GemmaAttentionProj(width, num_heads, num_kv_heads, head_dim)
        self.post_attention_layernorm = RMSNorm(width, eps, cond_dim)
        self.mlp = GemmaMLP(width, mlp_dim)


class GemmaStack(nn.Module):
    """``depth`` layers and a final norm (one expert: the VLM or the action expert)."""

    def __init__(self, width: int, mlp_dim: int, depth: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, cond_dim: int | None = None):
        super().__init__()
        self.width = width
        self.layers = nn.ModuleList(
            GemmaLayer(width, mlp_dim, num_heads, num_kv_heads, head_dim, eps, cond_dim) for _ in range(depth)
        )
        self.norm = RMSNorm(width, eps, cond_dim)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: int ``(B, S)`` → cos, sin ``(B, S, 1, head_dim)`` in ``dtype`` (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``(B, S, heads, d)``; rotate-half RoPE."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
