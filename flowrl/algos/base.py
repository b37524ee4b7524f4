"""The interface every algorithm implements, and the pieces they share.

An algorithm is driven by the trainer as::

    batch = algo.rollout(env, policy)        # no gradients; env steps + policy sampling
    for mb in algo.minibatches(batch):       # epochs x minibatches
        loss, stats = algo.loss(policy, mb)  # differentiable
        engine.backward(loss); engine.step()
    metrics = algo.metrics(batch)

Observations go to the policy as :class:`flowrl.models.Observation` with the state padded to
the policy's ``max_state_dim``; action chunks come back padded to the policy's ``action_dim``
and the env takes the first ``env.action_dim`` dims of the first H' steps. Losses and
log-probs use ``dim_mask`` (the env's real dims) and ``step_mask`` (the H' executed steps).
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from flowrl.config import AlgoConfig
from flowrl.envs.base import EnvObs, VecEnv, cat_obs

__all__ = ["Algorithm", "Batch", "cat_obs", "masks_for", "to_device", "to_policy_obs"]


def to_policy_obs(obs: EnvObs, policy: Any) -> Any:
    """EnvObs → the policy's Observation (state zero-padded to ``max_state_dim``)."""
    from flowrl.models import Observation

    cfg = policy.config
    state = None  # π0.5 takes no state input (see the README's note on π0.5 and the state)
    if cfg.variant == "pi0":
        state = obs.state
        if state.shape[1] > cfg.max_state_dim:
            raise ValueError(f"the env's state has {state.shape[1]} dims, more than the policy's "
                             f"max_state_dim={cfg.max_state_dim}")
        state = torch.nn.functional.pad(state, (0, cfg.max_state_dim - state.shape[1]))
    return Observation(images=obs.images, image_masks=obs.image_masks, tokens=obs.tokens,
                       token_masks=obs.token_masks, state=state)


def masks_for(env: VecEnv, policy: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``dim_mask (D,)`` bool for the env's real action dims, ``step_mask (H,)`` for the H' executed steps."""
    cfg = policy.config
    if env.action_dim > cfg.action_dim:
        raise ValueError(f"the env has {env.action_dim} action dims, more than the policy's "
                         f"action_dim={cfg.action_dim}")
    if env.chunk_steps > cfg.action_horizon:
        raise ValueError(f"the env executes {env.chunk_steps} steps per chunk, more than the policy's "
                         f"action_horizon={cfg.action_horizon}")
    dim_mask = torch.arange(cfg.action_dim, device=device) < env.action_dim
    step_mask = torch.arange(cfg.action_horizon, device=device) < env.chunk_steps
    return dim_mask, step_mask


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (noise drawn from a CPU generator) on ``device`` without a host-device sync.

    A plain ``.to(cuda)`` of pageable memory blocks the host until the copy (hence all work
    queued before it) is done; a copy from pinned memory is queued like a kernel. The pinned
    buffer is kept alive by torch's caching host allocator until the copy has run.
    """
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@dataclass
class Batch:
    """Flat training samples (one per chunk), tensors with a leading sample dim ``n``."""

    obs: EnvObs
    data: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    #: the factor a minibatch's loss is scaled by (1 but for GRPO's minibatches on ranks of unequal batches, see
    #: :meth:`flowrl.algos.grpo._GRPOMixin.minibatches`)
    loss_weight: float = 1.0

    def __len__(self) -> int:
        """Samples: the leading dim of ``data`` (VLA-FPO's minibatches keep the whole rollout's
        ``obs`` beside a minibatch of ``data``), of ``obs`` when there is no data."""
        if self.data:
            return int(next(iter(self.data.values())).shape[0])
        return self.obs.state.shape[0]

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(self.obs.index(idx), {k: v[idx.to(v.device)] for k, v in self.data.items()}, self.stats)


class Algorithm(abc.ABC):
    """One RL (or offline) algorithm: rollout → advantages → update epochs → metrics."""

    name: str = ""
    on_policy: bool = True

    def __init__(self, cfg: AlgoConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)

    @abc.abstractmethod
    def rollout(self, env: VecEnv, policy: Any, obs: EnvObs) -> tuple[Batch, EnvObs]:
        """Collect a batch starting from ``obs``; return it and the env's next observation."""

    @abc.abstractmethod
    def loss(self, policy: Any, mb: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The differentiable loss of one minibatch and its statistics."""

    def minibatches(self, batch: Batch) -> Iterator[Batch]:
        """``epochs`` passes over ``batch`` in shuffled minibatches of ``minibatch_size`` (drop-last: the
        ``n mod minibatch_size`` samples left over by an epoch's shuffle wait for the next epoch's; all
        minibatches have one size, so every update step weighs its samples alike)."""
        n = len(batch)
        mb = min(self.cfg.minibatch_size, n)
        for _ in range(self.cfg.epochs):
            perm = torch.randperm(n, generator=self.gen)
            for s in range(0, n - mb + 1, mb):
                yield batch.select(perm[s : s + mb])

    def num_minibatches(self, batch: Batch) -> int:
        """How many minibatches :meth:`minibatches` yields for ``batch`` (the trainer's gradient
        accumulation windows are planned with it)."""
        n = len(batch)
        return self.cfg.epochs * (n // min(self.cfg.minibatch_size, n)) if n else 0

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.gen.set_state(sd["gen"])
