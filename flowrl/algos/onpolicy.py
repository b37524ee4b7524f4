"""The on-policy core shared by FPO, Flow-Noise PPO, Flow-SDE PPO and GRPO.

Rollout: ``rollout_chunks`` chunk steps of every env; per chunk the algorithm's ``sample``
draws the action chunk and stores what its ratio needs (log-probs, or FPO's per-sample CFM
losses), the critic's value is recorded (ensemble minimum), then GAE over chunks (DESIGN §1:
chunk reward = sum of executed steps' rewards, done = any). GRPO replaces GAE with group-
normalized episode returns. Update: the PPO clipped surrogate (or FPO's clip / SPO form) with
normalized advantages, plus a Huber value loss with value clipping for the critic.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from flowrl.algos import losses as L
from flowrl.algos.base import Algorithm, Batch, cat_obs, masks_for, to_policy_obs
from flowrl.envs.base import ChunkStep, EnvObs, VecEnv

__all__ = ["OnPolicy", "episode_stats"]


def episode_stats(steps: list[ChunkStep]) -> dict[str, float]:
    """Episodes that ended in ``steps``: their count, success rate and mean return (one host read)."""
    done = torch.stack([s.done for s in steps])
    succ = (torch.stack([s.success for s in steps]) & done).sum()
    ret = torch.where(done, torch.stack([s.episode_return for s in steps]).float(), 0.0).sum()
    n, k, r = torch.stack([done.sum().float(), succ.float(), ret]).tolist()
    return {"episodes": n, "success_rate": k / n if n else float("nan"), "return": r / n if n else float("nan")}


class OnPolicy(Algorithm):
    """Shared rollout + update; subclasses define ``sample`` and ``ratio``."""

    uses_critic = True

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.masks: tuple[torch.Tensor, torch.Tensor] | None = None  # the env's (dim_mask, step_mask)

    @abc.abstractmethod
    def sample(self, policy: Any, pobs: Any, dim_mask: torch.Tensor, step_mask: torch.Tensor
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Action chunks ``(B, H, D)`` and per-sample tensors to store for the ratio."""

    @abc.abstractmethod
    def ratio(self, policy: Any, pobs: Any, mb: Batch, dim_mask: torch.Tensor, step_mask: torch.Tensor
              ) -> tuple[torch.Tensor, dict[str, float]]:
        """Probability ratios ``(n,)`` (or ``(n, N)``) of the minibatch under the current weights."""

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, env: VecEnv, policy: Any, obs: EnvObs) -> tuple[Batch, EnvObs]:
        """``rollout_chunks`` chunks of every env → a Batch of ``rollout_chunks · num_envs`` samples.

        The per-chunk work (prefix pass, sampling, critic) is ``act``; ``env.step_chunks`` runs it
        and the env steps, group by group on a :class:`~flowrl.envs.PipelinedEnv`. No host-device
        sync here: the env's outputs stay where the env made them until the loop is over.
        """
        dev = next(policy.parameters()).device
        dim_mask, step_mask = self.masks = masks_for(env, policy, dev)  # reused by loss()

        def act(o: EnvObs) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
            cache = policy.encode_prefix(to_policy_obs(o.to(dev), policy))  # one prefix pass per chunk
            actions, store = self.sample(policy, cache, dim_mask, step_mask)
            if self.uses_critic:
                heads = self.critic(policy, cache).float()  # (B, M)
                store = {**store, "old_values": heads}  # each head's value clip is centred on its own
                v = heads.amin(dim=1)  # GAE's baseline: the ensemble min
            else:
                v = torch.zeros(actions.shape[0], device=dev)
            return actions, store, v

        T = self.cfg.rollout_chunks
        obs_list, stores, values, steps = [], [], [], []
        for o, (actions, store, v), step in env.step_chunks(act, obs, T):
            obs_list.append(o)
            stores.append({"actions": actions, **store})
            values.append(v)
            steps.append(step)
        obs = steps[-1].obs
        pobs = to_policy_obs(obs.to(dev), policy)
        last_v = self.critic(policy, pobs).amin(dim=1).float() if self.uses_critic else torch.zeros_like(values[0])
        R, D = (torch.stack([getattr(s, k) for s in steps]).to(dev) for k in ("reward", "done"))  # (T, B)
        V = torch.stack(values)
        adv, ret = self.advantages(R, V, D, last_v)
        # flatten time-major (T, B) -> T·B in the same order as cat_obs
        data = {k: torch.cat([s[k] for s in stores]) for k in stores[0]}
        data.update(adv=adv.reshape(-1), ret=ret.reshape(-1))
        stats = episode_stats(steps)
        stats.update(explained_variance=L.explained_variance(V.reshape(-1), ret.reshape(-1)),
                     env_steps=float(env.num_envs * T * env.chunk_steps))
        return Batch(cat_obs(obs_list), data, stats), obs

    def advantages(self, R: torch.Tensor, V: torch.Tensor, D: torch.Tensor, last_v: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return L.gae(R, V, D, last_v, self.cfg.gamma, self.cfg.lam)

    # ------------------------------------------------------------------ update
    def loss(self, policy: Any, mb: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dev = next(policy.parameters()).device
        if self.masks is None:
            raise RuntimeError(f"{type(self).__name__}.loss: call rollout() first (it sets the env's action masks)")
        dim_mask, step_mask = self.masks
        pobs = policy.encode_prefix(to_policy_obs(mb.obs.to(dev), policy))  # shared by ratio and critic
        adv = L.normalize(mb.data["adv"]) if self.normalize_advantages else mb.data["adv"]
        ratio, stats = self.ratio(policy, pobs, mb, dim_mask, step_mask)
        if ratio.dim() == 2:  # FPO's per-sample ratios (n, N) share their chunk's advantage
            adv = adv[:, None].expand_as(ratio)
        if getattr(self, "spo", False):
            pl = L.spo_policy_loss(ratio, adv, self.clip, self.cfg.spo_advantages)
            pstats = {"clip_frac": ((ratio - 1).abs() > self.clip).float().mean(), "ratio_mean": ratio.mean().detach()}
        else:
            pl, pstats = L.ppo_policy_loss(ratio, adv, self.clip, self.cfg.dual_clip if self.dual_clip_ok else None)
        loss = pl
        if self.uses_critic:
            v = self.critic(policy, pobs).float()  # (n, M): every head regresses the return
            old = mb.data["old_values"]  # (n, M): each head clipped around its own rollout value
            ret = mb.data["ret"][:, None].expand_as(v)
            vl = L.value_loss(v, old, ret, self.cfg.value_clip)
            loss = loss + vl
            stats["value_loss"] = float(vl.detach())
            stats["ensemble_disagreement"] = float(v.std(dim=1).mean().detach()) if v.shape[1] > 1 else 0.0
        log_ratio = torch.log(ratio.detach().clamp_min(1e-12))
        stats.update(
            policy_loss=float(pl.detach()),
            approx_kl=float(((ratio.detach() - 1) - log_ratio).mean()),
            clip_frac=float(pstats["clip_frac"]),
            ratio_mean=float(pstats["ratio_mean"]),
            ratio_max=float(ratio.detach().max()),
            ratio_min=float(ratio.detach().min()),
        )
        return loss, stats

    def critic(self, policy: Any, obs_or_cache: Any) -> torch.Tensor:
        """The critic's ensemble values ``(B, M)``: on the action expert for π0 (the state enters
        there), on the VLM for π0.5 (the state is in the prefix), as π_RL does; ``algo.critic_side``
        overrides. ``algo.critic_detach=false`` lets the value loss train the features too."""
        side = self.cfg.critic_side
        if side == "auto":
            side = "expert" if policy.config.variant == "pi0" else "vlm"
        return policy.value(obs_or_cache, side=side, detach=self.cfg.critic_detach)

    #: PPO's minibatch advantage normalization (DESIGN §1); GRPO's group advantages are used as they are
    normalize_advantages = True
    #: PPO's dual clip (``algo.dual_clip``) for likelihood ratios; FPO's surrogate has none (DESIGN §1)
    dual_clip_ok = True

    @property
    def clip(self) -> float:
        return self.cfg.clip

