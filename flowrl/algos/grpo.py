"""GRPO for flow policies: group-relative episode advantages, no critic.

Each iteration resets the envs so that every ``group_size`` consecutive envs start from the same
scene, runs one episode each (``ceil(max_episode_steps / H')`` chunk steps), and gives every
chunk of an episode the advantage ``(R − mean_group)/(std_group + 1e−6)``. Chunks after an
env's first episode ended are dropped. The ratio comes from the configured likelihood:
FPO's CFM-loss ratio, Flow-Noise's chain log-prob or Flow-SDE's single transition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from flowrl.algos import losses as L
from flowrl.algos.base import Batch, cat_obs, masks_for, to_policy_obs
from flowrl.algos.flow_ppo import FlowNoisePPO, FlowSDEPPO
from flowrl.algos.fpo import FPO
from flowrl.config import AlgoConfig
from flowrl.dist import all_gather_int, any_rank
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
    #: ``(rank, every rank's sample count)`` of the last rollout when ``world > 1`` (gathered at its end): the
    #: minibatches of ranks with unequal batches are balanced over the ranks (see :meth:`minibatches`)
    rank_samples: tuple[int, list[int]] | None = None

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
        self.rank_samples = None
        if self.world > 1:  # a collective, as the early stop above
            self.rank_samples = (torch.distributed.get_rank(), all_gather_int(len(out), self.world))
        return out, env.reset(seed=self.iteration_seed + 10**6)

    # ------------------------------------------------------------------ minibatches balanced over the ranks
    def _parts_per_epoch(self, batch: Batch) -> int | None:
        """Minibatches per epoch on every rank when the ranks' batches (of the last rollout) differ in size;
        None when they agree (or on one rank): then the shared drop-last minibatches of ``minibatch_size``."""
        if self.rank_samples is None:
            return None
        rank, ns = self.rank_samples
        if ns[rank] != len(batch):  # the ranks would split batches they did not agree on
            raise RuntimeError(f"GRPO.minibatches: a batch of {len(batch)} samples, but this rank's last rollout "
                               f"(whose sizes the ranks exchanged) gave {ns[rank]}")
        if len(set(ns)) == 1:
            return None
        mb = self.cfg.minibatch_size
        return max(math.ceil(k / mb) for k in ns)

    def num_minibatches(self, batch: Batch) -> int:
        c = self._parts_per_epoch(batch)
        return super().num_minibatches(batch) if c is None else self.cfg.epochs * c

    def minibatches(self, batch: Batch) -> Iterator[Batch]:
        """As :meth:`Algorithm.minibatches`, except on ranks whose batches differ in size (each rank's batch
        holds its own envs' episodes, of unequal lengths).

        Every rank takes the same number of optimizer steps (each reduces the gradients over the ranks), so each
        epoch splits every rank's shuffled samples into the same ``c = max over ranks of ceil(n_r /
        minibatch_size)`` minibatches: nothing is left out and no minibatch exceeds ``minibatch_size``. The
        engine averages the ranks' gradients with equal weights; the loss of rank r's j-th minibatch (a mean
        over its ``s_rj`` samples) is scaled by ``loss_weight = W·s_rj / Σ_r' s_r'j``, so each minibatch step's
        gradient is the mean over all its samples of all ranks, as on one rank (with ``grad_accum > 1`` the
        engine then averages a window's minibatch steps equally, as it does on one rank). A rank with fewer samples than
        ``c`` still runs its empty minibatches' forward and backward (ZeRO-3's parameter gathers are collectives),
        on one sample with ``loss_weight`` 0.
        """
        c = self._parts_per_epoch(batch)
        if c is None:
            yield from super().minibatches(batch)
            return
        _, ns = self.rank_samples  # type: ignore[misc]
        n, W = len(batch), len(ns)
        # torch.tensor_split gives the first k mod c parts one sample more: every rank knows every part's size
        totals = [sum(k // c + (j < k % c) for k in ns) for j in range(c)]
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(n, generator=self.gen)
            for j, part in enumerate(torch.tensor_split(perm, c)):
                if len(part):
                    mb = batch.select(part)
                    mb.loss_weight = W * len(part) / totals[j]
                else:
                    mb = batch.select(perm[:1])
                    mb.loss_weight = 0.0
                yield mb

    def loss(self, policy: Any, mb: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = super().loss(policy, mb)  # type: ignore[misc]
        return (loss if mb.loss_weight == 1.0 else loss * mb.loss_weight), stats


_CLASSES = {
    key: type(f"GRPO_{key}", (_GRPOMixin, base), {"__doc__": f"GRPO with the {key} likelihood."})
    for key, base in _LIKELIHOODS.items()
}


def GRPO(cfg: AlgoConfig, seed: int = 0, reset_seed: int | None = None) -> Any:
    """GRPO with the likelihood ``cfg.grpo_likelihood`` (FPO / Flow-Noise / Flow-SDE). ``seed``: its sampling
    generator's; ``reset_seed`` (default ``seed``): the base of its per-iteration env reset seeds."""
    return _CLASSES[cfg.grpo_likelihood](cfg, seed, reset_seed)
