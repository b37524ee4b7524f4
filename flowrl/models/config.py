"""Sizes and options of the π0 / π0.5 policy (DESIGN §2).

Every size is a field of :class:`PolicyConfig`; :func:`get_config` returns the named configs
``pi0``, ``pi05`` (full size, the published models), ``small`` (~100M parameters) and ``tiny``
(a few M parameters, seconds on a CPU; the test config).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["CHECKPOINTING", "CONFIGS", "PolicyConfig", "get_config"]

DTYPES = ("float32", "bfloat16", "float16")
CHECKPOINTING = ("none", "vlm", "expert", "all")


@dataclass
class PolicyConfig:
    """All sizes of a π0-family policy.

    Vision (SigLIP): ``vision_*``; VLM (Gemma): ``vlm_*``; action expert (Gemma): ``expert_*``.
    Both Gemma stacks share ``depth``, ``num_heads``, ``num_kv_heads`` and ``head_dim`` (one joint
    attention per layer over both experts' tokens).
    """

    variant: str = "pi0"  # "pi0" | "pi05"
    # action / state
    action_dim: int = 32  # padded (maximum) action dim D
    action_horizon: int = 50  # H
    max_state_dim: int = 32  # Ds (π0 state token); π0.5 tokenizes the state into the language
    # observation
    num_cameras: int = 3
    image_size: int = 224
    vocab_size: int = 257152
    max_token_len: int = 48
    # SigLIP vision tower
    vision_width: int = 1152
    vision_depth: int = 27
    vision_mlp_dim: int = 4304
    vision_heads: int = 16
    patch_size: int = 14
    # Gemma VLM and action expert
    depth: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vlm_width: int = 2048
    vlm_mlp_dim: int = 16384
    expert_width: int = 1024
    expert_mlp_dim: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    # time embedding (openpi / lerobot create_sinusoidal_pos_embedding)
    min_period: float = 4e-3
    max_period: float = 4.0
    # sampling defaults
    num_steps: int = 10
    noise_level: float = 0.5  # Flow-SDE a
    # heads
    noise_std_min: float = 0.08  # Flow-Noise bounds [s_min, s_max]
    noise_std_max: float = 0.16
    noise_head_hidden: int = 128
    value_heads: int = 2  # ensemble size M (per side)
    value_hidden: int = 256
    # precision of the Gemma weights on GPU ("float32" | "bfloat16" | "float16"); vision tower,
    # projector, norms and the action/time projections stay float32 (lerobot's rule). On CPU
    # the policy runs in float32 unless asked otherwise.
    dtype: str = "bfloat16"
    # activation checkpointing in training (module in train mode, grad enabled): "vlm" recomputes each
    # SigLIP layer and each layer of the prefix pass (Gemma VLM + π0 state token) in the backward pass
    # instead of keeping its activations, "expert" each action-expert layer of the suffix pass, "all"
    # both; "none" keeps everything. Same loss and gradients, less memory, one more forward's compute.
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"PolicyConfig: {f.name} must be a positive int, got {v!r}")
            if f.type == "float" and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)):
                raise ValueError(f"PolicyConfig: {f.name} must be a finite number, got {v!r}")
        if self.variant not in ("pi0", "pi05"):
            raise ValueError(f"PolicyConfig: variant must be 'pi0' or 'pi05', got {self.variant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"PolicyConfig: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"PolicyConfig: activation_checkpointing must be one of {CHECKPOINTING}, got "
                             f"{self.activation_checkpointing!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"PolicyConfig: image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"PolicyConfig: num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.head_dim % 2 or self.expert_width % 2:
            raise ValueError("PolicyConfig: head_dim and expert_width must be even (RoPE, sin-cos embedding)")
        if not 0 < self.noise_std_min < self.noise_std_max:
            raise ValueError(f"PolicyConfig: need 0 < noise_std_min < noise_std_max, got "
                             f"[{self.noise_std_min}, {self.noise_std_max}]")
        for name in ("rope_theta", "rms_eps", "min_period", "max_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PolicyConfig: {name} must be > 0, got {getattr(self, name)!r}")
        if not self.min_period < self.max_period:
            raise ValueError(f"PolicyConfig: need min_period < max_period, got {self.min_period}, {self.max_period}")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"PolicyConfig: vision_heads {self.vision_heads} must divide vision_width "
                             f"{self.vision_width}")
        if self.noise_level < 0:
            raise ValueError(f"PolicyConfig: noise_level (Flow-SDE a) must be >= 0, got {self.noise_level!r}")

    @property
    def tokens_per_image(self) -> int:
        """SigLIP patch tokens per camera image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def max_prefix_len(self) -> int:
        """Images + language tokens (before compaction)."""
        return self.num_cameras * self.tokens_per_image + self.max_token_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PolicyConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"PolicyConfig: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with ``changes``; a name that is not a field is a TypeError listing the fields."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"PolicyConfig: unknown field(s) {unknown}; fields: "
                            f"{sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)


_PI0 = PolicyConfig()

CONFIGS: dict[str, PolicyConfig] = {
    # π0: PaliGemma (SigLIP So400m/14 at 224², Gemma 2B) + Gemma 300M action expert
    "pi0": _PI0,
    # π0.5: same sizes; adaRMS time conditioning, state tokenized into a longer prompt
    "pi05": _PI0.replace(variant="pi05", max_token_len=200),
    # ~100M parameters: fits a laptop GPU, fast enough for end-to-end RL smoke runs
    "small": PolicyConfig(
        num_cameras=2, image_size=112, vocab_size=8192, max_token_len=32,
        vision_width=384, vision_depth=6, vision_mlp_dim=1536, vision_heads=6, patch_size=16,
        depth=8, num_heads=8, num_kv_heads=1, head_dim=96, vlm_width=768, vlm_mlp_dim=3072,
        expert_width=384, expert_mlp_dim=1536, noise_head_hidden=128, value_hidden=256,
    ),
    # a few M parameters, seconds on a CPU: the test config
    "tiny": PolicyConfig(
        num_cameras=2, image_size=32, vocab_size=8192, max_token_len=16,
        vision_width=64, vision_depth=2, vision_mlp_dim=256, vision_heads=2, patch_size=8,
        depth=2, num_heads=8, num_kv_heads=1, head_dim=32, vlm_width=128, vlm_mlp_dim=512,
        expert_width=64, expert_mlp_dim=256, noise_head_hidden=64, value_hidden=64, dtype="float32",
    ),
}


def get_config(name: str, **overrides: Any) -> PolicyConfig:
    """A named config (``pi0``, ``pi05``, ``small``, ``tiny``, and ``<name>_pi05`` for the π0.5 variant
    of ``small`` / ``tiny``) with optional field overrides."""
    base = name
    if name.endswith("_pi05") and name[:-5] in CONFIGS:
        base, overrides = name[:-5], {"variant": "pi05", **overrides}
    if base not in CONFIGS:
        raise ValueError(f"get_config: unknown config {name!r}; known: {sorted(CONFIGS)} (+ '_pi05' variants)")
    return CONFIGS[base].replace(**overrides)
