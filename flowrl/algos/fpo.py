"""FPO on the policy's own flow (McAllister et al.; DESIGN §1): a likelihood-free ratio.

Rollout: sample the chunk with the ODE, draw N pairs (τ, ε) per chunk, store the per-sample
CFM losses ℓ_i^old under the rollout weights. Update: recompute ℓ_i with the same (τ, ε);
ratio ``exp(mean ℓ^old − mean ℓ^new)`` ("mean", unclamped) or ``ρ_i = exp(clamp(ℓ_i^old − ℓ_i^new, ±c))``
("per_sample": each ρ_i clipped against its chunk's advantage, the objectives averaged over i), then
the clipped surrogate ``−mean min(ρ·Â, clip(ρ, 1 ± fpo_clip)·Â)`` (no dual clip) or the SPO form.
"""

from __future__ import annotations

from typing import Any

import torch

import flowkernels
from flowrl.algos.base import Batch, to_device
from flowrl.algos.onpolicy import OnPolicy

__all__ = ["FPO", "draw_pairs", "sample_tau"]


def sample_tau(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Flow-matching times ``τ = 0.001 + 0.999·Beta(1.5, 1)`` (DESIGN §1).

    Beta(1.5, 1) is sampled by inversion: its CDF is ``u^1.5``, so ``τ' = U^(1/1.5)``.
    """
    u = torch.rand(shape, generator=gen)
    return 0.001 + 0.999 * u ** (1.0 / 1.5)


def draw_pairs(B: int, N: int, H: int, D: int, gen: torch.Generator, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """N (ε, τ) pairs per chunk: ``noise (B, N, H, D)``, ``tau (B, N)``."""
    noise = to_device(torch.randn(B, N, H, D, generator=gen), device)
    return noise, to_device(sample_tau((B, N), gen), device)


class FPO(OnPolicy):
    name = "fpo"
    dual_clip_ok = False  # FPO's surrogate is the plain clipped one (DESIGN §1)

    @property
    def clip(self) -> float:
        return self.cfg.fpo_clip

    @property
    def spo(self) -> bool:
        return self.cfg.fpo_spo

    def sample(self, policy: Any, pobs: Any, dim_mask: torch.Tensor, step_mask: torch.Tensor):
        cfg = policy.config
        B = pobs.batch_size
        dev = dim_mask.device
        x0 = to_device(torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=self.gen), dev)
        res = policy.sample_actions(pobs, mode="ode", num_steps=self.cfg.num_steps, noise=x0, return_chain=False)
        actions = res.actions.float()
        noise, tau = draw_pairs(B, self.cfg.fpo_pairs, cfg.action_horizon, cfg.action_dim, self.gen, dev)
        old = policy.cfm_losses(pobs, actions, noise, tau, dim_mask=dim_mask, step_mask=step_mask).float()
        return actions, {"fpo_noise": noise, "fpo_tau": tau, "loss_old": old}

    def ratio(self, policy: Any, pobs: Any, mb: Batch, dim_mask: torch.Tensor, step_mask: torch.Tensor):
        new = policy.cfm_losses(pobs, mb.data["actions"], mb.data["fpo_noise"], mb.data["fpo_tau"],
                                dim_mask=dim_mask, step_mask=step_mask).float()
        mode = self.cfg.fpo_ratio
        # per_sample: (n, N) ratios, each clipped against its chunk's advantage
        clamp = self.cfg.fpo_clamp if mode == "per_sample" else None  # DESIGN §1: only the per-sample form
        r = flowkernels.fpo_ratio(mb.data["loss_old"], new, mode=mode, clamp=clamp)
        return r, {"cfm_loss": float(new.detach().mean())}
