"""The π0 / π0.5 policy on flowkernels, with a compacted, read-only prefix cache (DESIGN §2).

* :meth:`Pi0Policy.encode_prefix` runs SigLIP + projector, the language embeddings and the Gemma
  VLM once per observation (and, for π0, the state token through the action expert: its K/V do
  not depend on ``x_t`` or ``t``). Masked cameras and padding tokens are compacted away; the
  per-layer K/V (after RoPE) are stored read-only in a :class:`PrefixCache`.
* :meth:`Pi0Policy.sample_actions` runs only the action tokens through the expert at each of the
  K steps, attending the cached prefix with ``flowkernels.prefix_attention`` (``group_size`` rows
  per observation share one prefix, never expanded or cloned), and steps with
  ``flowkernels.flow_step``.
* :meth:`Pi0Policy.cfm_losses` (N (τ, ε) pairs per observation) and
  :meth:`Pi0Policy.chain_logprob` (K recomputed velocities) run one prefix pass each and batch
  the pairs / steps as rows of one suffix pass.

Conventions (t = 1 noise, t = 0 action, ``x_t = t·ε + (1 − t)·A``, Euler ``dt = 1/K``) and the
numerics follow lerobot 0.6.1's ``PI0Pytorch`` / ``PI05Pytorch``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import flowkernels as fk
from flowkernels._checks import as_float, host_min_max, value_checks_enabled
from flowrl.models.config import PolicyConfig, get_config
from flowrl.models.gemma import GemmaLayer, GemmaStack, apply_rope, linear_f32, rope_cos_sin
from flowrl.models.heads import NoiseHead, ValueEnsemble

__all__ = ["Observation", "Pi0Policy", "PrefixCache", "SampleResult", "sinusoidal_time_embedding"]

#: |image value| above this on a valid camera is an error: images are [-1, 1] (a resize may overshoot a little);
#: pixels in [0, 255] or [0, 2] are caught, [0, 1] cannot be told apart from [-1, 1]
_IMAGE_BOUND = 1.5

MODES = ("ode", "sde", "noise")
FREEZE_MODES = ("expert_only", "expert_and_vlm", "none")
_PRECISIONS = ("float32", "bfloat16", "float16", "float64")
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------
# data containers


@dataclass
class Observation:
    """One batch of observations.

    Attributes:
        images: ``(B, C, 3, Hi, Wi)`` float in ``[-1, 1]`` (C = ``config.num_cameras``).
        image_masks: ``(B, C)`` bool, False for a missing camera (its tokens are dropped).
        tokens: ``(B, L)`` int64 language token ids, ``L ≤ config.max_token_len``.
        token_masks: ``(B, L)`` bool, False for padding.
        state: ``(B, Ds)`` float with ``Ds ≤ config.max_state_dim`` (π0; zero-padded), or None
            (π0.5: the state is tokenized into the language by the caller).
    """

    images: torch.Tensor
    image_masks: torch.Tensor
    tokens: torch.Tensor
    token_masks: torch.Tensor
    state: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Observation:
        return Observation(*(None if t is None else t.to(device) for t in
                             (self.images, self.image_masks, self.tokens, self.token_masks, self.state)))

    def repeat_interleave(self, n: int) -> Observation:
        """Each observation repeated ``n`` times (consecutive rows), e.g. to build a naive group."""
        return Observation(*(None if t is None else t.repeat_interleave(n, 0) for t in
                             (self.images, self.image_masks, self.tokens, self.token_masks, self.state)))

    @classmethod
    def from_cameras(
        cls,
        images: dict[str, torch.Tensor],
        camera_names: list[str] | tuple[str, ...],
        tokens: torch.Tensor,
        token_masks: torch.Tensor,
        state: torch.Tensor | None = None,
        allow_missing: bool = False,
    ) -> Observation:
        """Build from a dict of per-camera images ``(B, 3, Hi, Wi)`` keyed by camera name.

        ``camera_names`` fixes the camera order. A missing camera is an error unless
        ``allow_missing`` (then it becomes an image of -1 with mask False, as lerobot pads it);
        unknown keys are always an error; at least one camera must be present.
        """
        if isinstance(camera_names, str):
            raise TypeError(f"Observation.from_cameras: camera_names must be a list of names, got the string "
                            f"{camera_names!r}")
        names = list(camera_names)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Observation.from_cameras: camera_names has duplicates {dup}")
        unknown = sorted(set(images) - set(names))
        if unknown:
            raise ValueError(f"Observation.from_cameras: images has unknown camera keys {unknown}; expected {names}")
        missing = [n for n in names if n not in images]
        if missing and not allow_missing:
            raise ValueError(f"Observation.from_cameras: images is missing camera keys {missing} (expected {names}); "
                             "pass allow_missing=True to mask them")
        if len(missing) == len(names):
            raise ValueError(f"Observation.from_cameras: images holds none of the cameras {names}")
        ref = next(images[n] for n in names if n in images)
        for n in names:
            if n not in images:
                continue
            im = images[n]
            if not isinstance(im, torch.Tensor):
                raise TypeError(f"Observation.from_cameras: images[{n!r}] must be a torch.Tensor, got "
                                f"{type(im).__name__}")
            if im.dim() != 4:
                raise ValueError(f"Observation.from_cameras: images[{n!r}] must be (B, 3, Hi, Wi), got "
                                 f"{tuple(im.shape)}")
            if not im.is_floating_point():
                raise TypeError(f"Observation.from_cameras: images[{n!r}] must be float in [-1, 1], got {im.dtype}")
            if im.shape != ref.shape or im.device != ref.device:
                raise ValueError(f"Observation.from_cameras: images[{n!r}] is {tuple(im.shape)} on {im.device}, but "
                                 f"the first camera's image is {tuple(ref.shape)} on {ref.device}: every camera needs "
                                 "the same batch size, image size and device")
        imgs, masks = [], []
        for n in names:
            if n in images:
                imgs.append(images[n])
                masks.append(torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device))
            else:
                imgs.append(torch.full_like(ref, -1.0))
                masks.append(torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device))
        return cls(torch.stack(imgs, 1), torch.stack(masks, 1), tokens, token_masks, state)


@dataclass
class PrefixCache:
    """Read-only per-layer K/V of the compacted prefix (images, language, π0 state token).

    Attributes:
        keys, values: ``(depth, B, P, Hkv, d)`` after RoPE, in the compute dtype. Slot ``P − 1``
            holds the π0 state token; padding slots are masked by ``prefix_mask``.
        prefix_mask: ``(B, P)`` bool, valid slots.
        prefix_lens: ``(B,)`` int64, valid image + language tokens per observation.
        suffix_offset: ``(B,)`` int64, RoPE position of the first action token (``prefix_lens``,
            + 1 for π0's state token).
        pooled: ``(B, W_vlm)`` float32, mean of the VLM's final-normed outputs over valid tokens
            (the VLM-side value head's input).
        encoder: ``id`` of the policy that encoded it, and ``weights_version`` the sum of the version
            counters of that policy's prefix weights (SigLIP, projector, embeddings, VLM; π0: also the
            state projection and the expert, which the state token runs through) at encoding time, see
            :meth:`Pi0Policy.prefix_weights_version`. That policy refuses the cache once an update (an
            optimizer step, ``load_state_dict``, :meth:`Pi0Policy.mark_weights_updated`) has changed
            those weights: its K/V would be stale. ``None``: unchecked. A cache used by a policy other
            than its encoder is not checked for staleness (only for shape, dtype and variant).
        variant: ``"pi0"`` or ``"pi05"`` of the encoding policy (π0's cache ends with the state token).
            Any policy checks a cache's depth, KV heads, head dim, dtype and variant against its own.
    """

    keys: torch.Tensor
    values: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_lens: torch.Tensor
    suffix_offset: torch.Tensor
    pooled: torch.Tensor
    encoder: int | None = None
    weights_version: int | None = None
    variant: str | None = None

    @property
    def batch_size(self) -> int:
        return int(self.keys.shape[1])

    def detach(self) -> PrefixCache:
        return replace(self, keys=self.keys.detach(), values=self.values.detach(), pooled=self.pooled.detach())


@dataclass
class SampleResult:
    """Output of :meth:`Pi0Policy.sample_actions` (rows ordered observation-major, ``b·N + n``).

    Attributes:
        actions: ``(B·N, H, D)`` float32, the final state ``x_{t_K}``.
        chain: ``(B·N, K+1, H, D)`` the states ``x_{t_0} = ε, …, x_{t_K}`` (None unless return_chain).
        means: ``(B·N, K, H, D)`` transition means μ_k (None unless return_chain).
        stds: ``(B·N, K, 1, 1)`` (ode / sde) or ``(B·N, K, H, D)`` (noise) transition stds
            (None unless return_chain).
        step_logps: ``(B·N, K)`` float32 transition log-probs (0 for ODE transitions).
        initial_logp: ``(B·N,)`` ``log N(x_{t_0}; 0, I)`` over masked elements.
        logp: ``(B·N,)`` the chain's log-prob: ``Σ_k step_logps`` (+ ``initial_logp`` for mode noise),
            what :meth:`Pi0Policy.chain_logprob` recomputes.
        t_grid: ``(K+1,)`` float32 times.
    """

    actions: torch.Tensor
    chain: torch.Tensor | None
    means: torch.Tensor | None
    stds: torch.Tensor | None
    step_logps: torch.Tensor
    initial_logp: torch.Tensor
    logp: torch.Tensor
    t_grid: torch.Tensor


def _check_count(where: str, name: str, value: Any) -> int:
    """``value`` as an int >= 1 (Python or NumPy int, not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"Pi0Policy.{where}: {name} must be an int >= 1, got {value!r}")
    return int(value)


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float, max_period: float) -> torch.Tensor:
    """openpi's sine-cosine embedding of scalar times: ``t (T,)`` → ``(T, dim)`` float32 ([sin, cos]).

    Computed in float64 (float32 where float64 is missing, e.g. MPS) and rounded, as lerobot does.
    """
    f64 = torch.float64 if t.device.type != "mps" else torch.float32
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=f64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling = 1.0 / period * 2 * math.pi
    x = scaling[None, :] * t[:, None]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1).to(t.dtype)


def _time_grid(K: int) -> list[float]:
    """``t_k = 1 − k/K`` computed as lerobot's Euler loop does (``1.0 + k·(−1/K)``), ``t_K = 0``."""
    dt = -1.0 / K
    return [1.0 + k * dt for k in range(K)] + [0.0]


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Eager attention (Gemma's): q ``(B, S, Hq, d)``, k/v ``(B, L, Hkv, d)``, allowed bool ``(B, S, L)``.

    Scores in the activations' dtype times ``scale``, masked, softmax in float32, cast back.
    """
    g = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(g, dim=2) if g > 1 else k
    vv = v.repeat_interleave(g, dim=2) if g > 1 else v
    scores = torch.einsum("bshd,blhd->bhsl", q, kk) * scale
    scores = scores.float().masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bhsl,blhd->bshd", p, vv)


class VisionTower(nn.Module):
    """SigLIP vision transformer under the stable name ``vision_model`` (parameter names
    ``vision_tower.vision_model.embeddings…`` whatever the transformers version: 5.5 nests the
    transformer in ``SiglipVisionModel.vision_model``, later 5.x put its modules at the top)."""

    def __init__(self, siglip: nn.Module):
        super().__init__()
        self.vision_model = getattr(siglip, "vision_model", siglip)

    def forward(self, pixel_values: torch.Tensor, checkpoint_layers: bool = False) -> torch.Tensor:
        """``(n, 3, Hi, Wi)`` → last hidden state (after the post-layernorm) ``(n, T, W_vision)``.

        ``checkpoint_layers``: run the encoder layer by layer under activation checkpointing
        (the same ops as the model's own forward: embeddings → layers → post-layernorm).
        """
        vm = self.vision_model
        parts = [getattr(vm, n, None) for n in ("embeddings", "encoder", "post_layernorm")]
        if not checkpoint_layers or any(m is None for m in parts) or not hasattr(parts[1], "layers"):
            if checkpoint_layers:  # an unknown SigLIP layout: checkpoint the tower as one unit
                return checkpoint(self.forward, pixel_values, use_reentrant=False)
            return vm(pixel_values=pixel_values).last_hidden_state
        emb, enc, post = parts
        h = emb(pixel_values)
        for layer in enc.layers:
            h = checkpoint(layer, h, None, use_reentrant=False)
            h = h[0] if isinstance(h, tuple) else h
        return post(h)


# --------------------------------------------------------------------------------------------
# the policy


def _mark_after_load(module: Pi0Policy, incompatible_keys: Any) -> None:
    module.mark_weights_updated()


class Pi0Policy(nn.Module):
    """π0 / π0.5: SigLIP + Gemma VLM prefix, Gemma action expert, flow-matching action head.

    Parameter names (``vision_tower``, ``projector``, ``embed_tokens``, ``vlm``, ``expert``,
    ``action_in_proj``, ``action_out_proj``, ``state_proj``, ``action_time_mlp_in/out`` (π0),
    ``time_mlp_in/out`` (π0.5), ``noise_head``, ``value_vlm``, ``value_expert``) map to lerobot /
    openpi checkpoints by the table in :mod:`flowrl.models.weights`.
    """

    def __init__(self, config: PolicyConfig | str = "tiny"):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        c = get_config(config) if isinstance(config, str) else config
        if not isinstance(c, PolicyConfig):
            raise TypeError(f"Pi0Policy: config must be a PolicyConfig or a config name, got {type(config).__name__}"
                            + (" (PolicyConfig.from_dict(d) reads a dict)" if isinstance(config, dict) else ""))
        self.config = c
        vcfg = SiglipVisionConfig(
            hidden_size=c.vision_width, intermediate_size=c.vision_mlp_dim, num_hidden_layers=c.vision_depth,
            num_attention_heads=c.vision_heads, num_channels=3, image_size=c.image_size, patch_size=c.patch_size,
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        )
        self.vision_tower = VisionTower(SiglipVisionModel(vcfg))
        self.projector = nn.Linear(c.vision_width, c.vlm_width)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.vlm_width)
        gemma = dict(depth=c.depth, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                     eps=c.rms_eps)
        self.vlm = GemmaStack(c.vlm_width, c.vlm_mlp_dim, **gemma)
        We = c.expert_width
        self.expert = GemmaStack(We, c.expert_mlp_dim, **gemma, cond_dim=We if c.variant == "pi05" else None)
        self.action_in_proj = nn.Linear(c.action_dim, We)
        self.action_out_proj = nn.Linear(We, c.action_dim)
        if c.variant == "pi0":
            self.state_proj = nn.Linear(c.max_state_dim, We)
            self.action_time_mlp_in = nn.Linear(2 * We, We)
            self.action_time_mlp_out = nn.Linear(We, We)
        else:
            self.time_mlp_in = nn.Linear(We, We)
            self.time_mlp_out = nn.Linear(We, We)
        self.noise_head = NoiseHead(We, c.noise_head_hidden, c.action_dim, c.noise_std_min, c.noise_std_max)
        self.value_vlm = ValueEnsemble(c.vlm_width, c.value_hidden, c.value_heads)
        self.value_expert = ValueEnsemble(We, c.value_hidden, c.value_heads)
        self._graphs: dict = {}
        self._prefix_params: tuple[torch.Tensor, ...] | None = None  # see prefix_weights_version
        self._weights_generation = 0  # bumped by mark_weights_updated (updates the version counters miss)
        # any load_state_dict that reaches this module (also through a parent module, also a strict load that
        # fails part way, which may have copied some tensors) makes earlier caches stale
        self.register_load_state_dict_post_hook(_mark_after_load)

    # ---------------------------------------------------------------- precision / devices

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the Gemma activations (that of the Gemma linear weights)."""
        return self.vlm.layers[0].self_attn.q_proj.weight.dtype

    def set_precision(self, dtype: torch.dtype | str | None = None) -> Pi0Policy:
        """Gemma weights (VLM, expert, token embeddings) in ``dtype`` (default: ``config.dtype``);
        the vision tower, projector, all norms (incl. adaRMS dense layers), the action/state/time
        projections and the heads stay float32 (lerobot's rule)."""
        if not isinstance(dtype, torch.dtype):
            name = dtype or self.config.dtype
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"Pi0Policy.set_precision: dtype must be a torch dtype or one of {_PRECISIONS}, "
                                 f"got {name!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"Pi0Policy.set_precision: dtype must be a floating-point dtype, got {dtype}")
        self.embed_tokens.to(dtype)
        for stack in (self.vlm, self.expert):
            for layer in stack.layers:
                layer.self_attn.to(dtype)
                layer.mlp.to(dtype)
        return self

    def _module_dtype(self, m: nn.Module) -> torch.dtype:
        return next(m.parameters()).dtype

    # ---------------------------------------------------------------- activation checkpointing

    def set_activation_checkpointing(self, mode: str) -> Pi0Policy:
        """``"none" | "vlm" | "expert" | "all"`` (``config.activation_checkpointing``; see PolicyConfig)."""
        self.config = self.config.replace(activation_checkpointing=mode)
        return self

    def _checkpointing(self, part: str) -> bool:
        """Whether ``part`` (``"vlm"`` or ``"expert"``) runs its layers under activation checkpointing now."""
        mode = self.config.activation_checkpointing
        return mode in (part, "all") and self.training and torch.is_grad_enabled()

    def _t_grid(self, K: int) -> torch.Tensor:
        """``(K+1,)`` float32 times ``t_k`` on the policy's device, built once per (K, device): a fresh
        host-to-device copy would block the host until the queued work is done. Internal and read-only:
        results hand out a copy. Built outside inference mode (an inference tensor built by a rollout under
        ``torch.inference_mode()`` could not be saved for the backward of a later ``chain_logprob``)."""
        key = (K, self.device)
        cache = self.__dict__.setdefault("_t_grids", {})
        if key not in cache:
            with torch.inference_mode(False):
                cache[key] = torch.tensor(_time_grid(K), dtype=torch.float32, device=self.device)
        return cache[key]

    def _run_layer(self, part: str, fn, *args: Any) -> Any:
        """``fn(*args)`` (one layer of ``part``), under activation checkpointing when enabled for ``part``."""
        return checkpoint(fn, *args, use_reentrant=False) if self._checkpointing(part) else fn(*args)

    # ---------------------------------------------------------------- input validation

    def _check_obs(self, obs: Observation) -> Observation:
        c, dev = self.config, self.device
        if not isinstance(obs, Observation):
            raise TypeError(f"Pi0Policy: expected an Observation or a PrefixCache, got {type(obs).__name__}")
        for name in ("images", "image_masks", "tokens", "token_masks"):
            t = getattr(obs, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Pi0Policy: obs.{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != dev:
                raise ValueError(f"Pi0Policy: obs.{name} is on {t.device} but the policy is on {dev}")
        im = obs.images
        if im.dim() != 5 or im.shape[2] != 3:
            raise ValueError(f"Pi0Policy: obs.images must be (B, C, 3, Hi, Wi), got {tuple(im.shape)}")
        B, C = im.shape[:2]
        if B == 0:
            raise ValueError("Pi0Policy: obs holds no observation (obs.images has batch size 0); pass B >= 1")
        if C != c.num_cameras:
            raise ValueError(f"Pi0Policy: obs.images holds {C} cameras, the config expects num_cameras={c.num_cameras}")
        if tuple(im.shape[3:]) != (c.image_size, c.image_size):
            raise ValueError(f"Pi0Policy: obs.images must be {c.image_size}x{c.image_size}, got "
                             f"{im.shape[3]}x{im.shape[4]} (resize with padding first)")
        if not im.is_floating_point():
            raise TypeError(f"Pi0Policy: obs.images must be float in [-1, 1], got {im.dtype}")
        if obs.image_masks.shape != (B, C) or obs.image_masks.dtype != torch.bool:
            raise ValueError(f"Pi0Policy: obs.image_masks must be bool (B, C) = ({B}, {C}), got "
                             f"{obs.image_masks.dtype} {tuple(obs.image_masks.shape)}")
        tok = obs.tokens
        if tok.dim() != 2 or tok.shape[0] != B:
            raise ValueError(f"Pi0Policy: obs.tokens must be (B, L) with B={B}, got {tuple(tok.shape)}")
        if tok.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Pi0Policy: obs.tokens must be int64 token ids, got {tok.dtype}")
        if tok.shape[1] > c.max_token_len:
            raise ValueError(f"Pi0Policy: obs.tokens has {tok.shape[1]} tokens, above max_token_len={c.max_token_len}")
        if obs.token_masks.shape != tok.shape or obs.token_masks.dtype != torch.bool:
            raise ValueError(f"Pi0Policy: obs.token_masks must be bool of the tokens' shape {tuple(tok.shape)}, got "
                             f"{obs.token_masks.dtype} {tuple(obs.token_masks.shape)}")
        # padding may hold any id (tokenizers pad with -1, -100, ...): masked-out slots read id 0
        tok = torch.where(obs.token_masks, tok, 0)
        if tok.numel() and value_checks_enabled(dev):
            lo, hi = host_min_max(tok)
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"Pi0Policy: obs.tokens ids where token_masks is True must lie in "
                                 f"[0, vocab_size={c.vocab_size}), got [{lo}, {hi}]")
        state = obs.state
        if c.variant == "pi05":
            if state is not None:
                raise ValueError("Pi0Policy: obs.state must be None for pi05 (the state is tokenized into the "
                                 "language)")
        else:
            if state is None:
                raise ValueError(f"Pi0Policy: obs.state (B, Ds<= {c.max_state_dim}) is required for pi0")
            if not isinstance(state, torch.Tensor) or state.dim() != 2 or state.shape[0] != B:
                got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
                raise ValueError(f"Pi0Policy: obs.state must be (B, Ds) with B={B}, got {got}")
            if not state.is_floating_point():
                raise TypeError(f"Pi0Policy: obs.state must be float, got {state.dtype}")
            if state.device != dev:
                raise ValueError(f"Pi0Policy: obs.state is on {state.device} but the policy is on {dev}")
            if state.shape[1] > c.max_state_dim:
                raise ValueError(f"Pi0Policy: obs.state has dim {state.shape[1]}, above "
                                 f"max_state_dim={c.max_state_dim}")
            if value_checks_enabled(dev) and state.numel() and not bool(torch.isfinite(state).all()):
                raise ValueError("Pi0Policy: obs.state holds NaN or inf")
            if state.shape[1] < c.max_state_dim:
                state = F.pad(state, (0, c.max_state_dim - state.shape[1]))
        return replace(obs, tokens=tok.long(), state=state)

    def _check_actions(self, name: str, x: torch.Tensor, lead: tuple[int, ...]) -> None:
        c = self.config
        shape = (*lead, c.action_horizon, c.action_dim)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Pi0Policy: {name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"Pi0Policy: {name} must have shape {shape}, got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"Pi0Policy: {name} must be float32, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"Pi0Policy: {name} is on {x.device} but the policy is on {self.device}")

    # ---------------------------------------------------------------- embeddings and layers

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """images ``(n, 3, Hi, Wi)`` → ``(n, T, W_vlm)`` float32 (SigLIP last hidden state → projector)."""
        feats = self.vision_tower(images.float(), checkpoint_layers=self._checkpointing("vlm"))
        return self.projector(feats)

    def embed_language(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(B, L)`` → ``(B, L, W_vlm)``: embeddings × √W in the embedding's dtype."""
        w = self.embed_tokens.weight
        return self.embed_tokens(tokens) * torch.tensor(self.config.vlm_width ** 0.5, dtype=w.dtype, device=w.device)

    def _qkv(self, layer: GemmaLayer, h: torch.Tensor, mod, cos: torch.Tensor, sin: torch.Tensor):
        c = self.config
        x, gate = layer.input_layernorm(h, mod)
        B, S, _ = x.shape
        a = layer.self_attn
        q = a.q_proj(x).view(B, S, c.num_heads, c.head_dim)
        k = a.k_proj(x).view(B, S, c.num_kv_heads, c.head_dim)
        v = a.v_proj(x).view(B, S, c.num_kv_heads, c.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, gate

    def _post(self, layer: GemmaLayer, h: torch.Tensor, attn: torch.Tensor, gate, mod) -> torch.Tensor:
        B, S = attn.shape[:2]
        o = layer.self_attn.o_proj(attn.reshape(B, S, -1).to(layer.self_attn.o_proj.weight.dtype))
        h = h + o if gate is None else h + o * gate
        x, gate2 = layer.post_attention_layernorm(h, mod)
        m = layer.mlp(x.to(layer.mlp.up_proj.weight.dtype))
        return h + m if gate2 is None else h + m * gate2

    # ---------------------------------------------------------------- prefix

    def encode_prefix(self, obs: Observation) -> PrefixCache:
        """Run the prefix once: images + language (+ π0 state token) → :class:`PrefixCache`.

        Masked cameras are not run through SigLIP; masked cameras and padding tokens are
        compacted away (valid tokens keep their order; RoPE positions = running count of valid
        tokens, as in lerobot). Differentiable w.r.t. the weights.
        """
        obs = self._check_obs(obs)
        version = self.prefix_weights_version()  # before the forward: an update during it makes the cache stale
        c = self.config
        dt = self.compute_dtype
        B, C = obs.images.shape[:2]
        T, W = c.tokens_per_image, c.vlm_width
        dev = self.device
        # images: only the valid (b, camera) pairs go through SigLIP
        img_valid = obs.image_masks
        sel = obs.images[img_valid]  # (n, 3, Hi, Wi); n is known after this one (syncing) selection
        if value_checks_enabled(dev) and sel.shape[0]:  # valid cameras only: a masked camera may hold anything
            lo, hi = host_min_max(sel)
            if not (-_IMAGE_BOUND <= lo and hi <= _IMAGE_BOUND):
                raise ValueError(f"Pi0Policy: obs.images must lie in [-1, 1] (checked at ±{_IMAGE_BOUND}) on the "
                                 f"valid cameras, got values in [{lo:.4g}, {hi:.4g}] (pixels in [0, 255]? use "
                                 "x / 127.5 − 1; NaN?)")
        if sel.shape[0] == 0:  # no camera in the whole batch (language only): SigLIP cannot run on 0 images
            img_emb = torch.zeros(B, C, T, W, device=dev)
        else:
            feats = self.embed_images(sel)  # (n, T, W)
            img_emb = feats.new_zeros(B, C, T, W).index_put((img_valid,), feats)
        emb = torch.cat([img_emb.view(B, C * T, W).to(dt), self.embed_language(obs.tokens).to(dt)], dim=1)
        valid = torch.cat([img_valid.repeat_interleave(T, dim=1), obs.token_masks], dim=1)
        lens = valid.sum(1)
        shortest, P = host_min_max(lens) if B else (1, 0)  # one host read: P sizes h
        if shortest == 0:
            raise ValueError("Pi0Policy: an observation has no valid prefix token (all cameras and tokens masked)")
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :P]  # valid first, in order
        h = emb.gather(1, order[..., None].expand(B, P, W))
        pmask = torch.arange(P, device=dev)[None, :] < lens[:, None]  # (B, P)
        pos = torch.arange(P, device=dev)[None].expand(B, P)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, dt)
        eye = torch.eye(P, dtype=torch.bool, device=dev)
        allowed = (pmask[:, None, :] & pmask[:, :, None]) | eye  # padding rows see themselves (no NaN)
        scale = c.head_dim ** -0.5
        pi0 = c.variant == "pi0"
        if pi0:
            hs = linear_f32(self.state_proj, obs.state)[:, None, :].to(dt)  # (B, 1, We)
            cos_s, sin_s = rope_cos_sin(lens[:, None], c.head_dim, c.rope_theta, dt)
            allowed_s = torch.cat([pmask, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)[:, None, :]
        else:
            hs = None

        def layer(li: int, h: torch.Tensor, hs: torch.Tensor | None):
            """Prefix layer ``li``: ``(h, hs)`` → ``(h', hs', K, V)`` (K/V after RoPE, the state token's last)."""
            lv = self.vlm.layers[li]
            q, k, v, gate = self._qkv(lv, h, None, cos, sin)
            attn = _dense_attention(q, k, v, allowed, scale)
            if pi0:
                le = self.expert.layers[li]
                qs, k_s, v_s, gate_s = self._qkv(le, hs, None, cos_s, sin_s)
                k, v = torch.cat([k, k_s], 1), torch.cat([v, v_s], 1)
                attn_s = _dense_attention(qs, k, v, allowed_s, scale)
                hs = self._post(le, hs, attn_s, gate_s, None)
            return self._post(lv, h, attn, gate, None), hs, k, v

        ks, vs = [], []
        for li in range(c.depth):
            h, hs, k, v = self._run_layer("vlm", layer, li, h, hs)
            ks.append(k)
            vs.append(v)
        out, _ = self.vlm.norm(h)
        w = pmask.float()[..., None]
        pooled = (out.float() * w).sum(1) / w.sum(1).clamp_min(1.0)
        if pi0:
            pmask = torch.cat([pmask, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        return PrefixCache(
            keys=torch.stack(ks), values=torch.stack(vs), prefix_mask=pmask, prefix_lens=lens,
            suffix_offset=lens + (1 if pi0 else 0), pooled=pooled, encoder=id(self), weights_version=version,
            variant=c.variant,
        )

    def prefix_weights_version(self) -> int:
        """A number that changes whenever the weights a :class:`PrefixCache` depends on (SigLIP,
        projector, embeddings, VLM; π0: also ``state_proj`` and the expert) may have changed: the sum
        of their autograd version counters (every in-place update through autograd's view of a
        tensor bumps it: a torch optimizer step, ``copy_``) plus a generation counter that
        :meth:`mark_weights_updated` and ``load_state_dict`` advance. ~0.1 µs per tensor."""
        if self._prefix_params is None:
            mods = [self.vision_tower, self.projector, self.embed_tokens, self.vlm]
            if self.config.variant == "pi0":
                mods += [self.state_proj, self.expert]
            self._prefix_params = tuple(q for m in mods for q in m.parameters())
        return (self._weights_generation << 48) + sum(q._version for q in self._prefix_params)

    def mark_weights_updated(self) -> Pi0Policy:
        """Declare that the weights changed by a path autograd's version counters do not see, so that
        caches encoded before are refused as stale. Writes through ``param.data`` are such a path:
        DeepSpeed's ZeRO and bf16 optimizers update the weights that way (the trainer calls this after
        every optimizer step), as does code that assigns new Parameter objects. ``load_state_dict``
        (also with ``assign=True``, also through a parent module) calls it itself."""
        self._weights_generation += 1
        self._prefix_params = None  # Parameter objects may have been replaced
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to() / .cuda() / .half() may replace the Parameter objects (torch.__future__'s overwrite option);
        # a cache on another device or in another dtype is refused by _as_cache's own checks
        self._prefix_params = None
        return super()._apply(fn, recurse)

    def _as_cache(self, obs_or_cache: Observation | PrefixCache) -> PrefixCache:
        if isinstance(obs_or_cache, PrefixCache):
            cache = obs_or_cache
            if cache.keys.device != self.device:
                raise ValueError(f"Pi0Policy: the PrefixCache is on {cache.keys.device} but the policy is on "
                                 f"{self.device}")
            c = self.config
            want = (c.depth, c.num_kv_heads, c.head_dim)
            if cache.keys.dim() != 5 or (cache.keys.shape[0], *cache.keys.shape[3:]) != want or \
                    cache.values.shape != cache.keys.shape:
                raise ValueError(f"Pi0Policy: the PrefixCache's keys/values {tuple(cache.keys.shape)} do not fit this "
                                 f"policy: expected (depth={c.depth}, B, P, num_kv_heads={c.num_kv_heads}, "
                                 f"head_dim={c.head_dim}); it was encoded by another policy")
            B, P = cache.keys.shape[1], cache.keys.shape[2]
            if B == 0:
                raise ValueError("Pi0Policy: the PrefixCache holds no observation (batch 0)")
            want_shapes = {"prefix_mask": ((B, P), (torch.bool,)), "prefix_lens": ((B,), (torch.int64, torch.int32)),
                           "suffix_offset": ((B,), (torch.int64, torch.int32)),
                           "pooled": ((B, c.vlm_width), (torch.float32,))}
            for name, (shape, dtypes) in want_shapes.items():
                t = getattr(cache, name)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype not in dtypes \
                        or t.device != cache.keys.device:
                    got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                           else type(t).__name__)
                    raise ValueError(f"Pi0Policy: the PrefixCache's {name} must be a {shape} "
                                     f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} tensor on "
                                     f"{cache.keys.device} (B={B} observations and P={P} slots, as its keys), "
                                     f"got {got}; slice every field of a cache together")
            if cache.variant is not None and cache.variant != c.variant:
                raise ValueError(f"Pi0Policy: the PrefixCache was encoded by a {cache.variant} policy, this one is "
                                 f"{c.variant} (π0's cache holds the state token)")
            if cache.keys.dtype != self.compute_dtype:
                raise ValueError(f"Pi0Policy: the PrefixCache is {cache.keys.dtype}, the policy computes in "
                                 f"{self.compute_dtype} (encode it again after set_precision)")
            if (cache.encoder == id(self) and cache.weights_version is not None
                    and cache.weights_version != self.prefix_weights_version()):
                raise ValueError("Pi0Policy: the PrefixCache is stale: the prefix weights (SigLIP, VLM"
                                 + (", state projection, expert" if self.config.variant == "pi0" else "")
                                 + ") were updated after encode_prefix (an optimizer step, load_state_dict or "
                                 "mark_weights_updated); re-run encode_prefix(obs) (or set the cache's "
                                 "weights_version to None to use it anyway)")
            return cache
        return self.encode_prefix(obs_or_cache)

    # ---------------------------------------------------------------- suffix

    def time_constants(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything that depends only on the time, for times ``t (T,)`` float32.

        π0: ``time_term (T, 1, We)`` = the time half of ``action_time_mlp_in`` (+ its bias).
        π0.5: ``mods`` — per expert layer the adaRMS ``(scale, shift, gate)`` of both norms, and of
        the final norm, each ``(T, 1, We)`` float32.
        """
        c = self.config
        We = c.expert_width
        emb = sinusoidal_time_embedding(t.float(), We, c.min_period, c.max_period)
        if c.variant == "pi0":
            # W[:, We:]·emb + b through the module's own forward (no weight slicing: ZeRO-3 partitions
            # parameters and gathers them only inside their module's forward)
            lin = self.action_time_mlp_in
            return {"time_term": linear_f32(lin, torch.cat([torch.zeros_like(emb), emb], dim=-1))[:, None, :]}
        cond = F.silu(linear_f32(self.time_mlp_out, F.silu(linear_f32(self.time_mlp_in, emb))))

        def mod(norm):
            return tuple(m[:, None, :] for m in norm.modulation(cond))

        layers = [(mod(ly.input_layernorm), mod(ly.post_attention_layernorm)) for ly in self.expert.layers]
        return {"layers": layers, "final": mod(self.expert.norm)}

    @staticmethod
    def _select_time(tc: dict, idx) -> dict:
        """Time constants of one step (``idx`` an int slice) or per row (``idx`` an index tensor)."""
        def sel(x):
            return x[idx : idx + 1] if isinstance(idx, int) else x[idx]
        if "time_term" in tc:
            return {"time_term": sel(tc["time_term"])}
        return {"layers": [(tuple(sel(m) for m in a), tuple(sel(m) for m in b)) for a, b in tc["layers"]],
                "final": tuple(sel(m) for m in tc["final"])}

    def suffix_rope(self, cache: PrefixCache, group_size: int, rows_per_obs: int | None = None):
        """cos/sin ``(B·R, H, 1, d)`` for the action tokens (R = rows per observation)."""
        c = self.config
        R = rows_per_obs or group_size
        pos = cache.suffix_offset.repeat_interleave(R)[:, None] + torch.arange(c.action_horizon, device=self.device)
        return rope_cos_sin(pos, c.head_dim, c.rope_theta, self.compute_dtype)

    def suffix_features(self, cache: PrefixCache, x: torch.Tensor, tc: dict, group_size: int, rope) -> torch.Tensor:
        """Action tokens through the expert over the cached prefix.

        Args:
            cache: prefix of B observations; x: ``(B·N, H, D)`` float32 noisy actions (rows of one
                observation consecutive); tc: time constants broadcastable to the rows
                (:meth:`time_constants`); group_size: N; rope: :meth:`suffix_rope`.
        Returns:
            ``(B·N, H, We)`` final-normed expert features (compute dtype).
        """
        c = self.config
        dt = self.compute_dtype
        We = c.expert_width
        a = linear_f32(self.action_in_proj, x)
        if c.variant == "pi0":
            # W[:, :We]·a + (W[:, We:]·emb + b): the action half as lin([a, 0]) − lin(0) (see time_constants)
            lin = self.action_time_mlp_in
            z = torch.zeros(*a.shape[:-1], We, dtype=a.dtype, device=a.device)
            bias = linear_f32(lin, torch.zeros(1, 2 * We, dtype=a.dtype, device=a.device))
            h = F.silu(linear_f32(lin, torch.cat([a, z], dim=-1)) - bias + tc["time_term"])
            h = linear_f32(self.action_time_mlp_out, h)
            mods = [(None, None)] * c.depth
            fmod = None
        else:
            h = a
            mods, fmod = tc["layers"], tc["final"]
        h = h.to(dt)
        cos, sin = rope
        scale = c.head_dim ** -0.5

        def layer(li: int, h: torch.Tensor) -> torch.Tensor:
            le = self.expert.layers[li]
            q, k, v, gate = self._qkv(le, h, mods[li][0], cos, sin)
            attn = fk.prefix_attention(q, k, v, cache.keys[li], cache.values[li], prefix_mask=cache.prefix_mask,
                                       group_size=group_size, scale=scale)
            return self._post(le, h, attn, gate, mods[li][1])

        for li in range(c.depth):
            h = self._run_layer("expert", layer, li, h)
        out, _ = self.expert.norm(h, fmod)
        return out

    def velocity(self, feats: torch.Tensor) -> torch.Tensor:
        """Expert features ``(…, H, We)`` → velocity ``(…, H, D)`` float32."""
        return linear_f32(self.action_out_proj, feats)

    # ---------------------------------------------------------------- sampling

    def sample_actions(
        self,
        obs_or_cache: Observation | PrefixCache,
        mode: str = "ode",
        num_steps: int | None = None,
        group_size: int = 1,
        noise: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
        sde_steps: torch.Tensor | None = None,
        noise_level: float | None = None,
        dim_mask: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
        return_chain: bool = True,
        generator: torch.Generator | None = None,
        cuda_graph: bool = False,
    ) -> SampleResult:
        """Denoise K steps from ``x_{t_0} = ε`` on the grid ``t_k = 1 − k/K`` (no gradients).

        Args:
            obs_or_cache: an :class:`Observation` of B observations or their :class:`PrefixCache`.
            mode: ``"ode"`` (Euler), ``"sde"`` (Flow-SDE) or ``"noise"`` (Flow-Noise, std from the
                noise head).
            num_steps: K (default ``config.num_steps``).
            group_size: N rows per observation (sharing one prefix); rows ``b·N … b·N + N − 1``.
            noise: ``(B·N, H, D)`` float32 initial noise ε (default: drawn from ``generator``).
            step_noise: ``(B·N, K, H, D)`` float32 transition noise for sde / noise (an error with
                ode; default: drawn inside flowkernels.flow_step from a seed drawn from ``generator``).
            sde_steps: ``(B·N,)`` int64: with mode ``"sde"``, only step ``k*`` of each row is
                stochastic (Flow-SDE's hybrid), the others ODE. None: every step SDE. Each must lie
                in ``[0, K)``; with value checks off (``flowkernels.set_value_checks(False)``, the
                trainer's setting on a GPU) that is not checked and a row with a step outside it is
                all ODE (log-prob 0).
            noise_level: Flow-SDE ``a`` (default ``config.noise_level``).
            dim_mask: ``(D,)`` / ``(B·N, D)``; step_mask: ``(H,)`` / ``(B·N, H)``: elements summed in
                the log-probs.
            return_chain: keep the chain, means and stds (else only actions and log-probs).
            cuda_graph: capture the K-step loop in a CUDA graph (CUDA only; replayed on later
                calls with the same cache object and shapes; ``noise`` and ``step_noise`` are
                drawn outside the graph).
        Returns:
            :class:`SampleResult`.
        """
        c = self.config
        if mode not in MODES:
            raise ValueError(f"Pi0Policy.sample_actions: mode must be one of {MODES}, got {mode!r}")
        K = _check_count("sample_actions", "num_steps", c.num_steps if num_steps is None else num_steps)
        group_size = _check_count("sample_actions", "group_size", group_size)
        a = c.noise_level if noise_level is None else as_float("Pi0Policy", "noise_level", noise_level, "a real number")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Pi0Policy.sample_actions: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        with torch.no_grad():
            cache = self._as_cache(obs_or_cache)
            B, N = cache.batch_size, group_size
            BN, H, D = B * N, c.action_horizon, c.action_dim
            dev = self.device
            if noise is None:
                noise = torch.randn(BN, H, D, device=dev, generator=generator)
            self._check_actions("noise", noise, (BN,))
            if step_noise is not None:
                if mode == "ode":
                    raise ValueError("Pi0Policy.sample_actions: step_noise is only used by modes 'sde' and 'noise' "
                                     "(mode 'ode' adds no transition noise)")
                self._check_actions("step_noise", step_noise, (BN, K))
            if sde_steps is not None:
                if mode != "sde":
                    raise ValueError("Pi0Policy.sample_actions: sde_steps is only used with mode 'sde'")
                if not isinstance(sde_steps, torch.Tensor) or sde_steps.shape != (BN,) or sde_steps.dtype not in (
                        torch.int64, torch.int32):
                    got = (f"{sde_steps.dtype} {tuple(sde_steps.shape)}" if isinstance(sde_steps, torch.Tensor)
                           else type(sde_steps).__name__)
                    raise ValueError(f"Pi0Policy.sample_actions: sde_steps must be an int64/int32 tensor of shape "
                                     f"(B·N,) = ({BN},), got {got}")
                if value_checks_enabled(dev) and (int(sde_steps.min()) < 0 or int(sde_steps.max()) >= K):
                    raise ValueError(f"Pi0Policy.sample_actions: sde_steps must lie in [0, K={K})")
            seeds = None
            if mode != "ode" and step_noise is None:
                seeds = torch.randint(0, 2**62, (K,), generator=generator, device="cpu" if generator is None
                                      else generator.device).tolist()
            if cuda_graph:
                return self._sample_graphed(cache, mode, K, N, noise, step_noise, sde_steps, a, dim_mask, step_mask,
                                            return_chain)
            return self._sample_loop(cache, mode, K, N, noise, step_noise, sde_steps, a, dim_mask, step_mask,
                                     return_chain, seeds)

    def _sample_loop(self, cache, mode, K, N, noise, step_noise, sde_steps, a, dim_mask, step_mask, return_chain,
                     seeds=None) -> SampleResult:
        grid = _time_grid(K)
        dt = 1.0 / K
        t_grid = self._t_grid(K)
        tc = self.time_constants(t_grid[:K])
        rope = self.suffix_rope(cache, N)
        x = noise
        xs, means, stds, logps = [x], [], [], []
        for k in range(K):
            feats = self.suffix_features(cache, x, self._select_time(tc, k), N, rope)
            v = self.velocity(feats)
            kw = dict(dim_mask=dim_mask, step_mask=step_mask, noise_level=a,
                      noise=None if step_noise is None else step_noise[:, k],
                      seed=None if seeds is None else seeds[k])
            if mode == "noise":
                r = fk.flow_step(x, v, grid[k], dt, "noise", std=self.noise_head(feats), **kw)
                std = r.std
            elif mode == "sde" and sde_steps is not None:
                r_ode = fk.flow_step(x, v, grid[k], dt, "ode")
                r_sde = fk.flow_step(x, v, grid[k], dt, "sde", **kw)
                sel = (sde_steps == k)
                s3 = sel[:, None, None]
                r = fk.FlowStepResult(torch.where(s3, r_sde.x_next, r_ode.x_next),
                                      torch.where(s3, r_sde.mean, r_ode.mean),
                                      torch.where(s3, r_sde.std, torch.zeros_like(r_sde.std)),
                                      torch.where(sel, r_sde.logp, torch.zeros_like(r_sde.logp)))
                std = r.std
            else:
                r = fk.flow_step(x, v, grid[k], dt, mode, **kw)
                std = r.std
            x = r.x_next
            logps.append(r.logp.float())
            if return_chain:
                xs.append(x)
                means.append(r.mean)
                stds.append(std)
        step_logps = torch.stack(logps, 1)
        init = self._initial_logp(noise, dim_mask, step_mask)
        logp = step_logps.sum(1) + (init if mode == "noise" else 0.0)
        return SampleResult(
            actions=x, chain=torch.stack(xs, 1) if return_chain else None,
            means=torch.stack(means, 1) if return_chain else None,
            stds=torch.stack(stds, 1) if return_chain else None,
            step_logps=step_logps, initial_logp=init, logp=logp, t_grid=t_grid.clone(),  # not the policy's own grid
        )

    def _initial_logp(self, x0: torch.Tensor, dim_mask, step_mask) -> torch.Tensor:
        """``Σ w·(−½ log 2π − ½ x0²)`` over the masked elements, ``(B,)`` float32."""
        w = torch.ones_like(x0[0])
        if step_mask is not None:
            w = w * step_mask.float()[..., :, None] if step_mask.dim() == 1 else w * step_mask.float()[:, :, None]
        if dim_mask is not None:
            w = w * dim_mask.float()[..., None, :] if dim_mask.dim() == 1 else w * dim_mask.float()[:, None, :]
        return ((-0.5 * _LOG_2PI - 0.5 * x0.float().square()) * w).sum((-2, -1))

    def _sample_graphed(self, cache, mode, K, N, noise, step_noise, sde_steps, a, dim_mask, step_mask, return_chain):
        """CUDA-graph capture/replay of :meth:`_sample_loop` (static buffers for the noise)."""
        if self.device.type != "cuda":
            raise ValueError("Pi0Policy.sample_actions: cuda_graph=True needs the policy on a CUDA device")
        BN, H, D = noise.shape
        if mode != "ode" and step_noise is None:
            step_noise = torch.randn(BN, K, H, D, device=self.device)
        key = (id(cache), mode, K, N, BN, a, return_chain, sde_steps is not None, dim_mask is not None,
               step_mask is not None)
        entry = self._graphs.get(key)
        if entry is None or entry["cache"] is not cache:
            st = {"noise": noise.clone(), "step_noise": None if step_noise is None else step_noise.clone(),
                  "sde_steps": None if sde_steps is None else sde_steps.clone(),
                  "dim_mask": None if dim_mask is None else dim_mask.clone(),
                  "step_mask": None if step_mask is None else step_mask.clone()}

            def run():
                return self._sample_loop(cache, mode, K, N, st["noise"], st["step_noise"], st["sde_steps"], a,
                                         st["dim_mask"], st["step_mask"], return_chain)

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):  # warm up (lazy inits, autotuning) outside the capture
                    run()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run()
            entry = {"cache": cache, "graph": graph, "static": st, "out": out}
            self._graphs = {key: entry}  # one live graph (it pins the cache's memory)
        st = entry["static"]
        for name, val in (("noise", noise), ("step_noise", step_noise), ("sde_steps", sde_steps),
                          ("dim_mask", dim_mask), ("step_mask", step_mask)):
            if val is not None:
                st[name].copy_(val)
        entry["graph"].replay()
        out = entry["out"]
        return SampleResult(*(None if f is None else f.clone() for f in (
            out.actions, out.chain, out.means, out.stds, out.step_logps, out.initial_logp, out.logp, out.t_grid)))

    # ---------------------------------------------------------------- training-time recomputation

    def cfm_losses(
        self,
        obs_or_cache: Observation | PrefixCache,
        actions: torch.Tensor,
        noise: torch.Tensor,
        tau: torch.Tensor,
        dim_mask: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-pair conditional flow-matching losses, N (τ, ε) pairs per observation, one prefix pass.

        Args:
            actions: ``(B, H, D)`` float32 action chunks A; noise: ``(B, N, H, D)`` ε; tau: ``(B, N)`` τ.
            dim_mask: ``(D,)`` / ``(B, D)``; step_mask: ``(H,)`` / ``(B, H)``.
        Returns:
            ``(B, N)`` float32 ``mean over masked (h, d) of (v(x_τ, τ) − (ε − A))²``, differentiable.
        """
        cache = self._as_cache(obs_or_cache)
        B = cache.batch_size
        self._check_actions("actions", actions, (B,))
        if not isinstance(noise, torch.Tensor) or noise.dim() != 4 or noise.shape[0] != B:
            raise ValueError(f"Pi0Policy.cfm_losses: noise must be (B={B}, N, H, D), got "
                             f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        N = noise.shape[1]
        if N == 0:
            raise ValueError("Pi0Policy.cfm_losses: noise must hold N >= 1 (tau, eps) pairs per observation, got "
                             f"{tuple(noise.shape)}")
        self._check_actions("noise", noise, (B, N))
        if not isinstance(tau, torch.Tensor) or tau.shape != (B, N):
            raise ValueError(f"Pi0Policy.cfm_losses: tau must be (B, N) = ({B}, {N})")
        x_tau = fk.cfm_interpolate(actions, noise, tau)  # (B, N, H, D)
        tc = self.time_constants(tau.reshape(-1).float())
        feats = self.suffix_features(cache, x_tau.reshape(B * N, *x_tau.shape[2:]), tc, N, self.suffix_rope(cache, N))
        v = self.velocity(feats).view(B, N, *actions.shape[1:])
        return fk.cfm_loss(actions, noise, tau, v, dim_mask=dim_mask, step_mask=step_mask)

    def chain_logprob(
        self,
        obs_or_cache: Observation | PrefixCache,
        chain: torch.Tensor,
        mode: str,
        group_size: int = 1,
        steps: torch.Tensor | None = None,
        noise_level: float | None = None,
        dim_mask: torch.Tensor | None = None,
        step_mask: torch.Tensor | None = None,
        include_initial: bool | None = None,
        reduce: str = "sum",
    ) -> torch.Tensor:
        """Log-prob of stored chains under the current weights (velocities recomputed with gradients).

        All K (or, with ``steps``, the one) velocities of all ``B·N`` rows are one suffix pass
        over one prefix pass (``N·K`` rows per observation share the prefix).

        Args:
            chain: ``(B·N, K+1, H, D)`` float32 from :meth:`sample_actions`.
            mode: ``"noise"`` (Flow-Noise joint likelihood; std from the noise head) or ``"sde"``.
            steps: ``(B·N,)`` int64: Flow-SDE's stochastic step ``k*`` per row (single transition).
            include_initial: add ``log N(x_{t_0}; 0, I)`` (default: True for noise, False for sde).
            reduce: ``"sum" | "mean" | "none"`` as in ``flowkernels.chain_logprob``.
        Returns:
            ``(B·N,)`` float32 (``(B·N, K+1)`` for reduce ``"none"``), differentiable.
        """
        if mode not in ("sde", "noise"):
            raise ValueError(f"Pi0Policy.chain_logprob: mode must be 'sde' or 'noise', got {mode!r}")
        N = _check_count("chain_logprob", "group_size", group_size)
        cache = self._as_cache(obs_or_cache)
        c = self.config
        BN = cache.batch_size * N
        if not isinstance(chain, torch.Tensor) or chain.dim() != 4 or chain.shape[0] != BN:
            raise ValueError(f"Pi0Policy.chain_logprob: chain must be (B·N={BN}, K+1, H, D), got "
                             f"{tuple(chain.shape) if isinstance(chain, torch.Tensor) else type(chain).__name__}")
        K = chain.shape[1] - 1
        if K < 1:
            raise ValueError(f"Pi0Policy.chain_logprob: chain must hold K+1 >= 2 states (at least one denoising step), "
                             f"got {tuple(chain.shape)}")
        self._check_actions("chain", chain, (BN, K + 1))
        t_grid = self._t_grid(K)
        tc = self.time_constants(t_grid[:K])
        a = c.noise_level if noise_level is None else as_float("Pi0Policy", "noise_level", noise_level, "a real number")
        if include_initial is None:
            include_initial = mode == "noise"
        elif not isinstance(include_initial, bool):
            raise TypeError(f"Pi0Policy.chain_logprob: include_initial must be a bool or None, got "
                            f"{type(include_initial).__name__}")
        if steps is not None:
            if not isinstance(steps, torch.Tensor) or steps.shape != (BN,):
                raise ValueError(f"Pi0Policy.chain_logprob: steps must be an int tensor of shape ({BN},)")
            if steps.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"Pi0Policy.chain_logprob: steps must be int64 step indices, got {steps.dtype}")
            if steps.device != self.device:
                raise ValueError(f"Pi0Policy.chain_logprob: steps is on {steps.device} but the policy is on "
                                 f"{self.device}")
            if value_checks_enabled(self.device) and BN:
                lo, hi = host_min_max(steps)
                if lo < 0 or hi >= K:
                    raise ValueError(f"Pi0Policy.chain_logprob: steps must lie in [0, K={K}), got [{lo}, {hi}]")
            x = chain[torch.arange(BN, device=self.device), steps.long()]  # (BN, H, D)
            feats = self.suffix_features(cache, x, self._select_time(tc, steps.long()), N, self.suffix_rope(cache, N))
            v = self.velocity(feats)[:, None]
            # the op takes std for all K steps and reads only k*'s (the others get zero gradient, so the
            # expand's backward hands k*'s gradient back unchanged)
            std = self.noise_head(feats)[:, None].expand(-1, K, -1, -1) if mode == "noise" else None
        else:
            x = chain[:, :K].reshape(BN * K, *chain.shape[2:])  # rows (b, n, k): N·K rows per observation
            k_idx = torch.arange(K, device=self.device).repeat(BN)
            feats = self.suffix_features(cache, x, self._select_time(tc, k_idx), N * K,
                                         self.suffix_rope(cache, N * K))
            v = self.velocity(feats).view(BN, K, *chain.shape[2:])
            std = self.noise_head(feats).view(BN, K, *chain.shape[2:]) if mode == "noise" else None
        return fk.chain_logprob(chain, v, t_grid, mode, std=std, noise_level=a, dim_mask=dim_mask,
                                step_mask=step_mask, steps=steps, include_initial=include_initial, reduce=reduce)

    # ---------------------------------------------------------------- value heads

    def value(self, obs_or_cache: Observation | PrefixCache, side: str = "vlm", detach: bool = True) -> torch.Tensor:
        """Ensemble values ``(B, M)`` float32.

        ``side="vlm"``: on the mean of the VLM's final-normed prefix outputs (π0.5-style critic).
        ``side="expert"``: on the mean of the action expert's output tokens for ``x = 0`` at
        ``t = 1`` (one suffix pass). The features are detached unless ``detach=False``.
        """
        cache = self._as_cache(obs_or_cache)
        if side == "vlm":
            feats = cache.pooled
            head = self.value_vlm
        elif side == "expert":
            c = self.config
            B = cache.batch_size
            x = torch.zeros(B, c.action_horizon, c.action_dim, device=self.device)
            tc = self.time_constants(torch.ones(1, device=self.device))
            feats = self.suffix_features(cache, x, tc, 1, self.suffix_rope(cache, 1)).float().mean(1)
            head = self.value_expert
        else:
            raise ValueError(f"Pi0Policy.value: side must be 'vlm' or 'expert', got {side!r}")
        return head(feats.detach() if detach else feats)

    # ---------------------------------------------------------------- freezing

    def freeze(self, mode: str = "expert_only") -> Pi0Policy:
        """Set ``requires_grad``.

        * ``expert_only``: train the action expert, the action/state/time projections and the
          heads; freeze the vision tower, projector, token embeddings and the VLM.
        * ``expert_and_vlm``: also train the VLM (Gemma layers, token embeddings, projector);
          freeze only the vision tower.
        * ``none``: everything trainable.
        """
        if mode not in FREEZE_MODES:
            raise ValueError(f"Pi0Policy.freeze: mode must be one of {FREEZE_MODES}, got {mode!r}")
        for p in self.parameters():
            p.requires_grad_(True)
        frozen: list[nn.Module] = []
        if mode in ("expert_only", "expert_and_vlm"):
            frozen.append(self.vision_tower)
        if mode == "expert_only":
            frozen += [self.projector, self.embed_tokens, self.vlm]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        return self

    # ---------------------------------------------------------------- weights

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically
        (temp file in the same directory, then ``os.replace``). The safetensors metadata records a
        SHA-256 digest of the weights, which :meth:`from_pretrained` checks. ``state_dict``: the
        weights to write instead of ``self.state_dict()`` (e.g. parameters gathered from ZeRO-3
        partitions, whose local tensors are empty)."""
        from flowrl.checkpoint import write_atomic
        from flowrl.models.weights import save_safetensors

        own = self.state_dict()
        if state_dict is not None:
            if set(state_dict) != set(own):
                missing, extra = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
                raise ValueError(f"save_pretrained: state_dict keys differ from the policy's: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            # full shapes (a ZeRO-3 partitioned parameter's local tensor is empty; its ds_shape is the full one)
            full = {k: tuple(v.shape) for k, v in own.items()}
            full.update({k: tuple(getattr(p, "ds_shape", p.shape))
                         for k, p in self.named_parameters(remove_duplicate=False)})
            bad = [f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}, expected {full[k]}"
                   for k, v in state_dict.items() if not isinstance(v, torch.Tensor) or tuple(v.shape) != full[k]]
            if bad:
                what = "entry does" if len(bad) == 1 else "entries do"
                raise ValueError(f"save_pretrained: {len(bad)} state_dict {what} not have the policy's shape "
                                 f"(nothing written): {'; '.join(bad[:5])}")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in (own if state_dict is None else state_dict).items()}
        meta = {"format": "pt", "flowrl": "pi0policy"}
        write_atomic(d / "model.safetensors", lambda p: save_safetensors(state, p, meta))
        cfg = {"flowrl_policy": True, **self.config.to_dict()}
        write_atomic(d / "config.json", json.dumps(cfg, indent=2, sort_keys=True).encode())

    def save_lerobot(self, directory: str | os.PathLike, like: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the weights as a lerobot PI0Policy / PI05Policy (or openpi PyTorch) checkpoint in the layout of
        ``like``, the checkpoint they were loaded from: lerobot's ``from_pretrained`` then loads them. See
        :func:`flowrl.models.weights.save_lerobot`."""
        from flowrl.models.weights import save_lerobot

        return save_lerobot(self, directory, like, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config: PolicyConfig | None = None,
                        strict: bool = True, verify: bool = True, **overrides: Any) -> Pi0Policy:
        """Load a local checkpoint directory: this project's format, lerobot's PI0/PI05
        (``model.safetensors`` + ``config.json``) or openpi's PyTorch conversion. Never contacts
        a hub. See :func:`flowrl.models.weights.load_policy`."""
        from flowrl.models.weights import load_policy

        return load_policy(cls, directory, config=config, strict=strict, verify=verify, **overrides)
