"""Drop flowkernels into lerobot's π0 / π0.5 (``PI0Policy`` / ``PI05Policy``, lerobot 0.6.x).

Liger-Kernel style: one call patches the model, one call undoes it::

    from flowkernels.integrations.lerobot import apply_flowkernels, revert_flowkernels

    apply_flowkernels(PI0Policy)          # the class, before construction (patches PI0Pytorch)
    policy = PI0Policy.from_pretrained(...)
    # or a live instance (PI0Policy or its .model), also when lerobot compiled sample_actions
    apply_flowkernels(policy)
    actions = policy.predict_action_chunk(batch)   # same actions, faster denoising loop
    revert_flowkernels(policy)                     # exactly lerobot's methods again

What changes in ``PI0Pytorch.sample_actions`` / ``PI05Pytorch.sample_actions`` (lerobot's math is
documented in docs/lerobot_pi0.md; the recipe for other π0 ports in docs/lerobot_dropin.md):

* ``reuse_prefix``: the prefix (images + language) runs once through the VLM with lerobot's own
  code and its ``DynamicCache``; the K/V of every layer are then read **in place** by every
  denoising step. lerobot's ``denoise_step`` instead clones the whole cache at every step
  (``clone_past_key_values``) and transformers concatenates the suffix K/V onto the clone: two
  copies of the prefix K/V per layer per step, both gone.
* ``attention``: the action expert's attention over ``[prefix; suffix]`` runs in
  :func:`flowkernels.prefix_attention` (prefix K/V from the cache, ``(B, P, Hkv, d)`` views of
  transformers' ``(B, Hkv, P, d)`` tensors, never copied; the prefix pad mask as ``prefix_mask``;
  the suffix visibility from lerobot's ``att_masks`` as ``suffix_mask``, i.e. π0's state token sees
  only itself among the suffix while the action tokens see the state and all actions; π0.5's
  actions see each other). Without it the same loop runs a plain eager attention.
* ``denoise``: the Euler update ``x ← x + (−1/K)·v`` (lerobot's ``euler_integrate``, t = 1 noise)
  runs in :func:`flowkernels.flow_step` with ``mode="ode"``, ``t = 1 − k/K``, ``dt = +1/K``
  (flowkernels' convention ``x' = x − dt·v``: the same update).

The expert stack itself (adaRMS norms, RoPE, GeGLU, gated residuals) is lerobot's modules called
layer by layer, so any checkpoint lerobot loads works unchanged. Real-time chunking (RTC) falls back
to lerobot's own ``sample_actions``.

It also adds ``sample_actions_with_logprob`` (Flow-SDE / Flow-Noise rollouts with log-probs, for RL
from a lerobot checkpoint; see :func:`_sample_with_logprob`).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

import flowkernels as fk

__all__ = ["FlowSample", "apply_flowkernels", "is_patched", "revert_flowkernels"]

# Names this module sets on PI0Pytorch / PI05Pytorch (class or instance).
_PATCHED = ("sample_actions", "sample_actions_with_logprob")
_MODEL_CLASSES = {"PI0Pytorch": "pi0", "PI05Pytorch": "pi05"}
_POLICY_TO_MODEL = {"PI0Policy": "PI0Pytorch", "PI05Policy": "PI05Pytorch"}
# class -> {name: original __dict__ entry}, only the names the class defined itself (the others are deleted on
# revert). No sentinel object: a deepcopy of a patched instance copies its saved entries, and a sentinel's
# copy would no longer be the sentinel.
_CLASS_SAVED: dict[type, dict[str, Any]] = {}
_INSTANCE_SAVED = "_flowkernels_saved"
#: lerobot releases this module is written against (its PI0Pytorch / PI05Pytorch internals)
TESTED_LEROBOT = "0.6"
#: what the patched methods call on the model and its module (checked when patching)
_MODEL_API = ("embed_prefix", "embed_suffix", "denoise_step", "_rtc_enabled", "sample_noise")
_MODULE_API = ("make_att_2d_masks", "prepare_attention_masks_4d")


@dataclass(frozen=True)
class _Options:
    attention: bool
    denoise: bool
    reuse_prefix: bool
    backend: str


class FlowSample(NamedTuple):
    """Result of ``sample_actions_with_logprob``.

    actions: ``(B, H, D)`` float32 (= ``chain[:, -1]``); chain: ``(B, K+1, H, D)`` the states
    ``x_{t_0} = noise, …, x_{t_K}``; logprob: ``(B,)`` sum of the per-step transition log-probs
    (no ``log N(x_0; 0, I)`` term); step_logprob: ``(B, K)``; velocities: ``(B, K, H, D)`` the
    model's ``v(x_{t_k}, t_k)``; t_grid: ``(K+1,)`` float32 ``1 − k/K``; std: ``(B, K, H, D)`` for
    mode ``"noise"``, else None.
    """

    actions: torch.Tensor
    chain: torch.Tensor
    logprob: torch.Tensor
    step_logprob: torch.Tensor
    velocities: torch.Tensor
    t_grid: torch.Tensor
    std: torch.Tensor | None


# ------------------------------------------------------------------------------------------------
# The math: prefix once, expert stack per step with prefix_attention, flow_step updates
# ------------------------------------------------------------------------------------------------


class _Prefix(NamedTuple):
    keys: list[torch.Tensor]  # per expert layer: (B, P, Hkv, d) views of the VLM cache, post-RoPE
    values: list[torch.Tensor]
    pad_masks: torch.Tensor  # (B, P) bool: valid prefix tokens
    offsets: torch.Tensor  # (B, 1): number of valid prefix tokens (first suffix position)
    cache: Any  # lerobot's DynamicCache (for the lerobot denoise_step fallback)
    casts: dict  # (layer, dtype) -> that layer's prefix K/V in another dtype (autocast), made once per prefix


def _lerobot_module(model: torch.nn.Module) -> types.ModuleType:
    for klass in type(model).__mro__:
        if klass.__name__ in _MODEL_CLASSES:
            return sys.modules[klass.__module__]
    raise TypeError(f"flowkernels: {type(model).__name__} is not a lerobot PI0Pytorch / PI05Pytorch")


def _variant(model_or_cls: Any) -> str:
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    for klass in cls.__mro__:
        if klass.__name__ in _MODEL_CLASSES:
            return _MODEL_CLASSES[klass.__name__]
    raise TypeError(f"flowkernels: {cls.__name__} is not a lerobot PI0Pytorch / PI05Pytorch")


def _compute_prefix(model, images, img_masks, lang_tokens, lang_masks) -> _Prefix:
    """lerobot's prefix pass (m0:668–686), once per observation; the cache is only read afterwards."""
    mod = _lerobot_module(model)
    prefix_embs, pad_masks, att_masks = model.embed_prefix(images, img_masks, lang_tokens, lang_masks)
    att_2d = mod.make_att_2d_masks(pad_masks, att_masks)
    position_ids = torch.cumsum(pad_masks, dim=1) - 1
    att_4d = mod.prepare_attention_masks_4d(att_2d)
    model.paligemma_with_expert.paligemma.model.language_model.config._attn_implementation = "eager"
    _, cache = model.paligemma_with_expert.forward(
        attention_mask=att_4d,
        position_ids=position_ids,
        past_key_values=None,
        inputs_embeds=[prefix_embs, None],
        use_cache=True,
    )
    if cache is None:  # transformers turns use_cache off under gradient checkpointing in train mode
        raise RuntimeError("flowkernels: lerobot's prefix pass returned no KV cache (gradient checkpointing in "
                           "train mode disables it); call policy.eval() before sampling")
    # transformers stores (B, Hkv, P, d); prefix_attention takes (B, P, Hkv, d): a transposed view
    # (stride 1 in d), no copy.
    keys = [layer.keys.transpose(1, 2) for layer in cache.layers]
    values = [layer.values.transpose(1, 2) for layer in cache.layers]
    offsets = torch.sum(pad_masks, dim=-1)[:, None]
    return _Prefix(keys, values, pad_masks, offsets, cache, {})


def _prefix_kv(prefix: _Prefix, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``i``'s prefix K/V in ``dtype``: the cache's own tensors, or (under autocast, where the prefix
    pass and the suffix projections differ in dtype) one converted copy per prefix, not per step."""
    k, v = prefix.keys[i], prefix.values[i]
    if k.dtype == dtype:
        return k, v
    key = (i, dtype)
    if key not in prefix.casts:
        prefix.casts[key] = (k.to(dtype), v.to(dtype))
    return prefix.casts[key]


def _eager_attention(q, k, v, prefix_k, prefix_v, prefix_mask, suffix_mask, scale):
    """Plain attention over ``cat(prefix, suffix)`` (lerobot's eager math), ``(B, S, H, d)`` layout."""
    B, S, Hq, _ = q.shape
    rep = Hq // k.shape[2]
    keys = torch.cat([prefix_k, k], dim=1).repeat_interleave(rep, dim=2)  # (B, P+S, Hq, d)
    vals = torch.cat([prefix_v, v], dim=1).repeat_interleave(rep, dim=2)
    scores = torch.einsum("bshd,blhd->bhsl", q, keys) * scale
    allowed = torch.cat([prefix_mask[:, None, :].expand(B, S, -1), suffix_mask[None].expand(B, S, S)], dim=-1)
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhsl,blhd->bshd", probs, vals)


def _expert_velocity(model, variant: str, prefix: _Prefix, state, x_t, timestep, opts: _Options):
    """One ``denoise_step`` (m0:705–743) without the cache clone: lerobot's expert layers, attention
    of the suffix over the read-only prefix K/V."""
    from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

    if variant == "pi0":
        suffix_embs, suffix_pad, suffix_att, cond = model.embed_suffix(state, x_t, timestep)
    else:
        suffix_embs, suffix_pad, suffix_att, cond = model.embed_suffix(x_t, timestep)
    B, S = suffix_pad.shape
    position_ids = prefix.offsets + torch.cumsum(suffix_pad, dim=1) - 1
    # lerobot's make_att_2d_masks on the suffix: query i sees key j iff cum[j] <= cum[i]. The suffix
    # ar pattern is the same for every row (π0: [1, 1, 0…]: the state token sees only itself).
    cum = torch.cumsum(suffix_att[0].to(torch.int32), dim=0)
    suffix_mask = cum[None, :] <= cum[:, None]  # (S, S) (query, key)

    expert = model.paligemma_with_expert.gemma_expert.model
    h = suffix_embs
    if expert.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
        h = h.to(torch.bfloat16)  # PiGemmaModel.forward does the same
    cos, sin = expert.rotary_emb(h, position_ids)
    for i, layer in enumerate(expert.layers[: expert.config.num_hidden_layers]):
        attn = layer.self_attn
        residual = h
        hn, gate = layer.input_layernorm(h, cond=cond)
        shape = (B, S, -1, attn.head_dim)
        q = attn.q_proj(hn).view(shape)  # (B, S, Hq, d)
        k = attn.k_proj(hn).view(shape)  # (B, S, Hkv, d)
        v = attn.v_proj(hn).view(shape)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        if opts.attention:
            # one dtype for all (under torch.autocast RoPE promotes some to float32; lerobot's matmuls cast)
            k, v = k.to(q.dtype), v.to(q.dtype)
            pk, pv = _prefix_kv(prefix, i, q.dtype)
            o = fk.prefix_attention(
                q,
                k,
                v,
                pk,
                pv,
                prefix_mask=prefix.pad_masks,
                suffix_mask=suffix_mask,
                scale=attn.scaling,
                backend=opts.backend,
            )
        else:
            o = _eager_attention(q, k, v, prefix.keys[i], prefix.values[i], prefix.pad_masks, suffix_mask, attn.scaling)
        h = _gated_residual(residual, attn.o_proj(o.reshape(B, S, -1)), gate)
        residual = h
        hn, gate = layer.post_attention_layernorm(h, cond=cond)
        h = _gated_residual(residual, layer.mlp(hn), gate)
    h, _ = expert.norm(h, cond=cond)
    out = h[:, -model.config.chunk_size :].to(torch.float32)
    return model.action_out_proj(out)


def _gated_residual(x, y, gate):
    return x + y if gate is None else x + y * gate


def _velocity_fn(model, variant: str, prefix: _Prefix, state, opts: _Options) -> Callable:
    if opts.attention or opts.reuse_prefix:
        return lambda x_t, t: _expert_velocity(model, variant, prefix, state, x_t, t, opts)
    # neither: lerobot's own denoise_step (clones the cache every step)
    if variant == "pi0":
        return lambda x_t, t: model.denoise_step(
            state=state, prefix_pad_masks=prefix.pad_masks, past_key_values=prefix.cache, x_t=x_t, timestep=t
        )
    return lambda x_t, t: model.denoise_step(
        prefix_pad_masks=prefix.pad_masks, past_key_values=prefix.cache, x_t=x_t, timestep=t
    )


def _initial_noise(model, noise, bsize: int, device):
    if noise is not None:
        return noise
    cfg = model.config
    return model.sample_noise((bsize, cfg.chunk_size, cfg.max_action_dim), device)


def _sample_ode(model, variant: str, opts: _Options, images, img_masks, lang_tokens, lang_masks, state, noise, K):
    """lerobot's ``sample_actions`` + ``euler_integrate`` (fm:61) with the pieces replaced."""
    K = model.config.num_inference_steps if K is None else K
    bsize, device = lang_tokens.shape[0], lang_tokens.device
    x = _initial_noise(model, noise, bsize, device)
    prefix = _compute_prefix(model, images, img_masks, lang_tokens, lang_masks)
    velocity = _velocity_fn(model, variant, prefix, state, opts)
    dt = -1.0 / K
    for step in range(K):
        time = 1.0 + step * dt  # computed in double exactly as euler_integrate, then fp32
        v = velocity(x, torch.tensor(time, dtype=torch.float32, device=device).expand(bsize))
        v = v.to(x.dtype)  # under torch.autocast the velocity comes out in the autocast dtype
        if opts.denoise:
            x = fk.flow_step(x, v, time, -dt, "ode", backend=opts.backend).x_next
        else:
            x = x + dt * v
    return x


def _t_grid(K: int, device) -> torch.Tensor:
    return torch.tensor([max(1.0 + k * (-1.0 / K), 0.0) for k in range(K + 1)], dtype=torch.float32, device=device)


@torch.no_grad()
def _sample_with_logprob(
    model,
    variant: str,
    opts: _Options,
    images,
    img_masks,
    lang_tokens,
    lang_masks,
    state=None,
    noise=None,
    num_steps: int | None = None,
    *,
    mode: str = "sde",
    noise_level: float = 0.5,
    noise_std: float | torch.Tensor = 0.1,
    sde_steps: torch.Tensor | None = None,
    dim_mask: torch.Tensor | None = None,
    step_mask: torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> FlowSample:
    """Stochastic rollout of the lerobot model with per-step log-probs (π_RL's Flow-SDE / Flow-Noise).

    Same prefix pass and velocity as the patched ``sample_actions``; each transition is
    :func:`flowkernels.flow_step` on ``t_k = 1 − k/K``, ``dt_k = t_k − t_{k+1}``:

    * ``mode="sde"`` (Flow-SDE): ``noise_level`` is the SDE's ``a``. With ``sde_steps`` (``(B,)`` int)
      only transition ``k* = sde_steps[b]`` is stochastic and the others are ODE steps (π_RL's one
      stochastic step); without it every transition is stochastic.
    * ``mode="noise"`` (Flow-Noise): ``μ = x − dt·v`` plus Gaussian noise of std ``noise_std``. lerobot
      checkpoints have no learned noise head, so the std is **fixed**: a float, or a tensor
      broadcastable to ``(B, K, H, D)``; a learned head would supply it per step.
    * ``mode="ode"``: the deterministic chain (``logprob`` is zero).

    ``noise`` is the initial ``x_1``; the per-step noise is drawn inside flow_step from ``seed``
    (reproducible; step k uses offset ``k·B·H·D``) or ``generator``. The returned ``logprob`` equals
    ``fk.chain_logprob(chain, velocities, t_grid, mode, std=std, noise_level=noise_level,
    steps=sde_steps, dim_mask=..., step_mask=..., include_initial=False)`` with the velocities
    recomputed under the same weights (checked in tests/test_lerobot_dropin.py).
    """
    if mode not in ("sde", "noise", "ode"):
        raise ValueError(f"sample_actions_with_logprob: mode must be 'sde', 'noise' or 'ode', got {mode!r}")
    if variant == "pi0" and state is None:
        raise ValueError("sample_actions_with_logprob: π0 needs `state` (B, max_state_dim)")
    if variant == "pi05" and state is not None:
        raise ValueError("sample_actions_with_logprob: π0.5 takes no `state` (its processor tokenizes it)")
    K = model.config.num_inference_steps if num_steps is None else int(num_steps)
    bsize, device = lang_tokens.shape[0], lang_tokens.device
    x = _initial_noise(model, noise, bsize, device).to(torch.float32)
    B, H, D = x.shape
    prefix = _compute_prefix(model, images, img_masks, lang_tokens, lang_masks)
    velocity = _velocity_fn(model, variant, prefix, state, opts)
    t_grid = _t_grid(K, device)
    std_all = None
    if mode == "noise":
        std_all = torch.as_tensor(noise_std, dtype=torch.float32, device=device).expand(B, K, H, D).contiguous()
    if sde_steps is not None:
        if mode != "sde":
            raise ValueError("sample_actions_with_logprob: sde_steps is only used by mode 'sde'")
        sde_steps = sde_steps.to(device=device, dtype=torch.int64)
    chain, vels, logps = [x], [], []
    for k in range(K):
        t, t_next = float(t_grid[k]), float(t_grid[k + 1])
        dt = t - t_next
        v = velocity(x, t_grid[k].expand(bsize)).to(torch.float32)  # (autocast: in its dtype)
        if mode == "ode":
            x_next = fk.flow_step(x, v, t, dt, "ode", backend=opts.backend).x_next
            logp = torch.zeros(B, dtype=torch.float32, device=device)
        else:
            kw = {"seed": seed, "offset": k * B * H * D} if seed is not None else {"generator": generator}
            res = fk.flow_step(
                x,
                v,
                t,
                dt,
                mode,
                noise_level=noise_level,
                std=None if std_all is None else std_all[:, k],
                dim_mask=dim_mask,
                step_mask=step_mask,
                backend=opts.backend,
                **kw,
            )
            x_next, logp = res.x_next, res.logp
            if sde_steps is not None:
                sel = sde_steps == k
                ode = fk.flow_step(x, v, t, dt, "ode", backend=opts.backend).x_next
                x_next = torch.where(sel[:, None, None], x_next, ode)
                logp = torch.where(sel, logp, torch.zeros_like(logp))
        chain.append(x_next)
        vels.append(v)
        logps.append(logp)
        x = x_next
    step_logprob = torch.stack(logps, dim=1)
    return FlowSample(
        actions=x,
        chain=torch.stack(chain, dim=1),
        logprob=step_logprob.sum(dim=1),
        step_logprob=step_logprob,
        velocities=torch.stack(vels, dim=1),
        t_grid=t_grid,
        std=std_all,
    )


# ------------------------------------------------------------------------------------------------
# The replacement methods (signatures are lerobot's: callers pass arguments positionally)
# ------------------------------------------------------------------------------------------------


def _lerobot_loop_needed(model) -> bool:
    """Real-time chunking, or its debug tracking (which lerobot's loop records even with RTC off): lerobot's
    own ``sample_actions`` runs."""
    if model._rtc_enabled():
        return True
    rtc = getattr(model, "rtc_processor", None)
    return rtc is not None and bool(getattr(rtc, "is_debug_enabled", lambda: False)())


def _lerobot_sample_actions(model) -> Callable:
    """lerobot's own (unpatched) ``sample_actions`` function of the model's class."""
    fn = type(model).sample_actions
    return getattr(fn, "__flowkernels_original__", fn)


def _make_methods(variant: str, original: Callable, opts: _Options) -> dict[str, Callable]:
    if variant == "pi0":

        @torch.no_grad()
        def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None, num_steps=None, **kw):
            if _lerobot_loop_needed(self):
                return original(self, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps, **kw)
            return _sample_ode(self, "pi0", opts, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps)

    else:

        @torch.no_grad()
        def sample_actions(self, images, img_masks, tokens, masks, noise=None, num_steps=None, **kw):
            if _lerobot_loop_needed(self):
                return original(self, images, img_masks, tokens, masks, noise, num_steps, **kw)
            return _sample_ode(self, "pi05", opts, images, img_masks, tokens, masks, None, noise, num_steps)

    def sample_actions_with_logprob(
        self, images, img_masks, lang_tokens, lang_masks, state=None, noise=None, num_steps=None, **kwargs
    ) -> FlowSample:
        return _sample_with_logprob(
            self, variant, opts, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps, **kwargs
        )

    sample_actions.__doc__ = f"flowkernels-patched lerobot sample_actions ({opts})."
    sample_actions_with_logprob.__doc__ = _sample_with_logprob.__doc__
    for fn in (sample_actions, sample_actions_with_logprob):
        fn.__flowkernels_original__ = original
        fn.__flowkernels_options__ = opts
    return {"sample_actions": sample_actions, "sample_actions_with_logprob": sample_actions_with_logprob}


# ------------------------------------------------------------------------------------------------
# apply / revert
# ------------------------------------------------------------------------------------------------


def _model_class(cls: type) -> type:
    for klass in cls.__mro__:
        if klass.__name__ in _MODEL_CLASSES:
            return klass
        if klass.__name__ in _POLICY_TO_MODEL:
            return getattr(sys.modules[klass.__module__], _POLICY_TO_MODEL[klass.__name__])
    raise TypeError(
        f"apply_flowkernels: {cls.__name__} is not lerobot's PI0Policy / PI05Policy / PI0Pytorch / PI05Pytorch"
    )


def _model_instance(obj: torch.nn.Module) -> torch.nn.Module:
    names = {k.__name__ for k in type(obj).__mro__}
    if names & set(_MODEL_CLASSES):
        return obj
    if names & set(_POLICY_TO_MODEL):
        return obj.model
    raise TypeError(
        f"apply_flowkernels: {type(obj).__name__} is not lerobot's PI0Policy / PI05Policy / PI0Pytorch / PI05Pytorch"
    )


def _is_compiled(fn: Any) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None


def _patched_options(fn: Any) -> _Options | None:
    """The options of a patched ``sample_actions`` (bound, compiled or plain), else None."""
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)
    return getattr(getattr(fn, "__func__", fn), "__flowkernels_options__", None)


def _check_lerobot(cls: type) -> None:
    """``cls`` (PI0Pytorch / PI05Pytorch) is lerobot's, with the internals the patched methods call."""
    mod = sys.modules.get(cls.__module__)
    if not cls.__module__.startswith("lerobot.") or mod is None:
        raise TypeError(f"apply_flowkernels: {cls.__module__}.{cls.__name__} is not lerobot's (module "
                        "lerobot.policies.pi0 / pi05); for other π0 ports see docs/lerobot_dropin.md")
    missing = [f"{cls.__name__}.{n}" for n in _MODEL_API if not hasattr(cls, n)]
    missing += [f"{cls.__module__}.{n}" for n in _MODULE_API if not hasattr(mod, n)]
    if missing:
        raise TypeError(f"apply_flowkernels: this lerobot's {cls.__name__} lacks {', '.join(missing)}; the patch is "
                        f"written against lerobot {TESTED_LEROBOT}.x")
    try:
        from importlib.metadata import version

        have = version("lerobot")
    except Exception:  # not installed as a distribution (a source checkout): nothing to compare
        return
    if not (have == TESTED_LEROBOT or have.startswith(TESTED_LEROBOT + ".")):
        warnings.warn(f"apply_flowkernels: lerobot {have} is installed, the patch is tested with "
                      f"{TESTED_LEROBOT}.x; compare patched and unpatched actions once before relying on it",
                      stacklevel=3)


def _options(attention: Any, denoise: Any, reuse_prefix: Any, backend: Any) -> _Options:
    for name, val in (("attention", attention), ("denoise", denoise), ("reuse_prefix", reuse_prefix)):
        if not isinstance(val, bool):
            raise TypeError(f"apply_flowkernels: {name} must be a bool, got {val!r}")
    from flowkernels._backend import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"apply_flowkernels: backend must be one of {BACKENDS}, got {backend!r}")
    return _Options(attention, denoise, reuse_prefix, backend)


def apply_flowkernels(
    policy_or_class: Any,
    *,
    attention: bool = True,
    denoise: bool = True,
    reuse_prefix: bool = True,
    backend: str = "auto",
) -> Any:
    """Patch lerobot's π0 / π0.5 to sample with flowkernels; returns its argument.

    Args:
        policy_or_class: ``PI0Policy`` / ``PI05Policy`` / ``PI0Pytorch`` / ``PI05Pytorch`` (or a
            subclass): the class — its ``PI0Pytorch`` / ``PI05Pytorch`` methods are replaced, so
            every model built afterwards uses them, including lerobot's ``torch.compile`` of
            ``sample_actions`` at construction (``config.compile_model``) — or a live instance
            (policy or ``policy.model``): instance attributes shadow the class methods; when
            lerobot bound a compiled ``sample_actions`` on the instance, the patched method is
            compiled again with ``config.compile_mode``.
        attention: suffix attention in :func:`flowkernels.prefix_attention` (implies reading the
            prefix cache in place).
        denoise: the Euler update in :func:`flowkernels.flow_step` (mode ``"ode"``).
        reuse_prefix: read the prefix K/V in place instead of lerobot's per-step cache clone
            (with ``attention=False`` the suffix attention is a plain eager one). With all three
            False the result is lerobot's loop, through the patched method.
        backend: flowkernels backend for both ops (``"auto"``: Triton on CUDA, the torch path on CPU).

    Applying twice is harmless (the second call replaces the first, with its options). Instances
    built from a patched class while ``config.compile_model`` keep the compiled patched method after
    :func:`revert_flowkernels` of the class (lerobot bound it on the instance at construction);
    ``revert_flowkernels(instance)`` gives them lerobot's own method back, compiled.

    Raises:
        TypeError: not lerobot's π0 / π0.5 (a class of that name from another module, e.g. openpi's
            ``PI0Pytorch``: see docs/lerobot_dropin.md), or a lerobot without the internals the
            patch calls; non-bool options. A lerobot other than 0.6.x gets a warning.
        ValueError: an unknown ``backend``.
    """
    opts = _options(attention, denoise, reuse_prefix, backend)
    if isinstance(policy_or_class, type):
        cls = _model_class(policy_or_class)
        _check_lerobot(cls)
        _revert_class(cls)
        original = cls.sample_actions
        _CLASS_SAVED[cls] = {name: cls.__dict__[name] for name in _PATCHED if name in cls.__dict__}
        for name, fn in _make_methods(_variant(cls), original, opts).items():
            setattr(cls, name, fn)
        return policy_or_class

    model = _model_instance(policy_or_class)
    _check_lerobot(_model_class(type(model)))
    _revert_instance(model)
    saved = {name: model.__dict__[name] for name in _PATCHED if name in model.__dict__}
    original = _lerobot_sample_actions(model)
    compiled = _is_compiled(saved.get("sample_actions")) or bool(getattr(model.config, "compile_model", False))
    for name, fn in _make_methods(_variant(model), original, opts).items():
        bound = types.MethodType(fn, model)
        if name == "sample_actions" and compiled:
            bound = torch.compile(bound, mode=getattr(model.config, "compile_mode", None))
        model.__dict__[name] = bound
    model.__dict__[_INSTANCE_SAVED] = saved
    return policy_or_class


def _revert_class(cls: type) -> None:
    saved = _CLASS_SAVED.pop(cls, None)
    if saved is None:
        return
    for name in _PATCHED:
        if name in saved:
            setattr(cls, name, saved[name])
        elif name in cls.__dict__:
            delattr(cls, name)


def _revert_instance(model: torch.nn.Module) -> None:
    saved = model.__dict__.pop(_INSTANCE_SAVED, None)
    if saved is not None:
        for name in _PATCHED:
            if name in saved:
                model.__dict__[name] = saved[name]
            else:
                model.__dict__.pop(name, None)
    # built from a patched class with config.compile_model: lerobot bound the compiled *patched* method on the
    # instance at construction; it gets lerobot's own method back, compiled as lerobot compiles it
    fn = model.__dict__.get("sample_actions")
    opts = _patched_options(fn) if fn is not None else None
    if opts is not None:
        inner = getattr(fn, "_torchdynamo_orig_callable", fn)  # torch.compile of a bound method keeps its function
        original = getattr(getattr(inner, "__func__", inner), "__flowkernels_original__", None)
        if original is not None:
            bound = types.MethodType(original, model)
            model.__dict__["sample_actions"] = (
                torch.compile(bound, mode=getattr(model.config, "compile_mode", None)) if _is_compiled(fn) else bound)


def revert_flowkernels(policy_or_class: Any) -> Any:
    """Undo :func:`apply_flowkernels` on the same class or instance (no-op when not patched)."""
    if isinstance(policy_or_class, type):
        _revert_class(_model_class(policy_or_class))
    else:
        _revert_instance(_model_instance(policy_or_class))
    return policy_or_class


def is_patched(policy_or_class: Any) -> bool:
    """Whether :func:`apply_flowkernels` is in effect on this class, or on this instance (directly
    or through its class)."""
    if isinstance(policy_or_class, type):
        return _model_class(policy_or_class) in _CLASS_SAVED
    model = _model_instance(policy_or_class)
    return (
        _INSTANCE_SAVED in model.__dict__
        or any(k in _CLASS_SAVED for k in type(model).__mro__)
        or _patched_options(model.__dict__.get("sample_actions")) is not None  # bound at construction
    )
