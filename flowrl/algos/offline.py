"""SFT (flow matching on demonstrations) and ARFM (advantage-weighted flow matching; DESIGN §1).

Both learn from a fixed dataset of (observation, action chunk, return) collected once from the
environment's scripted expert at the configured quality. SFT minimizes the mean per-sample CFM
loss; ARFM weights each sample by ``w = softmax(α·R*)`` over the minibatch, ``R*`` the
leave-one-out advantage (within the sample's task) of the chunk's return-to-go divided by the
remaining steps, and ``α`` solved per batch by bisection. The per-sample loss ``ℓ_i`` is the
mean over the chunk's masked elements (this sets the scale α is solved at).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from flowrl.algos import losses as L
from flowrl.algos.base import Algorithm, Batch, cat_obs, masks_for, to_policy_obs
from flowrl.algos.fpo import draw_pairs
from flowrl.envs.base import EnvObs, VecEnv

__all__ = ["ARFM", "SFT", "collect_demos"]


@torch.no_grad()
def collect_demos(env: VecEnv, horizon: int, action_dim: int, num_episodes: int, gen: torch.Generator,
                  seed: int = 0) -> Batch:
    """Run the env's scripted expert until ``num_episodes`` episodes ended; one sample per chunk.

    Returns a Batch with ``actions (n, horizon, action_dim)`` (zero-padded dims),
    ``ret (n,)`` (return-to-go from the chunk's first step / remaining steps), ``task (n,)``.
    """
    if not hasattr(env, "expert_actions"):
        raise ValueError(f"{type(env).__name__} has no scripted expert: SFT/ARFM on it need a dataset")
    obs = env.reset(seed=seed)
    B = env.num_envs
    per_env: list[list[tuple[EnvObs, torch.Tensor, int]]] = [[] for _ in range(B)]
    samples: list[tuple[EnvObs, torch.Tensor, float, int]] = []
    rewards_so_far = [[] for _ in range(B)]
    ended = 0
    while ended < num_episodes:
        act = env.expert_actions(horizon, gen)  # (B, horizon, A)
        goal = env.goal.clone() if hasattr(env, "goal") else torch.zeros(B, dtype=torch.int64)
        step = env.step(act)
        for i in range(B):
            per_env[i].append((obs.index(torch.tensor([i])), act[i], int(goal[i])))
            rewards_so_far[i].append((float(step.reward[i]), int(step.executed[i])))
            if bool(step.done[i]):
                if ended >= num_episodes:  # more envs than episodes still wanted: drop the extra ones
                    per_env[i], rewards_so_far[i] = [], []
                    continue
                ended += 1
                rs = rewards_so_far[i]
                for k, (o, a, task) in enumerate(per_env[i]):
                    rtg = sum(r for r, _ in rs[k:])
                    remaining = sum(n for _, n in rs[k:])
                    samples.append((o, a, rtg / max(remaining, 1), task))
                per_env[i], rewards_so_far[i] = [], []
        obs = step.obs
    n = len(samples)
    actions = torch.zeros(n, horizon, action_dim)
    actions[:, :, : env.action_dim] = torch.stack([s[1].cpu() for s in samples])
    data = {
        "actions": actions,
        "ret": torch.tensor([s[2] for s in samples]),
        "task": torch.tensor([s[3] for s in samples]),
    }
    return Batch(cat_obs([s[0] for s in samples]), data, {"demo_chunks": float(n)})


class SFT(Algorithm):
    """Flow-matching behaviour cloning on the expert's demonstrations."""

    name = "sft"
    on_policy = False
    weighted = False

    def __init__(self, cfg: Any, seed: int = 0, reset_seed: int | None = None) -> None:
        super().__init__(cfg, seed)
        self.data: Batch | None = None
        self.dim_mask: torch.Tensor | None = None
        self.seed = seed if reset_seed is None else reset_seed  # the demonstrations' env resets (generator: seed)

    def rollout(self, env: VecEnv, policy: Any, obs: EnvObs) -> tuple[Batch, EnvObs]:
        if self.data is None:
            cfg = policy.config
            self.dim_mask, _ = masks_for(env, policy, torch.device("cpu"))
            self.data = collect_demos(env, cfg.action_horizon, cfg.action_dim, self.cfg.num_demos, self.gen,
                                      seed=10_000 + self.seed)
            obs = env.reset(seed=self.seed)
        self.data.stats = {"demo_chunks": float(len(self.data)),
                           "demo_success": float((self.data.data["ret"] > 0).float().mean())}
        return self.data, obs

    def num_minibatches(self, batch: Batch) -> int:
        return max(1, self.cfg.sft_steps)

    def minibatches(self, batch: Batch) -> Iterator[Batch]:
        n = len(batch)
        for _ in range(self.num_minibatches(batch)):  # gradient steps per iteration
            idx = torch.randint(n, (min(self.cfg.sft_batch, n),), generator=self.gen)
            yield batch.select(idx)

    def loss(self, policy: Any, mb: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dev = next(policy.parameters()).device
        cfg = policy.config
        pobs = to_policy_obs(mb.obs.to(dev), policy)
        actions = mb.data["actions"].to(dev)
        B = actions.shape[0]
        noise, tau = draw_pairs(B, 1, cfg.action_horizon, cfg.action_dim, self.gen, dev)
        dim_mask = self.dim_mask.to(dev)
        step_mask = torch.ones(cfg.action_horizon, dtype=torch.bool, device=dev)
        per = policy.cfm_losses(pobs, actions, noise, tau, dim_mask=dim_mask, step_mask=step_mask)[:, 0].float()
        if not self.weighted:
            return per.mean(), {"cfm_loss": float(per.detach().mean())}
        r_star = L.leave_one_out(mb.data["ret"].to(dev).float(), mb.data["task"].to(dev))
        alpha = L.arfm_alpha(r_star, per.detach(), lam=self.cfg.arfm_lambda)
        w = L.arfm_weights(r_star, alpha)
        return (w * per).sum(), {"cfm_loss": float(per.detach().mean()), "arfm_alpha": alpha,
                                 "arfm_w_max": float(w.max())}


    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.data is not None:
            sd["data"] = {"obs": self.data.obs, "data": self.data.data, "dim_mask": self.dim_mask}
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if "data" in sd:
            self.data = Batch(sd["data"]["obs"], sd["data"]["data"])
            self.dim_mask = sd["data"]["dim_mask"]


class ARFM(SFT):
    """Advantage-weighted flow matching on the same offline data as SFT."""

    name = "arfm"
    weighted = True
