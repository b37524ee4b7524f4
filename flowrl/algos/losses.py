"""The math of the RL algorithms, as plain functions (DESIGN §1): advantages, surrogates, ARFM.

Every function takes and returns torch tensors and is differentiable where a loss is.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "arfm_alpha",
    "arfm_weights",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "leave_one_out",
    "normalize",
    "ppo_policy_loss",
    "spo_policy_loss",
    "value_loss",
]


def _float(x: torch.Tensor) -> torch.Tensor:
    """Bool / integer tensors (success flags, integer rewards) as float32; floating ones as they are."""
    return x if x.is_floating_point() else x.float()


def _same_shape(op: str, nonempty: bool = False, **tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: {', '.join(shapes)} must have one shape (no broadcasting), got "
                         + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    if nonempty and not next(iter(tensors.values())).numel():  # the mean of nothing is NaN
        raise ValueError(f"{op}: empty batch ({', '.join(shapes)} of shape {next(iter(shapes.values()))})")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over chunk steps.

    Args:
        rewards, values, dones: ``(T, B)``: the chunk reward (sum of the executed steps'
            rewards), the value of the state the chunk started from, and whether the episode
            ended in the chunk (no bootstrapping across it).
        last_value: ``(B,)`` value of the state after the last chunk.
    Returns:
        ``advantages (T, B)`` and ``returns = advantages + values (T, B)``.
    """
    if rewards.shape != values.shape or rewards.shape != dones.shape or rewards.dim() != 2:
        raise ValueError(f"gae: rewards, values, dones must share shape (T, B), got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(dones.shape)}")
    if last_value.shape != rewards.shape[1:]:
        raise ValueError(f"gae: last_value must have shape (B,) = ({rewards.shape[1]},), got {tuple(last_value.shape)}")
    T = rewards.shape[0]
    rewards, values, last_value = _float(rewards), _float(values), _float(last_value)  # integer rewards: no truncation
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for k in reversed(range(T)):
        ended = dones[k].bool()
        # where, not a multiplication by (1 − done): a non-finite value past an episode's end stays out
        boot = torch.where(ended, torch.zeros_like(next_value), next_value)
        delta = rewards[k] + gamma * boot - values[k]
        running = delta + torch.where(ended, torch.zeros_like(running), (gamma * lam) * running)
        adv[k] = running
        next_value = values[k]
    return adv, adv + values


def grpo_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages ``(R − mean_group)/(std_group + eps)``.

    Args:
        returns: ``(G·n,)`` episode returns, ``group_size`` consecutive entries per group (rollouts
            from the same initial state).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"grpo_advantages: group_size must be an int >= 1, got {group_size!r}")
    returns = _float(returns)  # success flags (bool) or integer returns
    if returns.dim() != 1 or returns.numel() % group_size != 0:
        raise ValueError(f"grpo_advantages: returns must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(returns.shape)}")
    r = returns.view(-1, group_size)
    std = r.std(dim=1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x − mean)/(std + eps)`` over all elements."""
    x = _float(x)
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def ppo_policy_loss(
    ratio: torch.Tensor, adv: torch.Tensor, clip: float = 0.2, dual_clip: float | None = 3.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (to minimize), with the dual clip for negative advantages.

    Args:
        ratio, adv: ``(n,)`` probability ratios and advantages.
    Returns:
        the loss (scalar) and statistics: ``clip_frac``, ``ratio_mean``.
    """
    _same_shape("ppo_policy_loss", nonempty=True, ratio=ratio, adv=adv)
    ratio, adv = _float(ratio), _float(adv)
    if not clip > 0 or (dual_clip is not None and not dual_clip > 1):
        raise ValueError(f"ppo_policy_loss: needs clip > 0 and dual_clip > 1 (or None), got clip={clip}, "
                         f"dual_clip={dual_clip}")
    s1 = ratio * adv
    s2 = ratio.clamp(1 - clip, 1 + clip) * adv
    obj = torch.minimum(s1, s2)
    if dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, dual_clip * adv), obj)
    stats = {
        "clip_frac": ((ratio - 1).abs() > clip).float().mean().detach(),
        "ratio_mean": ratio.mean().detach(),
    }
    return -obj.mean(), stats


def spo_policy_loss(ratio: torch.Tensor, adv: torch.Tensor, clip: float = 0.05,
                    advantages: str = "all") -> torch.Tensor:
    """SPO's penalty form of the trust region, ``−mean(ρ·Â − |Â|/(2ε)·(ρ − 1)²)``.

    Args:
        ratio, adv: ``(n,)`` (or any equal shapes) ratios and advantages.
        advantages: ``"all"``: the SPO form for every sample; ``"negative"``: FPO++'s asymmetric form,
            SPO for ``Â < 0`` and PPO's clipped ``min(ρ·Â, clip(ρ, 1 ± ε)·Â)`` for ``Â ≥ 0``.
    """
    _same_shape("spo_policy_loss", nonempty=True, ratio=ratio, adv=adv)
    ratio, adv = _float(ratio), _float(adv)
    if not clip > 0:
        raise ValueError(f"spo_policy_loss: clip must be > 0, got {clip}")
    if advantages not in ("all", "negative"):
        raise ValueError(f"spo_policy_loss: advantages must be 'all' or 'negative', got {advantages!r}")
    obj = ratio * adv - adv.abs() / (2 * clip) * (ratio - 1) ** 2
    if advantages == "negative":
        ppo = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        obj = torch.where(adv < 0, obj, ppo)
    return -obj.mean()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None = 0.2, delta: float = 1.0
) -> torch.Tensor:
    """Huber value loss with PPO's value clipping: ``max(huber(v − R), huber(v_clip − R))``."""
    _same_shape("value_loss", nonempty=True, values=values, old_values=old_values, returns=returns)
    l1 = torch.nn.functional.huber_loss(values, returns, reduction="none", delta=delta)
    if clip is None:
        return l1.mean()
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    l2 = torch.nn.functional.huber_loss(v_clip, returns, reduction="none", delta=delta)
    return torch.maximum(l1, l2).mean()


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """``1 − Var(target − pred)/Var(target)`` (nan when the target is constant); ``pred`` and ``target``
    of one shape (no broadcasting), any real dtype."""
    _same_shape("explained_variance", pred=pred, target=target)
    pred, target = _float(pred), _float(target)
    var = target.var(unbiased=False)
    if float(var) == 0.0:
        return float("nan")
    return float(1 - (target - pred).var(unbiased=False) / var)


def leave_one_out(r: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """ARFM's ``R*_k = R_k − mean_{i≠k} R_i`` within each group (task); ``(n,)`` → ``(n,)``."""
    r = _float(r)
    if groups is None:
        groups = torch.zeros_like(r, dtype=torch.int64)
    out = torch.zeros_like(r)
    for g in groups.unique():
        m = groups == g
        rg = r[m]
        n = rg.numel()
        out[m] = rg - (rg.sum() - rg) / (n - 1) if n > 1 else torch.zeros_like(rg)
    return out


def arfm_alpha(
    r_star: torch.Tensor, losses: torch.Tensor, lam: float = 5e-4, iters: int = 20, tol: float = 1e-5,
    lo: float = 0.01, hi: float = 5.0,
) -> float:
    """ARFM's adaptive temperature by bisection (DESIGN §1).

    With ``σ_R = sqrt(mean(R*²))``, ``σ_L²`` the variance of the per-sample flow losses and
    ``x = α²σ_R²``, solve ``4√x·e^{2x} − 2√x·e^{x} = λ·σ_R/σ_L²`` (the left side increases with
    x) by bisection over ``α ∈ [lo, hi]`` (``iters`` halvings, stop when the bracket is below
    ``tol``); a root outside the bracket gives its nearest end. ``α = √x/σ_R``. The flow losses
    are per-sample means over the chunk's masked elements (their scale sets α).
    """
    if r_star.dim() != 1 or losses.shape != r_star.shape or r_star.numel() == 0:
        raise ValueError(f"arfm_alpha: r_star and losses must be 1-D of one length n >= 1, got "
                         f"{tuple(r_star.shape)} and {tuple(losses.shape)}")
    if not (bool(torch.isfinite(r_star).all()) and bool(torch.isfinite(losses).all())):
        raise ValueError("arfm_alpha: r_star and losses must be finite (a NaN made the bisection climb to its top)")
    sigma_r = float(torch.sqrt((r_star.double() ** 2).mean()))
    var_l = float(losses.double().var(unbiased=False))
    if sigma_r == 0.0 or var_l == 0.0:
        return 0.0
    rhs = lam * sigma_r / var_l

    def f(x: float) -> float:
        if x > 300.0:  # e^{2x} beyond float range: the left side is far above any rhs
            return math.inf
        s = math.sqrt(x)
        return 4 * s * math.exp(2 * x) - 2 * s * math.exp(x) - rhs

    # bisection on α (x = α²σ_R² is increasing in α, and f in x): 20 halvings of [lo, hi]
    a_lo, a_hi = lo, hi
    if f((a_lo * sigma_r) ** 2) >= 0:
        return a_lo
    if f((a_hi * sigma_r) ** 2) <= 0:
        return a_hi
    for _ in range(iters):
        mid = 0.5 * (a_lo + a_hi)
        if f((mid * sigma_r) ** 2) > 0:
            a_hi = mid
        else:
            a_lo = mid
        if a_hi - a_lo < tol:
            break
    return 0.5 * (a_lo + a_hi)


def arfm_weights(r_star: torch.Tensor, alpha: float) -> torch.Tensor:
    """``w = softmax(α·R*)`` over the batch (sums to 1); ``α = 0`` gives uniform weights (SFT)."""
    return torch.softmax(alpha * r_star.double(), dim=0).to(_float(r_star).dtype)
