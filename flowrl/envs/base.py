"""The vectorized environment interface of flowrl: batched reset / step over action chunks.

Every environment (the built-in task, LIBERO) runs ``num_envs`` episodes side by side. A step
takes an action *chunk* per env and executes its first ``chunk_steps`` (H') actions, stopping
early in an env that succeeds. Finished episodes are reset automatically; the observation
returned is then the first observation of the new episode.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch

__all__ = ["ChunkStep", "EnvObs", "VecEnv"]


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

    def check_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """Validate a chunk and cut it to ``(B, H', action_dim)`` float32 on the env's device."""
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
        return actions[:, : self.chunk_steps, : self.action_dim].to(self.device, torch.float32)

    def __enter__(self) -> VecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
