"""VLA-FPO (DESIGN §1): a flow-based latent actor steering a frozen π0 through its noise space.

π0 stays frozen. A small flow model ``π_θ(x | s)`` (the *latent actor*) generates the initial
noise latent ``x (H, D)`` that π0's own ODE then decodes into the action chunk. Pieces, each
switchable for an ablation (config ``algo.vla_*``):

* **Actor**: a velocity MLP ``v_θ(x_τ, τ | s)`` over the flattened latent of the env's real
  action dims ``(H·A_env)`` (π0's noise in the padded dims, which only pass through attention,
  stays a fresh ``N(0, I)`` draw: the actor steers what it can credit), conditioned on
  ``s`` = [π0's pooled prefix features, state]. Sampling: ``vla_latent_steps`` (K) Euler steps
  from ``N(0, I)`` (multi-step latent exploration: ``x^(k+1) = x^(k) + η·v_θ(x^(k), τ^(k) | s)``
  with step ``vla_eta/K``, η = 1 walking the whole flow, plus Gaussian exploration noise of std
  ``vla_explore`` on the result).
* **Per-sample CFM signal**: at rollout, N (τ, ε) pairs are drawn per sample and the actor's
  CFM losses ``ℓ_old`` on the exact latent used for control are stored; at update
  ``Δℓ = ℓ_old − ℓ_new`` and the ratio (``vla_ratio``, see :func:`vla_ratio`): the paper's
  ``ρ = exp(β·z)``, ``z = (Δℓ − mean)/std`` over the minibatch (β = ``vla_beta``), or
  ``ρ = exp(β·Δℓ)``; clipped surrogate (``vla_clip``) with minibatch-standardized advantages.
  With the standardized ratio, z has unit std whatever the step size, so β alone sets the share
  of clipped samples (β = 1 clips ~84 % at ε = 0.2, hence its default β = 0.1) and clipping bounds
  no update: on the built-in task it collapses at lr 2e-3 where the absolute ratio learns
  (benchmarks/RESULTS.md); flowrl/configs/reach_vla_fpo.yaml uses the absolute one.
  The gradient flows through ρ (the paper says it stops it there, which would leave the actor
  without a gradient; we keep it and note the choice).
* **Q-ensemble critic**: M = ``vla_ensemble`` heads ``Q_i(s, x)``; TD targets
  ``y = r + γ·(1 − done)·min_i Q̄_i(s', x')`` with ``x' ~ π_θ(·|s')`` and Polyak-averaged target
  networks (``vla_tau``); advantages by GAE with ``V(s) = min_i Q_i(s, x̂(s))``, ``x̂`` the
  actor's exploration-free latent; a sliding window of the last two rollouts for the critic.

Numbers the paper does not give (β, ε, K, η, M, γ, learning rates) are config fields with the
defaults of :class:`flowrl.config.AlgoConfig`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flowrl.algos import losses as L
from flowrl.algos.base import Algorithm, Batch, cat_obs, masks_for, to_device, to_policy_obs
from flowrl.algos.fpo import sample_tau
from flowrl.algos.onpolicy import episode_stats
from flowrl.envs.base import EnvObs, VecEnv

__all__ = ["VLAFPO", "LatentActor", "QEnsemble", "vla_ratio"]


def vla_ratio(delta: torch.Tensor, beta: float, kind: str = "standardized", clamp: float = 3.0) -> torch.Tensor:
    """The latent actor's per-sample ratio ``(n,)`` from its CFM-loss improvements ``delta (n,)``.

    * ``"standardized"`` (the paper's form): ``exp(β·z)``, ``z = (Δℓ − mean)/std`` over the
      minibatch. z has unit std whatever the size of the update, so clipping bounds only the
      tails (β·|z| > ε), never the update itself; and at the first minibatch of an iteration
      Δℓ ≈ 0, so z is rounding noise divided by ~1e-6.
    * ``"absolute"``: ``exp(β·Δℓ)``, FPO's per-sample ratio on the latent actor: ρ = 1 when the
      actor has not moved and leaves ``[1 − ε, 1 + ε]`` as it moves, so the clipped surrogate is
      a trust region. ``β·Δℓ`` is clamped to ``±clamp`` before the exponential, as FPO clamps
      its log-ratio (without clipping, the ablation, the ratio would otherwise overflow).
    """
    if kind == "absolute":
        return torch.exp((beta * delta).clamp(-clamp, clamp))
    if kind == "standardized":
        z = (delta - delta.mean()) / (delta.std(unbiased=False) + 1e-6)
        return torch.exp(beta * z)
    raise ValueError(f"vla_ratio: expected 'standardized' or 'absolute', got {kind!r}")


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, o))


class LatentActor(nn.Module):
    """Velocity field ``v_θ(x_τ, τ | s)`` over flattened latents ``(B, H·D)``."""

    def __init__(self, cond_dim: int, latent_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.net = _mlp(cond_dim + latent_dim + 16, hidden, latent_dim)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @staticmethod
    def _temb(tau: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=tau.device))
        ang = tau[..., None] * freqs * math.pi
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x ``(n, L)``, tau ``(n,)``, cond ``(n, C)`` → velocity ``(n, L)`` float32 (the MLP runs in its
        weights' dtype: bf16 under DeepSpeed's bf16 mode)."""
        h = torch.cat([x, self._temb(tau), cond], dim=-1)
        return self.net(h.to(self.net[0].weight.dtype)).float()

    def sample(self, cond: torch.Tensor, steps: int, eta: float, gen: torch.Generator | None = None,
               z0: torch.Tensor | None = None) -> torch.Tensor:
        """Multi-step latent generation from ``N(0, I)``: K Euler steps of size ``eta/K`` (t: 1 → 0)."""
        n = cond.shape[0]
        x = z0 if z0 is not None else to_device(torch.randn(n, self.latent_dim, generator=gen), cond.device)
        dt = eta / steps
        for k in range(steps):
            tau = torch.full((n,), 1.0 - k / steps, device=cond.device)
            x = x - dt * self(x, tau, cond)
        return x

    def cfm_losses(self, x: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Per-pair CFM losses ``(n, N)`` of latents ``x (n, L)`` with ``noise (n, N, L)``, ``tau (n, N)``."""
        n, N, Ld = noise.shape
        xt = tau[..., None] * noise + (1 - tau[..., None]) * x[:, None]
        v = self(xt.reshape(n * N, Ld), tau.reshape(-1), cond.repeat_interleave(N, 0)).view(n, N, Ld)
        return ((v - (noise - x[:, None])) ** 2).mean(-1)


class QEnsemble(nn.Module):
    """M critics ``Q_i(s, x)`` → ``(n, M)``."""

    def __init__(self, cond_dim: int, latent_dim: int, m: int, hidden: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(_mlp(cond_dim + latent_dim, hidden, 1) for _ in range(m))

    def forward(self, cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """cond ``(n, C)``, x ``(n, L)`` → ``(n, M)`` float32 (each head in its weights' dtype)."""
        h = torch.cat([cond, x], dim=-1)
        return torch.cat([q(h.to(q[0].weight.dtype)).float() for q in self.heads], dim=-1)


class _Modules(nn.Module):
    """What the DeepSpeed engine trains for VLA-FPO (π0 itself stays frozen)."""

    def __init__(self, actor: LatentActor, critic: QEnsemble) -> None:
        super().__init__()
        self.actor = actor
        self.value_critic = critic  # "value" in the name: the trainer gives it the critic learning rate


class VLAFPO(Algorithm):
    name = "vla_fpo"

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        super().__init__(cfg, seed)
        self.modules: _Modules | None = None
        self.target: QEnsemble | None = None
        self.window: list[Batch] = []
        self.dims: tuple[int, int] | None = None
        self.dim_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------ setup
    def trainable_module(self, policy: Any, env: VecEnv) -> nn.Module:
        """Build the latent actor and the Q-ensemble; freeze π0 entirely."""
        c = policy.config
        for p in policy.parameters():
            p.requires_grad_(False)
        dev = next(policy.parameters()).device
        cond_dim = c.vlm_width + c.max_state_dim
        self.dim_mask = masks_for(env, policy, dev)[0] if env is not None else torch.ones(
            c.action_dim, dtype=torch.bool, device=dev)
        latent = c.action_horizon * int(self.dim_mask.sum())
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=self.gen)))
        actor = LatentActor(cond_dim, latent, self.cfg.vla_hidden)
        critic = QEnsemble(cond_dim, latent, max(1, self.cfg.vla_ensemble), self.cfg.vla_hidden)
        self.modules = _Modules(actor, critic).to(dev)
        self.target = copy.deepcopy(critic).requires_grad_(False)
        self.dims = (cond_dim, latent)
        return self.modules

    def after_engine_init(self) -> None:
        """Copy the critic into the target Q-heads again once the engine has broadcast rank 0's weights: each rank
        built its critic from its own generator, so the copy :meth:`trainable_module` made differs between the
        ranks, and every rank's TD targets would come from another network (on one rank: no change)."""
        assert self.modules is not None and self.target is not None
        self.target.load_state_dict(self.modules.value_critic.state_dict())

    def _cond(self, policy: Any, obs: EnvObs, dev: torch.device) -> tuple[Any, torch.Tensor]:
        pobs = to_policy_obs(obs.to(dev), policy)
        cache = policy.encode_prefix(pobs)
        state = pobs.state if pobs.state is not None else torch.zeros(
            pobs.batch_size, policy.config.max_state_dim, device=dev)
        return cache, torch.cat([cache.pooled.float(), state.float()], dim=-1).detach()

    def _pi0_noise(self, x: torch.Tensor, gen: torch.Generator, base: torch.Tensor | None = None) -> torch.Tensor:
        """π0's initial noise ``(B, H, D)``: the latent ``x (B, H·A_env)`` in the real action dims,
        ``base (B, H, D)`` (written in place; by default a fresh ``N(0, I)`` draw from ``gen``) in the
        padded ones."""
        assert self.dim_mask is not None
        B, D = x.shape[0], self.dim_mask.shape[0]
        H = x.shape[1] // int(self.dim_mask.sum())
        noise = base if base is not None else to_device(torch.randn(B, H, D, generator=gen), x.device)
        noise[:, :, self.dim_mask] = x.view(B, H, -1).to(noise.dtype)
        return noise

    def _latent(self, cond: torch.Tensor, explore: bool) -> torch.Tensor:
        assert self.modules is not None
        x = self.modules.actor.sample(cond, self.cfg.vla_latent_steps, self.cfg.vla_eta, self.gen)
        if explore:
            # drawn even at vla_explore = 0: the generator's stream does not depend on the setting
            x = x + self.cfg.vla_explore * to_device(torch.randn(x.shape, generator=self.gen), x.device)
        return x

    def _value(self, cond: torch.Tensor) -> torch.Tensor:
        """V(s) ``(B,)`` from the ensemble-min Q: at the actor's noise-free latent, or (``vla_value_samples``
        = S > 0) averaged over S latents drawn as the rollout draws them."""
        assert self.modules is not None
        S = self.cfg.vla_value_samples
        with torch.no_grad():
            if S > 0:
                cs = cond.repeat_interleave(S, 0)
                return self.modules.value_critic(cs, self._latent(cs, explore=True)).amin(dim=1).view(-1, S).mean(1)
            x_hat = self.modules.actor.sample(cond, self.cfg.vla_latent_steps, self.cfg.vla_eta,
                                              z0=torch.zeros(cond.shape[0], self.dims[1], device=cond.device))
            return self.modules.value_critic(cond, x_hat).amin(dim=1)

    @torch.no_grad()
    def eval_noise(self, policy: Any, obs: EnvObs, gen: torch.Generator) -> torch.Tensor:
        """π0's initial noise ``(B, H, D)`` from the actor's exploration-free latents, for evaluation.

        Paired with π0's own evaluation: one ``N(0, I)`` draw ``(B, H, D)`` from ``gen``, exactly
        the draw :func:`flowrl.eval.eval_actions` gives π0; its real action dims are the actor's
        ``z0`` and its padded dims stay as drawn. An untrained actor (zero last layer: the identity
        map) therefore reproduces π0's evaluation exactly, and a trained one is compared with π0 on
        the same scenes *and* the same noise draws.
        """
        assert self.modules is not None and self.dim_mask is not None
        dev = next(policy.parameters()).device
        _, cond = self._cond(policy, obs, dev)
        c = policy.config
        base = to_device(torch.randn(cond.shape[0], c.action_horizon, c.action_dim, generator=gen), dev)
        z0 = base[:, :, self.dim_mask].reshape(cond.shape[0], -1)
        x = self.modules.actor.sample(cond, self.cfg.vla_latent_steps, self.cfg.vla_eta, z0=z0)
        return self._pi0_noise(x, gen, base=base)

    # ------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, env: VecEnv, policy: Any, obs: EnvObs) -> tuple[Batch, EnvObs]:
        if self.modules is None:
            raise RuntimeError("VLAFPO.rollout: call trainable_module(policy, env) first")
        dev = next(policy.parameters()).device
        masks_for(env, policy, dev)  # dimension checks
        T, N = self.cfg.rollout_chunks, self.cfg.fpo_pairs
        assert self.modules is not None

        def act(o: EnvObs) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
            cache, cond = self._cond(policy, o, dev)
            x = self._latent(cond, explore=True)  # (B, H·D)
            actions = policy.sample_actions(cache, mode="ode", num_steps=self.cfg.num_steps,
                                            noise=self._pi0_noise(x, self.gen),
                                            return_chain=False).actions.float()
            B = x.shape[0]
            noise = to_device(torch.randn(B, N, x.shape[1], generator=self.gen), dev)
            tau = to_device(sample_tau((B, N), self.gen), dev)
            old = self.modules.actor.cfm_losses(x, cond, noise, tau)
            return actions, {"cond": cond, "latent": x, "loss_old": old, "noise": noise, "tau": tau}, self._value(cond)

        obs_l, stores, vals, steps = [], [], [], []
        for o, (_, store, v), step in env.step_chunks(act, obs, T):
            obs_l.append(o)
            stores.append(store)
            vals.append(v)
            steps.append(step)
        obs = steps[-1].obs
        _, last_cond = self._cond(policy, obs, dev)
        last_v = self._value(last_cond)
        R = torch.stack([s.reward for s in steps]).to(dev).float()
        D = torch.stack([s.done for s in steps]).to(dev)
        V = torch.stack(vals)
        adv, ret = L.gae(R, V, D, last_v, self.cfg.gamma, self.cfg.lam)
        data = {k: torch.cat([s[k] for s in stores]) for k in stores[0]}
        data.update(adv=adv.reshape(-1), ret=ret.reshape(-1), reward=R.reshape(-1), done=D.reshape(-1).float(),
                    next_cond=torch.cat([*(s["cond"] for s in stores[1:]), last_cond]))
        stats = episode_stats(steps)
        stats.update(explained_variance=L.explained_variance(V.reshape(-1), ret.reshape(-1)),
                     env_steps=float(env.num_envs * T * env.chunk_steps))
        batch = Batch(cat_obs(obs_l), data, stats)
        self.window = [*self.window[-1:], batch]  # sliding window: this and the previous rollout
        return batch, obs

    def minibatches(self, batch: Batch) -> Iterator[Batch]:
        # the actor trains on the new rollout; the critic also sees the previous one
        both = Batch(batch.obs, {k: torch.cat([b.data[k] for b in self.window]) for k in batch.data}, batch.stats)
        n_new, n = len(batch), both.data["cond"].shape[0]
        mb = min(self.cfg.minibatch_size, n_new)
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(n_new, generator=self.gen)
            for s in range(0, n_new - mb + 1, mb):
                idx = perm[s : s + mb]
                cidx = torch.randint(n, (mb,), generator=self.gen)
                yield Batch(batch.obs, {**{k: v[idx] for k, v in batch.data.items()},
                                        **{f"c_{k}": v[cidx] for k, v in both.data.items()}})

    # ------------------------------------------------------------------ update
    def loss(self, modules: Any, mb: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        d = mb.data
        actor, critic = modules.actor, modules.value_critic
        new = actor.cfm_losses(d["latent"], d["cond"], d["noise"], d["tau"])  # (n, N)
        delta = (d["loss_old"] - new).mean(dim=1)
        ratio = vla_ratio(delta, self.cfg.vla_beta, self.cfg.vla_ratio, self.cfg.fpo_clamp)
        adv = L.normalize(d["adv"])
        if self.cfg.vla_clip and self.cfg.vla_spo:
            pl = L.spo_policy_loss(ratio, adv, self.cfg.clip, self.cfg.spo_advantages)
            pst = {"clip_frac": ((ratio - 1).abs() > self.cfg.clip).float().mean(), "ratio_mean": ratio.mean().detach()}
        elif self.cfg.vla_clip:
            pl, pst = L.ppo_policy_loss(ratio, adv, self.cfg.clip, None)  # FPO's surrogate: no dual clip
        else:
            pl = -(ratio * adv).mean()
            pst = {"clip_frac": torch.zeros(()), "ratio_mean": ratio.mean().detach()}
        # critic: TD(0) targets from the target ensemble at the actor's next latent
        with torch.no_grad():
            x_next = actor.sample(d["c_next_cond"], self.cfg.vla_latent_steps, self.cfg.vla_eta, self.gen)
            q_next = self.target(d["c_next_cond"], x_next).amin(dim=1)
            y = d["c_reward"] + self.cfg.gamma * (1 - d["c_done"]) * q_next
        q = critic(d["c_cond"], d["c_latent"])
        ql = torch.nn.functional.huber_loss(q, y[:, None].expand_as(q))
        loss = pl + ql
        stats = {"policy_loss": float(pl.detach()), "value_loss": float(ql.detach()),
                 "clip_frac": float(pst["clip_frac"]), "ratio_mean": float(pst["ratio_mean"]),
                 "ratio_max": float(ratio.detach().max()), "cfm_loss": float(new.detach().mean()),
                 "ensemble_disagreement": float(q.detach().std(dim=1).mean()) if q.shape[1] > 1 else 0.0}
        return loss, stats

    def after_step(self) -> None:
        """Polyak update of the target critics (call after each optimizer step)."""
        assert self.modules is not None and self.target is not None
        tau = self.cfg.vla_tau
        with torch.no_grad():
            for pt, p in zip(self.target.parameters(), self.modules.value_critic.parameters()):
                pt.mul_(1 - tau).add_(p.detach(), alpha=tau)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.target is not None:
            sd["target"] = self.target.state_dict()
        sd["window"] = [(b.obs, b.data) for b in self.window]
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if "target" in sd and self.target is not None:
            self.target.load_state_dict(sd["target"])
        self.window = [Batch(o, d) for o, d in sd.get("window", [])]
