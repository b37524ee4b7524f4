"""The vectorized environment interface of flowrl: batched reset / step over action chunks.

Every environment (the built-in task, LIBERO) runs ``num_envs`` episodes side by side. A step
takes an action *chunk* per env and executes its first ``chunk_steps`` (H') actions, stopping
early in an env that succeeds. Finished episodes are reset automatically; the observation
returned is then the first observation of the new episode.

Stepping can be split into ``step_async(actions)`` and ``step_wait()`` (the default runs the step
synchronously in ``step_async``), and :meth:`VecEnv.step_chunks` runs the act → step loop of a
rollout; :class:`flowrl.envs.pipeline.PipelinedEnv` overrides it to overlap one group of envs'
stepping with the policy's inference for another group.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flowkernels._checks import value_checks_enabled

__all__ = ["ActFn", "ChunkStep", "EnvObs", "VecEnv", "cat_obs", "cat_outputs"]


@dataclass
class EnvObs:
    """A batch of observations, in the layout the policy takes.

    Attributes:
        images: ``(B, C, 3, S, S)`` float32 in ``[-1, 1]`` (C cameras, upright).
        image_masks: ``(B, C)`` bool, False for a missing camera.
        tokens: ``(B, L)`` int64 instruction token ids (``0`` is padding).
        token_masks: ``(B, L)`` bool, True for real tokens.
        state: ``(B, Ds)`` float32 proprioceptive state.
        instructions: the B instructions as text.
    """

    images: torch.Tensor
    image_masks: torch.Tensor
    tokens: torch.Tensor
    token_masks: torch.Tensor
    state: torch.Tensor
    instructions: list[str] = field(default_factory=list)

    def index(self, idx: torch.Tensor | slice) -> EnvObs:
        """The observations of the envs ``idx`` (a slice or an index tensor)."""
        ins = self.instructions
        if isinstance(idx, slice):
            sel = ins[idx]
        else:
            sel = [ins[i] for i in idx.tolist()] if ins else []
        return EnvObs(self.images[idx], self.image_masks[idx], self.tokens[idx], self.token_masks[idx],
                      self.state[idx], sel)

    def to(self, device: torch.device | str) -> EnvObs:
        return EnvObs(self.images.to(device), self.image_masks.to(device), self.tokens.to(device),
                      self.token_masks.to(device), self.state.to(device), list(self.instructions))


def cat_obs(obs: Sequence[EnvObs]) -> EnvObs:
    """Concatenate observation batches along the batch dim (instructions in order)."""
    return EnvObs(
        torch.cat([o.images for o in obs]),
        torch.cat([o.image_masks for o in obs]),
        torch.cat([o.tokens for o in obs]),
        torch.cat([o.token_masks for o in obs]),
        torch.cat([o.state for o in obs]),
        [s for o in obs for s in o.instructions],
    )


@dataclass
class ChunkStep:
    """What one chunk step returns, per env (all tensors ``(B,)``).

    Attributes:
        obs: next observations (of the new episode where ``done``).
        reward: sum of the executed steps' rewards.
        done: the episode ended in this chunk (success or time limit).
        success: the episode ended with success in this chunk.
        truncated: the episode hit its time limit (or a worker failure) without success.
        executed: number of actions of the chunk actually executed (1 … H').
        episode_return, episode_length: of the episodes that ended here (0 elsewhere).
    """

    obs: EnvObs
    reward: torch.Tensor
    done: torch.Tensor
    success: torch.Tensor
    truncated: torch.Tensor
    executed: torch.Tensor
    episode_return: torch.Tensor
    episode_length: torch.Tensor

    @staticmethod
    def cat(steps: Sequence[ChunkStep]) -> ChunkStep:
        """Concatenate the steps of consecutive groups of envs along the batch dim."""
        if len(steps) == 1:
            return steps[0]
        return ChunkStep(cat_obs([s.obs for s in steps]), *(
            torch.cat([getattr(s, name) for s in steps])
            for name in ("reward", "done", "success", "truncated", "executed", "episode_return", "episode_length")))


#: ``act_fn(obs) -> (actions (B, H, D), *more)``: what a rollout computes per chunk from the
#: observations of ``B`` envs; the first element is the action chunk the envs execute, the
#: others (tensors with a leading ``B`` dim, dicts of them, or None) are passed back to the caller.
ActFn = Callable[[EnvObs], tuple[Any, ...]]


def cat_outputs(parts: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Concatenate the ``act_fn`` outputs of consecutive groups of envs along the batch dim.

    Each element is a tensor (concatenated on dim 0), a dict of tensors (per key), an
    :class:`EnvObs`, or None (stays None).
    """
    if len(parts) == 1:
        return tuple(parts[0])

    def cat(vals: list[Any]) -> Any:
        v0 = vals[0]
        if v0 is None:
            return None
        if isinstance(v0, torch.Tensor):
            return torch.cat(vals)
        if isinstance(v0, dict):
            return {k: cat([v[k] for v in vals]) for k in v0}
        if isinstance(v0, EnvObs):
            return cat_obs(vals)
        raise TypeError(f"cat_outputs: cannot concatenate act_fn outputs of type {type(v0).__name__} "
                        "(expected tensors, dicts of tensors, EnvObs or None)")

    return tuple(cat([p[i] for p in parts]) for i in range(len(parts[0])))


class VecEnv(abc.ABC):
    """Batched environment over action chunks.

    Subclasses set ``num_envs``, ``action_dim`` (the robot's real action dims), ``state_dim``,
    ``num_cameras``, ``image_size``, ``chunk_steps`` (H'), ``max_episode_steps``,
    ``vocab_size`` and ``max_token_len``.
    """

    num_envs: int
    action_dim: int
    state_dim: int
    num_cameras: int
    image_size: int
    chunk_steps: int
    max_episode_steps: int
    vocab_size: int
    max_token_len: int
    device: torch.device

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> EnvObs:
        """Start a new episode in every env; env ``i`` is seeded from ``(seed, i)``."""

    @abc.abstractmethod
    def step(self, actions: torch.Tensor) -> ChunkStep:
        """Execute the first ``chunk_steps`` actions of ``actions (B, H ≥ H', A ≥ action_dim)``.

        Extra action dims (the policy's padding) are ignored.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers and resources."""

    # ------------------------------------------------------------------ split stepping
    def step_async(self, actions: torch.Tensor) -> None:
        """Start a step with ``actions`` (as :meth:`step`); collect it with :meth:`step_wait`.

        The default steps synchronously here. An env whose step runs elsewhere (worker
        processes) overrides both: ``step_async`` hands the actions over and returns at once.
        """
        if getattr(self, "_pending_step", None) is not None:
            raise RuntimeError(f"{type(self).__name__}.step_async: the previous step_async was not collected "
                               "with step_wait()")
        self._pending_step: ChunkStep | None = self.step(actions)

    def step_wait(self) -> ChunkStep:
        """The result of the step started by :meth:`step_async`."""
        step = getattr(self, "_pending_step", None)
        if step is None:
            raise RuntimeError(f"{type(self).__name__}.step_wait: no step in flight (call step_async first)")
        self._pending_step = None
        return step

    def step_chunks(self, act_fn: ActFn, obs: EnvObs, num_chunks: int
                    ) -> Iterator[tuple[EnvObs, tuple[Any, ...], ChunkStep]]:
        """The act → step loop of a rollout: ``num_chunks`` times ``out = act_fn(obs)``, step ``out[0]``.

        Yields ``(obs, out, step)`` per chunk: the observations the chunk was chosen from
        (``B`` envs), ``act_fn``'s outputs for them and the env's :class:`ChunkStep`; the next
        chunk starts from ``step.obs``. Here strictly in sequence; a
        :class:`~flowrl.envs.pipeline.PipelinedEnv` interleaves groups of envs (same yields).
        """
        for _ in range(num_chunks):
            out = act_fn(obs)
            step = self.step(out[0])
            yield obs, out, step
            obs = step.obs

    def step_with(self, act_fn: ActFn, obs: EnvObs) -> tuple[ChunkStep, tuple[Any, ...]]:
        """One chunk of :meth:`step_chunks`: ``(step, act_fn outputs)``."""
        for _, out, step in self.step_chunks(act_fn, obs, 1):
            return step, out
        raise AssertionError("unreachable")

    def check_actions(self, actions: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Validate a chunk and cut it to ``(B, H', action_dim)`` float32 on ``device`` (default: the env's).

        NaN is refused whenever the chunk ends up on the host (no sync to pay there), and on a GPU while
        flowkernels' value checks are on."""
        if not isinstance(actions, torch.Tensor) or actions.dim() != 3:
            got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
            raise ValueError(f"{type(self).__name__}.step: actions must have shape (B, H, A), got {got}")
        B, H, A = actions.shape
        if B != self.num_envs:
            raise ValueError(f"{type(self).__name__}.step: actions batch {B} != num_envs {self.num_envs}")
        if H < self.chunk_steps:
            raise ValueError(f"{type(self).__name__}.step: the chunk has {H} steps, fewer than chunk_steps "
                             f"(H') = {self.chunk_steps}")
        if A < self.action_dim:
            raise ValueError(f"{type(self).__name__}.step: actions have {A} dims, the env needs {self.action_dim}")
        if not actions.is_floating_point():
            raise TypeError(f"{type(self).__name__}.step: actions must be floating point, got {actions.dtype}")
        out = actions[:, : self.chunk_steps, : self.action_dim].detach().to(device or self.device, torch.float32)
        if (out.device.type == "cpu" or value_checks_enabled(out.device)) and out.numel() and \
                bool(torch.isnan(out).any()):
            # (±inf is clamped like any large action; NaN would pass clamp and poison the episode)
            raise ValueError(f"{type(self).__name__}.step: actions hold NaN (rows "
                             f"{torch.isnan(out).flatten(1).any(1).nonzero().flatten().tolist()[:8]})")
        return out

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
