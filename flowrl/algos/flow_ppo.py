"""π_RL's Flow-Noise PPO and Flow-SDE PPO (DESIGN §1): exact log-likelihoods of the chain.

* Flow-Noise: every denoising step is stochastic with a learned std (the policy's noise
  head); the chain's joint log-prob (initial N(0, I) term included) gives the ratio.
* Flow-SDE (hybrid): per sample one random step k* is an SDE step, the others ODE; the
  action's log-prob is that single transition.

Rollout stores the chain (B, K+1, H, D) and the old log-prob; the update recomputes the K
velocities (one prefix pass) under the current weights via ``policy.chain_logprob``.
"""

from __future__ import annotations

from typing import Any

import torch

from flowrl.algos.base import Batch, to_device
from flowrl.algos.onpolicy import OnPolicy

__all__ = ["FlowNoisePPO", "FlowSDEPPO"]


class _ChainPPO(OnPolicy):
    mode = ""

    def _steps(self, B: int, dev: torch.device) -> torch.Tensor | None:
        return None

    def sample(self, policy: Any, pobs: Any, dim_mask: torch.Tensor, step_mask: torch.Tensor):
        cfg = policy.config
        B = pobs.batch_size
        dev = dim_mask.device
        x0 = to_device(torch.randn(B, cfg.action_horizon, cfg.action_dim, generator=self.gen), dev)
        steps = self._steps(B, dev)
        res = policy.sample_actions(
            pobs, mode=self.mode, num_steps=self.cfg.num_steps, noise=x0, sde_steps=steps,
            noise_level=self.cfg.noise_level, return_chain=True, generator=self.gen,
        )
        lp = policy.chain_logprob(pobs, res.chain, mode=self.mode, steps=steps, noise_level=self.cfg.noise_level,
                                  dim_mask=dim_mask, step_mask=step_mask, reduce=self.cfg.logprob_reduce).float()
        store = {"chain": res.chain, "logp_old": lp}
        if steps is not None:
            store["steps"] = steps
        return res.actions.float(), store

    def ratio(self, policy: Any, pobs: Any, mb: Batch, dim_mask: torch.Tensor, step_mask: torch.Tensor):
        lp = policy.chain_logprob(pobs, mb.data["chain"], mode=self.mode, steps=mb.data.get("steps"),
                                  noise_level=self.cfg.noise_level, dim_mask=dim_mask, step_mask=step_mask,
                                  reduce=self.cfg.logprob_reduce).float()
        log_ratio = (lp - mb.data["logp_old"]).clamp(-20, 20)
        return torch.exp(log_ratio), {"logp": float(lp.detach().mean())}


class FlowNoisePPO(_ChainPPO):
    name = "flow_noise_ppo"
    mode = "noise"


class FlowSDEPPO(_ChainPPO):
    name = "flow_sde_ppo"
    mode = "sde"

    def _steps(self, B: int, dev: torch.device) -> torch.Tensor:
        return to_device(torch.randint(self.cfg.num_steps, (B,), generator=self.gen), dev)
