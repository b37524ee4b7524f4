"""GRPO for flow policies: group-relative episode advantages, no critic.

Each iteration resets the envs so that every ``group_size`` consecutive envs start from the same
scene, runs one episode each (``ceil(max_episode_steps / H')`` chunk steps), and gives every
chunk of an episode the advantage ``(R − mean_group)/(std_group + 1e−6)``. Chunks after an
env's first episode ended are dropped. The ratio comes from the configured likelihood:
FPO's CFM-loss ratio, Flow-Noise's chain log-prob or Flow-SDE's single transition.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowrl.algos import losses as L
from flowrl.algos.base import Batch, cat_obs, masks_for, to_policy_obs
from flowrl.algos.flow_ppo import FlowNoisePPO, FlowSDEPPO
from flowrl.algos.fpo import FPO
from flowrl.config import AlgoConfig
from flowrl.dist import any_rank
from flowrl.envs.base import EnvObs, VecEnv

__all__ = ["GRPO"]

_LIKELIHOODS = {"fpo": FPO, "flow_noise": FlowNoisePPO, "flow_sde": FlowSDEPPO}
#: the iteration's reset seeds are ``_RESET_SEED_BASE + reset_seed·7919 + k`` (iteration k): apart from the trainer's
#: other reset seeds (``seed·1000``, ``+1`` after SFT) and its evaluation's (``seed + 77 + round``), so that no
#: GRPO iteration trains on the evaluation's scenes (with base 0, seed 0's iteration 77 did)
_RESET_SEED_BASE = 1_000_000_007


class _GRPOMixin:
    """GRPO's rollout and advantages on top of a likelihood's ``sample`` / ``ratio``."""

    normalize_advantages = False  # the group advantages (R − mean)/(std + 1e−6) as they are (DESIGN §1)
    #: ranks that run the rollout together (the trainer sets it): > 1 makes it a collective, every rank runs the
    #: chunks until every rank's episodes are over; 1 (the default) runs this process's envs alone
    world = 1

    name = "grpo"
    uses_critic = False

    def __init__(self, cfg: AlgoConfig, seed: int, reset_seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        # the trainer passes the run's seed on every rank: build_env's env_offset already separates the ranks' scenes
        self.iteration_seed = _RESET_SEED_BASE + (seed if reset_seed is None else reset_seed) * 7919

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "iteration_seed": self.iteration_seed}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        self.iteration_seed = int(sd.get("iteration_seed", self.iteration_seed))

    @torch.no_grad()
    def rollout(self, env: VecEnv, policy: Any, obs: EnvObs) -> tuple[Batch, EnvObs]:
        """One episode of every env from a fresh reset (``group_size`` envs per scene).

        Per chunk, the only host read is whether any env is still in its first episode (from
        the env's done flags, on the env's device: the host for LIBERO), to stop early; with
        ``world > 1`` (set by the trainer) that is asked of every rank (a collective).
        """
        G = self.cfg.group_size
        if getattr(env, "group_size", 1) != G:
            raise ValueError(f"GRPO needs an env built with group_size={G} (same scene per group), "
                             f"got {getattr(env, 'group_size', 1)}")
        self.iteration_seed += 1
        obs = env.reset(seed=self.iteration_seed)
        dev = next(policy.parameters()).device
        dim_mask, step_mask = self.masks = masks_for(env, policy, dev)

        def act(o: EnvObs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            cache = policy.encode_prefix(to_policy_obs(o.to(dev), policy))
            return self.sample(policy, cache, dim_mask, step_mask)

        T = math.ceil(env.max_episode_steps / env.chunk_steps)
        B = env.num_envs
        alive = torch.ones(B, dtype=torch.bool, device=env.device)
        ret = torch.zeros(B, device=env.device)
        success = torch.zeros(B, dtype=torch.bool, device=env.device)
        obs_list, stores, keep = [], [], []
        for o, (actions, store), step in env.step_chunks(act, obs, T):
            obs_list.append(o)
            stores.append({"actions": actions, **store})
            keep.append(alive.clone())
            ret += torch.where(alive, step.reward.float(), 0.0)
            success |= alive & step.success
            alive &= ~step.done
            # every env's first episode is over, on every rank (under ZeRO-3 each policy forward is a collective);
            # a PipelinedEnv drops the steps in flight
            if not any_rank(bool(alive.any()), self.world):
                break
        adv_env = L.grpo_advantages(ret.cpu(), G)
        n_t = len(stores)
        data = {k: torch.cat([s[k] for s in stores]) for k in stores[0]}
        data["adv"] = adv_env.repeat(n_t).to(dev)
        mask = torch.cat(keep).cpu()
        batch = Batch(cat_obs(obs_list), data, {
            "episodes": float(B), "success_rate": float(success.float().mean()),
            "return": float(ret.mean()), "env_steps": float(B * n_t * env.chunk_steps),
        })
        out = batch.select(mask.nonzero()[:, 0])
        out.stats = batch.stats
        return out, env.reset(seed=self.iteration_seed + 10**6)


_CLASSES = {
    key: type(f"GRPO_{key}", (_GRPOMixin, base), {"__doc__": f"GRPO with the {key} likelihood."})
    for key, base in _LIKELIHOODS.items()
}


def GRPO(cfg: AlgoConfig, seed: int = 0, reset_seed: int | None = None) -> Any:
    """GRPO with the likelihood ``cfg.grpo_likelihood`` (FPO / Flow-Noise / Flow-SDE). ``seed``: its sampling
    generator's; ``reset_seed`` (default ``seed``): the base of its per-iteration env reset seeds."""
    return _CLASSES[cfg.grpo_likelihood](cfg, seed, reset_seed)
