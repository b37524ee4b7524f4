"""Training configuration: one dataclass tree, loaded from YAML with ``a.b=value`` overrides.

Unknown keys, wrong types and inconsistent values raise :class:`ConfigError` before any work
starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ALGOS",
    "RESUME_MAY_CHANGE",
    "AlgoConfig",
    "ConfigError",
    "EnvConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "resume_changes",
]

ALGOS = ("sft", "arfm", "fpo", "vla_fpo", "flow_noise_ppo", "flow_sde_ppo", "grpo")


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """A UserWarning about the run's settings, once per process and only on rank 0 (``RANK`` unset or 0): the
    config is validated by ``load_config`` and again by the trainer, on every rank."""
    import os
    import warnings

    if message in _WARNED or os.environ.get("RANK", "0") != "0":
        return
    _WARNED.add(message)
    warnings.warn(message, UserWarning, stacklevel=3)


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type, inconsistent values."""


@dataclass
class EnvConfig:
    name: str = "reach"  # reach | libero
    num_envs: int = 32  # per rank
    num_targets: int = 3
    image_size: int = 32
    chunk_steps: int = 5  # H'
    max_episode_steps: int = 40
    state_with_targets: bool = True
    state_with_goal: bool = False
    state_with_time: bool = False  # reach: the fraction of the time limit left, in the state
    expert_quality: float = 0.6  # demonstrations for SFT / ARFM
    expert_speed: float = 1.0  # the expert's speed, a fraction of the env's maximum (a slow expert)
    expert_aim_noise: float = 0.0  # std (per axis) of the expert's per-episode aim offset (an imprecise expert)
    success_radius: float = 0.15  # reach: arena units ([-1, 1]²)
    max_speed: float = 0.1  # reach: displacement per step at action 1
    suite: str = "libero_spatial"  # libero only
    task_ids: list[int] = field(default_factory=lambda: [0])
    fast_render: bool = False  # libero: no shadows, reflections, multisampling
    settle_steps: int = 10  # libero: no-op steps after reset
    flip: str = "vertical"  # libero: "vertical" (upright) or "rotate180" (openpi / lerobot preprocessing)
    # groups of envs whose stepping overlaps the policy's inference for the other groups (1: no pipelining)
    pipeline_groups: int = 1


@dataclass
class ModelConfig:
    config: str = "tiny"  # tiny | small | pi0 | pi05, or a directory with a checkpoint
    variant: str = "pi0"
    init_from: str = ""  # a flowrl / lerobot checkpoint directory, or an SFT run's checkpoint
    freeze: str = "expert_only"  # expert_only | expert_and_vlm | none
    num_value_heads: int = 2
    # recompute layer activations in the backward pass: none | vlm (SigLIP + Gemma VLM) | expert | all
    activation_checkpointing: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)  # PolicyConfig fields


@dataclass
class AlgoConfig:
    name: str = "fpo"
    num_steps: int = 4  # K denoising steps
    lr: float = 3e-4  # the RL phase's actor learning rate
    # constant | linear | cosine (per iteration, from lr towards 0 over the RL iterations; the critic keeps critic_lr)
    lr_schedule: str = "constant"
    sft_lr: float = 1e-3  # SFT / ARFM (and the SFT warm-up) learning rate
    # constant | cosine (per iteration, from sft_lr towards 0 over the offline phase's iterations)
    sft_lr_schedule: str = "constant"
    critic_lr: float = 1e-3
    epochs: int = 4
    minibatch_size: int = 64  # per rank, in chunks
    grad_accum: int = 1
    rollout_chunks: int = 8  # chunk steps per env per iteration
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    dual_clip: float | None = 3.0
    value_clip: float | None = 0.2  # null: no value clipping
    max_grad_norm: float = 1.0
    critic_side: str = "auto"  # auto (π0: expert, π0.5: vlm, as π_RL) | expert | vlm
    critic_detach: bool = True  # the value heads read detached features (false: the value loss trains them too)
    # FPO
    fpo_pairs: int = 8  # N (τ, ε) pairs per chunk
    fpo_ratio: str = "per_sample"  # mean | per_sample
    fpo_clamp: float = 3.0
    fpo_clip: float = 0.05
    fpo_spo: bool = False  # the trust region in SPO's penalty form (spo_advantages says for which samples)
    spo_advantages: str = "all"  # all: SPO for every sample | negative: FPO++'s asymmetric form (PPO's clip for Â ≥ 0)
    # Flow-SDE / Flow-Noise
    noise_level: float = 0.5
    noise_min: float = 0.08
    noise_max: float = 0.16
    logprob_reduce: str = "mean"
    # GRPO
    group_size: int = 4
    grpo_likelihood: str = "fpo"  # fpo | flow_noise | flow_sde
    # VLA-FPO
    vla_beta: float = 0.1  # z is standardized: β·z beyond ±clip is clipped (β 1: ~84 % at clip 0.2)
    vla_latent_steps: int = 2
    vla_eta: float = 1.0  # 1: the latent sampler walks the actor's whole flow (0.5 keeps > 1/3 of its initial noise)
    vla_ensemble: int = 2
    vla_hidden: int = 256  # width of the latent actor's and each Q-head's 2-hidden-layer MLP
    vla_explore: float = 0.1  # std of the Gaussian added to the actor's rollout latents (not at evaluation)
    vla_tau: float = 0.01
    # V(s) for GAE: 0 = min-Q at the actor's noise-free latent (z0 = 0); S > 0 = the mean of min-Q over S of
    # the actor's rollout latents (exploration noise included), an estimate of E_x~π[min Q(s, x)]
    vla_value_samples: int = 0
    vla_clip: bool = True
    vla_spo: bool = False  # the trust region in SPO's penalty form instead of clipping (with vla_clip)
    vla_ratio: str = "standardized"  # standardized: exp(β·z) (the paper) | absolute: exp(β·Δℓ) (a trust region)
    # ARFM / SFT
    arfm_lambda: float = 5e-4
    sft_steps: int = 20  # SFT / ARFM gradient steps per iteration
    sft_batch: int = 64
    num_demos: int = 64


@dataclass
class TrainConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    iterations: int = 20
    sft_iterations: int = 0  # SFT warm-up iterations before the RL algorithm (0: none)
    seed: int = 0
    run_dir: str = "runs/default"
    checkpoint_every: int = 5
    eval_episodes: int = 64
    zero_stage: int = 1
    bf16: str = "auto"  # auto (on a GPU) | true | false
    tensorboard: bool = True
    wandb: str = "off"  # off | offline | online (Weights & Biases, optional: pip install -e .[wandb])
    wandb_project: str = "flowrl"
    progress: str = "auto"  # a progress bar on rank 0: auto (when stderr is a terminal) | true | false
    plot: bool = True
    # a fresh run (no --resume) in a run_dir that holds checkpoints: an error, or with true the old run's
    # checkpoints, metrics.jsonl, TensorBoard logs, curves and W&B id are deleted first
    overwrite: bool = False


#: keys a ``--resume`` may change (everything else must equal the checkpoint's ``train_config.json``)
RESUME_MAY_CHANGE = ("iterations", "checkpoint_every", "eval_episodes", "run_dir", "tensorboard", "wandb",
                     "wandb_project", "progress", "plot", "overwrite", "model.activation_checkpointing")


def resume_changes(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The keys (``a.b``) whose value in ``cfg`` differs from ``saved`` (a checkpoint's ``train_config.json``),
    except :data:`RESUME_MAY_CHANGE`, as ``"key: saved → now"``. Keys the saved file lacks (added later) are
    not compared."""
    now = dataclasses.asdict(cfg)
    out: list[str] = []

    def walk(a: dict[str, Any], b: dict[str, Any], prefix: str) -> None:
        for k, v in b.items():
            key = prefix + k
            if key in RESUME_MAY_CHANGE or k not in a:
                continue
            if isinstance(v, dict) and isinstance(a[k], dict) and key != "model.overrides":
                walk(a[k], v, key + ".")
            elif a[k] != v:
                out.append(f"{key}: {a[k]!r} → {v!r}")

    walk(saved, now, "")
    return out


#: string options whose YAML spelling reads as a bool (YAML 1.1: ``off``/``no``/``false`` are False):
#: the option that bool stands for.
_BOOL_SPELLINGS: dict[str, dict[bool, str]] = {"wandb": {False: "off"}}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # `float | None`: null disables
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an int, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool):  # YAML reads `false`/`off`/`no` as a bool: keep the spelling
            spelled = _BOOL_SPELLINGS.get(key, {}).get(value)
            return spelled if spelled is not None else "true" if value else "false"
        if isinstance(value, int | float):  # YAML read it as a number: 0755 -> 493, 1.10 -> 1.1, 12:30 -> 750
            raise ConfigError(f"{key}: expected a string, got the number {value!r} (YAML reads unquoted digits as a "
                              "number and may change them: quote the value)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} (quote the value)")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _set(obj: Any, dotted: str, value: Any, full: str) -> None:
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj))
    if head not in hints:
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        raise ConfigError(f"unknown config key {full!r} ({head!r} is not one of: {names})")
    if rest:
        sub = getattr(obj, head)
        if isinstance(sub, dict):
            sub[rest] = value
            return
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"unknown config key {full!r}: {head!r} has no sub-keys")
        _set(sub, rest, value, full)
        return
    if dataclasses.is_dataclass(getattr(obj, head)):
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
        for k, v in value.items():
            _set(getattr(obj, head), k, v, f"{full}.{k}")
        return
    setattr(obj, head, _coerce(value, hints[head], full))


_YAML_BOOLS = ("true", "false", "yes", "no", "on", "off")


def _field_type(obj: Any, dotted: str) -> Any:
    """The type hint of config key ``dotted`` (None for free-form mapping entries or unknown keys)."""
    head, _, rest = dotted.partition(".")
    hints = typing.get_type_hints(type(obj)) if dataclasses.is_dataclass(obj) else {}
    if head not in hints:
        return None
    if rest:
        return _field_type(getattr(obj, head), rest)
    return hints[head]


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """Apply ``["algo.lr=1e-4", ...]`` or a (nested) mapping onto ``cfg`` in place.

    A command-line value is read as YAML (numbers, bools, lists, mappings), except for string
    keys, which take the text as it is (``run_dir=010`` stays ``"010"``, not YAML's octal 8).
    """
    if isinstance(overrides, dict):
        for k, v in overrides.items():
            _set(cfg, k, v, k)
        return cfg
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not raw or (_field_type(cfg, key) is str and raw.strip().lower() not in _YAML_BOOLS):
            value: Any = raw.strip()  # (a bool spelling still goes through YAML: `wandb=false` means off)
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: cannot read the value {raw!r} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]})") from None
        _set(cfg, key, value, key)
    return cfg


def _yaml_mapping(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (PyYAML keeps the last one silently)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set = set()
        for k_node, _ in node.value:
            k = loader.construct_object(k_node, deep=deep)
            if k in seen:
                raise ConfigError(f"{where}: key {k!r} appears twice in one mapping (line {k_node.start_mark.line + 1})"
                                  "; YAML would keep only the last")
            seen.add(k)
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({type(e).__name__}: {e})") from None


# PolicyConfig fields the trainer sets from its own settings: an override would disagree with them silently
_OWNED_POLICY_FIELDS = {
    "value_heads": "model.num_value_heads", "noise_std_min": "algo.noise_min", "noise_std_max": "algo.noise_max",
    "num_steps": "algo.num_steps", "activation_checkpointing": "model.activation_checkpointing",
    "variant": "model.variant", "num_cameras": "the env (its cameras)", "image_size": "the env (its image size)",
}


def _check_model_overrides(overrides: dict[str, Any]) -> None:
    """``model.overrides`` names PolicyConfig fields the trainer does not set itself (checked before any work;
    a wrong name failed only when the policy was built)."""
    from flowrl.models.config import PolicyConfig

    known = {f.name for f in dataclasses.fields(PolicyConfig)}
    for key in overrides:
        if key in _OWNED_POLICY_FIELDS:
            raise ConfigError(f"model.overrides.{key}: set by {_OWNED_POLICY_FIELDS[key]}; set it there instead")
        if key not in known:
            raise ConfigError(f"model.overrides.{key}: not a PolicyConfig field; known: "
                              f"{sorted(known - set(_OWNED_POLICY_FIELDS))}")


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Cross-field checks that need no model or env."""
    a = cfg.algo
    if a.name not in ALGOS:
        raise ConfigError(f"algo.name: unknown algorithm {a.name!r}; expected one of {ALGOS}")
    if cfg.env.name not in ("reach", "libero"):
        raise ConfigError(f"env.name: unknown environment {cfg.env.name!r}; expected reach or libero")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir} exists and is not a directory")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.bf16 not in ("auto", "true", "false"):
        raise ConfigError(f"bf16 must be auto, true or false, got {cfg.bf16!r}")
    for name in ("iterations", "sft_iterations", "checkpoint_every", "eval_episodes"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("num_steps", "epochs", "minibatch_size", "rollout_chunks", "fpo_pairs", "group_size", "grad_accum",
                 "sft_steps", "sft_batch", "num_demos", "vla_latent_steps", "vla_ensemble"):
        if getattr(a, name) < 1:
            raise ConfigError(f"algo.{name} must be >= 1, got {getattr(a, name)}")
    if cfg.model.num_value_heads < 1:
        raise ConfigError(f"model.num_value_heads must be >= 1, got {cfg.model.num_value_heads}")
    if cfg.model.variant not in ("pi0", "pi05"):
        raise ConfigError(f"model.variant must be pi0 or pi05, got {cfg.model.variant!r}")
    _check_model_overrides(cfg.model.overrides)
    for name in ("lr", "sft_lr", "critic_lr", "max_grad_norm", "noise_level", "arfm_lambda"):
        if getattr(a, name) < 0:
            raise ConfigError(f"algo.{name} must be >= 0, got {getattr(a, name)}")
    for name in ("clip", "fpo_clip", "fpo_clamp", "vla_beta", "vla_eta"):
        if getattr(a, name) <= 0:
            raise ConfigError(f"algo.{name} must be > 0, got {getattr(a, name)}")
    if a.dual_clip is not None and not a.dual_clip > 1:
        raise ConfigError(f"algo.dual_clip must be > 1 (PPO's lower bound dual_clip·Â for negative advantages), "
                          f"got {a.dual_clip}")
    uses_sde = a.name == "flow_sde_ppo" or (a.name == "grpo" and a.grpo_likelihood == "flow_sde")
    if uses_sde and not a.noise_level > 0:
        raise ConfigError(f"algo.noise_level must be > 0 for Flow-SDE (the SDE step's std σ_t·√dt; at 0 every ratio is "
                          f"1 and the policy gets no gradient), got {a.noise_level}")
    for name in ("gamma", "lam", "vla_tau"):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise ConfigError(f"algo.{name} must be in [0, 1], got {getattr(a, name)}")
    if not 0.0 < a.noise_min < a.noise_max:
        raise ConfigError(f"need 0 < algo.noise_min < algo.noise_max (the Flow-Noise std bounds), got "
                          f"{a.noise_min}, {a.noise_max}")
    if a.logprob_reduce not in ("sum", "mean"):
        raise ConfigError(f"algo.logprob_reduce must be sum or mean, got {a.logprob_reduce!r}")
    e = cfg.env
    if e.num_envs < 1:
        raise ConfigError(f"env.num_envs must be >= 1, got {e.num_envs}")
    for name in ("image_size", "chunk_steps", "max_episode_steps"):
        if getattr(e, name) < 1:
            raise ConfigError(f"env.{name} must be >= 1, got {getattr(e, name)}")
    if e.settle_steps < 0:
        raise ConfigError(f"env.settle_steps must be >= 0, got {e.settle_steps}")
    if not 0.0 <= e.expert_quality <= 1.0:
        raise ConfigError(f"env.expert_quality must be in [0, 1], got {e.expert_quality}")
    if e.flip not in ("vertical", "rotate180"):
        raise ConfigError(f"env.flip must be vertical or rotate180, got {e.flip!r}")
    if e.name == "reach":
        from flowrl.envs.reach import COLORS

        if not 1 <= e.num_targets <= len(COLORS):
            raise ConfigError(f"env.num_targets must be in [1, {len(COLORS)}] for reach, got {e.num_targets}")
        if e.image_size < 8:
            raise ConfigError(f"env.image_size must be >= 8 for reach, got {e.image_size}")
        if e.max_episode_steps < e.chunk_steps:
            raise ConfigError(f"env.max_episode_steps={e.max_episode_steps} must be >= env.chunk_steps="
                              f"{e.chunk_steps} for reach")
    if a.value_clip is not None and not a.value_clip > 0:  # 0 let each rollout move the critic about one step
        raise ConfigError(f"algo.value_clip must be > 0, or null for no clipping, got {a.value_clip}")
    if a.name == "grpo" and a.group_size < 2:  # one rollout per group: every advantage is 0, nothing is learned
        raise ConfigError(f"algo.group_size must be >= 2 for grpo (advantages are relative to the group), "
                          f"got {a.group_size}")
    if a.name == "grpo" and cfg.env.num_envs % a.group_size != 0:
        raise ConfigError(f"env.num_envs={cfg.env.num_envs} must be divisible by algo.group_size={a.group_size} "
                          "(GRPO groups rollouts from one initial state)")
    pg = cfg.env.pipeline_groups
    if pg < 1 or cfg.env.num_envs % pg != 0:
        raise ConfigError(f"env.pipeline_groups={pg} must be >= 1 and divide env.num_envs={cfg.env.num_envs}")
    if a.name == "grpo" and (cfg.env.num_envs // pg) % a.group_size != 0:
        raise ConfigError(f"env.num_envs / env.pipeline_groups = {cfg.env.num_envs // pg} must be divisible by "
                          f"algo.group_size={a.group_size} (a GRPO group must not straddle two pipeline groups)")
    if a.fpo_ratio not in ("mean", "per_sample"):
        raise ConfigError(f"algo.fpo_ratio must be mean or per_sample, got {a.fpo_ratio!r}")
    if not 0.0 < cfg.env.expert_speed <= 1.0:
        raise ConfigError(f"env.expert_speed must be in (0, 1], got {cfg.env.expert_speed}")
    if not cfg.env.expert_aim_noise >= 0.0:
        raise ConfigError(f"env.expert_aim_noise must be >= 0, got {cfg.env.expert_aim_noise}")
    if not (cfg.env.success_radius > 0 and cfg.env.max_speed > 0):
        raise ConfigError(f"env.success_radius and env.max_speed must be > 0, got {cfg.env.success_radius}, "
                          f"{cfg.env.max_speed}")
    if a.vla_hidden < 1:
        raise ConfigError(f"algo.vla_hidden must be >= 1, got {a.vla_hidden}")
    if a.vla_value_samples < 0:
        raise ConfigError(f"algo.vla_value_samples must be >= 0, got {a.vla_value_samples}")
    if not a.vla_explore >= 0.0:
        raise ConfigError(f"algo.vla_explore must be >= 0, got {a.vla_explore}")
    if a.vla_ratio not in ("standardized", "absolute"):
        raise ConfigError(f"algo.vla_ratio must be standardized or absolute, got {a.vla_ratio!r}")
    if a.lr_schedule not in ("constant", "linear", "cosine"):
        raise ConfigError(f"algo.lr_schedule must be constant, linear or cosine, got {a.lr_schedule!r}")
    if a.sft_lr_schedule not in ("constant", "cosine"):
        raise ConfigError(f"algo.sft_lr_schedule must be constant or cosine, got {a.sft_lr_schedule!r}")
    if a.critic_side not in ("auto", "expert", "vlm"):
        raise ConfigError(f"algo.critic_side must be auto, expert or vlm, got {a.critic_side!r}")
    if a.spo_advantages not in ("all", "negative"):
        raise ConfigError(f"algo.spo_advantages must be all or negative, got {a.spo_advantages!r}")
    if a.grpo_likelihood not in ("fpo", "flow_noise", "flow_sde"):
        raise ConfigError(f"algo.grpo_likelihood must be fpo, flow_noise or flow_sde, got {a.grpo_likelihood!r}")
    if a.name == "vla_fpo" and not cfg.model.init_from:
        warn_once("algo.name=vla_fpo without model.init_from: π0 is randomly initialized and stays frozen, so the "
                  "latent actor learns to steer a random policy (a smoke test at most); pass an SFT run's or a "
                  "lerobot / openpi checkpoint as model.init_from")
    if a.name == "vla_fpo" and a.vla_spo and not a.vla_clip:
        raise ConfigError("algo.vla_spo=true replaces VLA-FPO's clip by SPO's penalty, and algo.vla_clip=false removes "
                          "the trust region: pick one (the ablation without clipping is vla_clip=false, vla_spo=false)")
    if a.name == "vla_fpo" and cfg.model.freeze != ModelConfig().freeze:
        warn_once(f"model.freeze={cfg.model.freeze} is ignored by vla_fpo: π0 stays frozen entirely (its latent "
                  "actor and Q-ensemble train)")
    if a.name == "vla_fpo" and cfg.sft_iterations:
        raise ConfigError("sft_iterations > 0 does not combine with vla_fpo (π0 stays frozen): run SFT first and "
                          "pass its checkpoint as model.init_from")
    if cfg.env.name == "libero" and (a.name in ("sft", "arfm") or cfg.sft_iterations):
        raise ConfigError(f"{'sft_iterations > 0' if cfg.sft_iterations else 'algo.name=' + a.name} needs the scripted "
                          "expert's demonstrations of env.name=reach; LIBERO has none here (train on a LIBERO "
                          "dataset elsewhere and pass the checkpoint as model.init_from)")
    if cfg.model.activation_checkpointing not in ("none", "vlm", "expert", "all"):
        raise ConfigError(f"model.activation_checkpointing must be none, vlm, expert or all, got "
                          f"{cfg.model.activation_checkpointing!r}")
    if cfg.model.freeze not in ("expert_only", "expert_and_vlm", "none"):
        raise ConfigError(f"model.freeze must be expert_only, expert_and_vlm or none, got {cfg.model.freeze!r}")
    if cfg.env.name == "libero" and cfg.model.config in ("pi0", "pi05") and not cfg.model.init_from:
        raise ConfigError(f"model.config={cfg.model.config} on LIBERO needs model.init_from=<a local π0 checkpoint "
                          "directory> (a randomly initialized full-size π0 cannot solve LIBERO)")
    if cfg.model.init_from:
        from flowrl.checkpoint import resolve_checkpoint

        try:  # a run directory (or its checkpoints/) means its latest checkpoint, as for flowrl.eval
            src = resolve_checkpoint(cfg.model.init_from)
        except FileNotFoundError as e:
            raise ConfigError(f"model.init_from: {e}") from None
        if not (src / "model.safetensors").is_file() and not (src / "policy" / "model.safetensors").is_file():
            raise ConfigError(f"model.init_from: {src} holds no model.safetensors (nor policy/model.safetensors): "
                              "give a trainer checkpoint, a run directory or a policy directory")
    if a.name == "vla_fpo" and cfg.zero_stage == 3:  # its small actor + Q-heads: nothing worth partitioning
        raise ConfigError("zero_stage=3 does not combine with vla_fpo (its target Q-heads read the critics' "
                          "parameters outside the engine's forward): use zero_stage 0, 1 or 2")
    if cfg.progress not in ("auto", "true", "false"):
        raise ConfigError(f"progress must be auto, true or false, got {cfg.progress!r}")
    if cfg.wandb not in ("off", "offline", "online"):
        raise ConfigError(f"wandb must be off, offline or online, got {cfg.wandb!r}")
    if cfg.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"wandb={cfg.wandb} needs the wandb package: pip install -e .[wandb] (or set wandb=off)")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard=true needs the tensorboard package: pip install -e .[rl] "
                          "(or set tensorboard=false)")
    if world_size > 1 and a.sft_batch % world_size != 0:
        raise ConfigError(f"algo.sft_batch={a.sft_batch} must be divisible by the number of ranks ({world_size})")


def load_config(path: str | Path | None, overrides: list[str] | None = None, world_size: int = 1) -> TrainConfig:
    """Read a YAML config (or start from the defaults), apply overrides, validate."""

    cfg = TrainConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} " + ("is a directory" if p.is_dir() else "does not exist"))
        data = _yaml_mapping(p.read_text(), f"config file {str(p)!r}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        apply_overrides(cfg, data)
    apply_overrides(cfg, overrides or [])
    validate(cfg, world_size)
    return cfg
