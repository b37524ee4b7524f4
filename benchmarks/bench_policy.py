"""End-to-end throughput of the π0 policy's hot paths: the cached prefix vs public-port baselines.

Rollout: action chunks/s of ``sample_actions`` (ODE, K 10, H 50) for B observations × N samples
per observation (group size), providers:

* ``cached``    — this project: one prefix pass, ``N`` rows share its K/V via ``prefix_attention``.
* ``graph``     — (CUDA, B 1) the same, the K-step loop replayed as a CUDA graph (the prefix is encoded
  eagerly every call and its K/V copied into the graph's static cache: ≈ 15 MB per call for π0).
* ``+tf32``     — (CUDA) the same with ``torch.set_float32_matmul_precision("high")``: the float32
  SigLIP tower and projector (lerobot keeps them float32) on TF32 tensor cores.
* ``recompute`` — the prefix recomputed at every denoising step for every row (no cache).
* ``clone``     — prefix encoded once, its K/V copied per row twice at every step, for every N (N > 1:
  repeat_interleave + clone; N 1: clone + clone), as lerobot's ``denoise_step`` does (its
  ``clone_past_key_values``, then the concat in transformers' ``DynamicLayer.update``; docs/lerobot_pi0.md).

Update (forward + backward, VLM trainable, SigLIP frozen): (τ, ε) pairs/s of ``cfm_losses`` with N 8
vs one call with N 1 (same obs, same B; the issue's target is time(N 8) ≤ 1.5 × time(N 1), printed and
recorded in the N 1 row's note) vs 8 separate N 1 calls (``separate``: 8 prefix graphs alive), and
chains/s of ``chain_logprob`` (K 10, Flow-Noise) vs K prefix recomputations.

Observations: B 1 is a full observation (every camera, ``max_token_len`` tokens: π0's batch-1 chunk with
3 views); B > 1 masks the last camera on every other row and draws each row's token count in
[L/2, L]. ``views`` = valid cameras per observation (mean), ``P`` = prefix positions encode_prefix
computes per observation: it compacts each row's valid tokens to the front and pads to the batch's
longest row, so P = max over rows of (valid image tokens + valid language tokens), and every one of the
B·P positions goes through the VLM (+1 state token through the expert for π0, outside P).

FLOPs (``flops_*`` below): counted analytically from the config and the actual inputs (matmuls and
attention products only, 2 per multiply-add, as torch.utils.flop_counter counts; dense attention, i.e.
masked/padded score entries counted): SigLIP per valid image, the VLM over B·P positions, the π0 state
token, and per denoising step the expert over H action tokens of B·N rows with attention over the
P (+1) cached slots + H. ``useful TFLOP`` is the ``cached`` provider's count for every provider of a
shape (``recompute`` computes ~K·N prefixes: its own count is in the note), so ``TFLOP/s`` and ``MFU``
compare like with like; update rows count forward + backward (backward = 2 × forward, 1 × for layers
whose input needs no gradient; frozen SigLIP forward only) and use the fused N 8 count for ``separate``.
MFU = useful FLOPs / median time / peak (dense bf16 tensor-core peak by device name, or
``--peak-tflops``); blank on CPU and unknown devices. tests/test_bench_policy.py checks the formulas
against FlopCounterMode.

GPU defaults (``--device cuda``; a 300 s stage in benchmarks/gpu_session.sh): configs pi0 then small
(the targets first); rollout B 1, 64 for pi0 (B 1, 16, 64 for small) × N 1, 8; update B 1 for pi0 (VLM
trainable: ≈ 8–9 GiB of saved activations per observation, B 16 would not fit), B 1, 16 for small.
Baselines (recompute, clone, separate) run only where one call computes ≤ ``--max-baseline-tflop``
(GPU default 500 TFLOP), else a skip row says why (pi0: recompute at B 64, 2.5 and 20 PFLOP/call).
Every measurement runs under a try (an error, e.g. CUDA OOM, is a skip row naming it; the allocator's
cache is emptied) and rows are appended to RESULTS.md as they are measured, under a heading written
first; a measurement whose estimated time (scaled by the worst measured/estimated ratio so far) would
pass ``--deadline`` (GPU default 240 s after start) is skipped with a row saying so. Slow calls get fewer
warm-ups and repetitions (≥ 0.2 s: 1 warm-up; ≥ 0.5 s: 2 reps; else 3 + 3, up to ``--budget`` 0.5 s).
Estimated GPU time of the default set (``--dry-run``: bf16 at 400 TFLOP/s effective, the float32 SigLIP
at 50 TFLOP/s, + 50 ms per call, × (warm-up + reps)): pi0 ≈ 48 s (rollout 42 s, of which B 64 N 8:
442 TFLOP, ≈ 1.8 s per call, ≈ 5 s per provider; update ≈ 6 s), small ≈ 28 s (its calls are overhead,
not FLOPs), + model builds and Triton compilation (≈ 30–60 s, not estimated): ≈ 2–2.5 min of the 300 s.

    python benchmarks/bench_policy.py                       # CPU default: tiny B 1,16,64; small B 1
    python benchmarks/bench_policy.py --configs small --batches 1,16 --no-record
    python benchmarks/bench_policy.py --device cuda --dry-run   # the GPU plan: FLOPs and time estimate
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # flowrl from a source checkout
from bench_ops import ResultsBlock, _commit, _device_name, _reason, _time, quantiles, release_cuda

import flowkernels as fk
from flowkernels import _checks
from flowrl.models import Observation, Pi0Policy, PolicyConfig, PrefixCache, get_config
from flowrl.models.policy import _time_grid

RESULTS = Path(__file__).with_name("RESULTS.md")
K = 10
N_UPDATE = 8

#: dense bf16 tensor-core peaks (TFLOP/s), first substring of the device name that matches
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
                    ("A100", 312.0), ("A800", 312.0))

COLUMNS = ("config", "bench", "B", "N", "provider", "views", "P", "median ms", "p20", "p80", "items/s",
           "time vs ref", "useful TFLOP", "TFLOP/s", "MFU", "note")


def peak_tflops(device_name: str, dev: str) -> float | None:
    if dev != "cuda":
        return None
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


# --------------------------------------------------------------------------------------------
# observations and their prefix shape


def make_obs(p: Pi0Policy | PolicyConfig, B: int, dev: str, full: bool | None = None) -> Observation:
    """B observations; ``full`` (default: B == 1) = every camera and every token valid."""
    c = p if isinstance(p, PolicyConfig) else p.config
    full = B == 1 if full is None else full
    L = c.max_token_len
    lens = torch.full((B, 1), L) if full else torch.randint(L // 2, L + 1, (B, 1))
    tm = torch.arange(L)[None] < lens
    im = torch.ones(B, c.num_cameras, dtype=torch.bool)
    if not full:
        im[::2, -1] = False  # a masked camera on every other row
    state = torch.randn(B, c.max_state_dim) if c.variant == "pi0" else None
    obs = Observation(torch.rand(B, c.num_cameras, 3, c.image_size, c.image_size) * 2 - 1, im,
                      torch.randint(0, c.vocab_size, (B, L)), tm, state)
    return obs.to(dev)


@dataclass
class PrefixShape:
    """What encode_prefix computes for a batch: B rows of P positions (compacted, padded to the longest)."""

    B: int
    images: int  # valid (b, camera) pairs: SigLIP runs on these only
    P: int  # max over rows of valid image + language tokens

    @property
    def views(self) -> float:
        return self.images / self.B


def prefix_shape(c: PolicyConfig, obs: Observation) -> PrefixShape:
    lens = obs.image_masks.sum(1) * c.tokens_per_image + obs.token_masks.sum(1)
    return PrefixShape(obs.batch_size, int(obs.image_masks.sum()), int(lens.max()))


# --------------------------------------------------------------------------------------------
# FLOP counts (2 per multiply-add; matmuls, convolutions and attention products)


def _attn(c: PolicyConfig, q: int, kv: int) -> float:
    """Scores and weighted values of ``q`` queries over ``kv`` keys, all query heads."""
    return 4.0 * q * kv * c.num_heads * c.head_dim


def _gemma_token(c: PolicyConfig, width: int, mlp: int) -> float:
    """q, k, v, o projections and the GeGLU MLP of one Gemma layer, per token."""
    hq, hkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return 2.0 * (width * (hq + 2 * hkv) + hq * width + 3 * width * mlp)


def flops_siglip(c: PolicyConfig) -> float:
    """SigLIP tower per image: patch embedding + layers (the projector is in :func:`flops_projector`)."""
    T, W, M = c.tokens_per_image, c.vision_width, c.vision_mlp_dim
    layer = 2.0 * T * 4 * W * W + 4.0 * T * T * W + 4.0 * T * W * M
    return 2.0 * T * 3 * c.patch_size ** 2 * W + c.vision_depth * layer


def flops_projector(c: PolicyConfig) -> float:
    return 2.0 * c.tokens_per_image * c.vision_width * c.vlm_width


def flops_prefix(c: PolicyConfig, s: PrefixShape, split: bool = False):
    """encode_prefix forward. ``split``: the dict of parts (siglip, projector, vlm, state)."""
    parts = {"siglip": s.images * flops_siglip(c), "projector": s.images * flops_projector(c),
             "vlm": c.depth * s.B * (s.P * _gemma_token(c, c.vlm_width, c.vlm_mlp_dim) + _attn(c, s.P, s.P)),
             "state": 0.0}
    if c.variant == "pi0":  # the state token through the expert, attending the P valid slots and itself
        We = c.expert_width
        parts["state"] = 2.0 * s.B * c.max_state_dim * We + c.depth * s.B * (
            _gemma_token(c, We, c.expert_mlp_dim) + _attn(c, 1, s.P + 1))
    return parts if split else sum(parts.values())


def cache_len(c: PolicyConfig, s: PrefixShape) -> int:
    return s.P + (1 if c.variant == "pi0" else 0)


def flops_suffix(c: PolicyConfig, rows: int, Pc: int, noise_head: bool = False, split: bool = False):
    """One suffix_features + velocity call over ``rows`` rows (H action tokens each) attending ``Pc``
    cached slots and the H action tokens; ``noise_head``: + the Flow-Noise head."""
    H, D, We = c.action_horizon, c.action_dim, c.expert_width
    io = rows * H * 4.0 * D * We  # action_in_proj, action_out_proj
    if c.variant == "pi0":  # action_time_mlp_in on [a, 0] (+ its bias once), action_time_mlp_out
        io += rows * H * (4.0 * We * We + 2.0 * We * We) + 4.0 * We * We
    if noise_head:
        io += rows * H * 2.0 * (We * c.noise_head_hidden + c.noise_head_hidden * D)
    parts = {"io": io, "linear": c.depth * rows * H * _gemma_token(c, We, c.expert_mlp_dim),
             "attention": c.depth * rows * _attn(c, H, Pc + H)}
    return parts if split else sum(parts.values())


def flops_time(c: PolicyConfig, T: int) -> float:
    """time_constants for T times (π0: the time half of action_time_mlp_in; π0.5: time MLP + adaRMS)."""
    We = c.expert_width
    if c.variant == "pi0":
        return 4.0 * T * We * We
    return 4.0 * T * We * We + (2 * c.depth + 1) * 6.0 * T * We * We


def flops_rollout(c: PolicyConfig, s: PrefixShape, N: int, provider: str) -> float:
    """FLOPs one rollout call computes (``recompute``: the prefix of B·N rows at each of the K steps)."""
    sfx = K * flops_suffix(c, s.B * N, cache_len(c, s)) + flops_time(c, K)
    if provider == "recompute":
        return K * N * flops_prefix(c, s) + sfx
    return flops_prefix(c, s) + sfx


def flops_prefix_train(c: PolicyConfig, s: PrefixShape) -> float:
    """encode_prefix forward + backward with SigLIP frozen (forward only); the projector and state_proj
    inputs need no gradient (weight gradient only), and the last layer's outputs feed only ``pooled``
    (unused by the losses): of that layer only the K/V projections get a backward."""
    f = flops_prefix(c, s, split=True)
    hq = c.num_heads * c.head_dim
    # the last layer's q, o, MLP and attention: forward only
    last = s.B * (s.P * 2.0 * (2 * c.vlm_width * hq + 3 * c.vlm_width * c.vlm_mlp_dim) + _attn(c, s.P, s.P))
    state_proj = 0.0
    if c.variant == "pi0":
        We = c.expert_width
        state_proj = 2.0 * s.B * c.max_state_dim * We
        last += s.B * (2.0 * (2 * We * hq + 3 * We * c.expert_mlp_dim) + _attn(c, 1, s.P + 1))
    return f["siglip"] + 2 * f["projector"] + 3 * (f["vlm"] + f["state"]) - state_proj - 2 * last


def flops_suffix_train(c: PolicyConfig, rows: int, Pc: int, noise_head: bool = False) -> float:
    """Forward + backward of one suffix pass (action_in_proj's input needs no gradient)."""
    return 3 * flops_suffix(c, rows, Pc, noise_head) - 2.0 * rows * c.action_horizon * c.action_dim * c.expert_width


def flops_update(c: PolicyConfig, s: PrefixShape, bench: str, provider: str, N: int = N_UPDATE) -> float:
    """Forward + backward of one update call (``cfm_losses`` N pairs, or ``chain_logprob`` K steps)."""
    Pc, B = cache_len(c, s), s.B
    pre = flops_prefix_train(c, s)
    if bench == "cfm_losses":
        if provider == "separate":
            return N * (pre + flops_suffix_train(c, B, Pc) + 3 * flops_time(c, B))
        return pre + flops_suffix_train(c, B * N, Pc) + 3 * flops_time(c, B * N)
    if provider == "separate":
        return K * (pre + flops_suffix_train(c, B, Pc, True)) + 3 * flops_time(c, K)
    return pre + flops_suffix_train(c, B * K, Pc, True) + 3 * flops_time(c, K)


# --------------------------------------------------------------------------------------------
# the providers


def _denoise(p: Pi0Policy, x: torch.Tensor, cache_for_step, N: int) -> torch.Tensor:
    """The K-step Euler loop with a per-step cache provider (for the baselines)."""
    grid = _time_grid(K)
    tc = p.time_constants(torch.tensor(grid[:K], device=x.device))
    for k in range(K):
        cache, gs = cache_for_step(k)
        feats = p.suffix_features(cache, x, p._select_time(tc, k), gs, p.suffix_rope(cache, gs))
        x = fk.flow_step(x, p.velocity(feats), grid[k], 1.0 / K, "ode").x_next
    return x


def _expand_clone(cache: PrefixCache, N: int) -> PrefixCache:
    """The prefix K/V copied per row (B → B·N) twice, for every N: lerobot copies the whole cache at every
    step (``clone_past_key_values``) and again when transformers' ``DynamicLayer.update`` concatenates the
    suffix K/V onto it (docs/lerobot_pi0.md, "Per step"). N > 1: repeat_interleave + clone; N 1: clone + clone."""
    def r(t: torch.Tensor) -> torch.Tensor:
        return (t.repeat_interleave(N, 1) if N > 1 else t.clone()).clone()

    return PrefixCache(r(cache.keys), r(cache.values), cache.prefix_mask.repeat_interleave(N, 0),
                       cache.prefix_lens.repeat_interleave(N), cache.suffix_offset.repeat_interleave(N),
                       cache.pooled.repeat_interleave(N, 0))


def _tf32(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with float32 matmuls on TF32 tensor cores (the float32 SigLIP tower and projector)."""
    def run():
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            return fn()
        finally:
            torch.set_float32_matmul_precision(old)
    return run


def rollout_fns(p: Pi0Policy, obs: Observation, N: int) -> dict:
    c = p.config
    B = obs.batch_size
    noise = torch.randn(B * N, c.action_horizon, c.action_dim, device=p.device)
    obs_rows = obs.repeat_interleave(N) if N > 1 else obs

    def cached():
        return p.sample_actions(obs, mode="ode", num_steps=K, group_size=N, noise=noise, return_chain=False).actions

    def recompute():
        return _denoise(p, noise, lambda k: (p.encode_prefix(obs_rows), 1), N)

    def clone():
        base = p.encode_prefix(obs)
        return _denoise(p, noise, lambda k: (_expand_clone(base, N), 1), N)

    fns = {"cached": cached}
    if p.device.type == "cuda":
        fns["cached+tf32"] = _tf32(cached)
        if B == 1:
            static: dict = {}

            def graph():
                fresh = p.encode_prefix(obs)
                if "cache" not in static:
                    static["cache"] = fresh
                else:  # same obs: same shapes and masks; the K/V into the graph's static cache
                    static["cache"].keys.copy_(fresh.keys)
                    static["cache"].values.copy_(fresh.values)
                return p.sample_actions(static["cache"], mode="ode", num_steps=K, group_size=N, noise=noise,
                                        return_chain=False, cuda_graph=True).actions

            fns["graph"] = graph
            fns["graph+tf32"] = _tf32(graph)
    fns["recompute"] = recompute
    fns["clone"] = clone
    return fns


def update_fns(p: Pi0Policy, obs: Observation, N: int) -> dict:
    c = p.config
    B, dev = obs.batch_size, p.device
    actions = torch.randn(B, c.action_horizon, c.action_dim, device=dev)
    noise = torch.randn(B, N, c.action_horizon, c.action_dim, device=dev)
    tau = torch.rand(B, N, device=dev)
    with torch.no_grad():
        chain = p.sample_actions(obs, mode="noise", num_steps=K, noise=noise[:, 0].contiguous()).chain
    grid = torch.tensor(_time_grid(K), device=dev)

    def cfm_fused():
        p.cfm_losses(obs, actions, noise, tau).sum().backward()

    def cfm_n1():
        p.cfm_losses(obs, actions, noise[:, :1].contiguous(), tau[:, :1].contiguous()).sum().backward()

    def cfm_separate():
        sum(p.cfm_losses(obs, actions, noise[:, n : n + 1], tau[:, n : n + 1]).sum() for n in range(N)).backward()

    def chain_fused():
        p.chain_logprob(obs, chain, "noise").sum().backward()

    def chain_separate():
        tc = p.time_constants(grid[:K])
        vs, stds = [], []
        for k in range(K):
            cache = p.encode_prefix(obs)
            feats = p.suffix_features(cache, chain[:, k], p._select_time(tc, k), 1, p.suffix_rope(cache, 1))
            vs.append(p.velocity(feats))
            stds.append(p.noise_head(feats))
        fk.chain_logprob(chain, torch.stack(vs, 1), grid, "noise", std=torch.stack(stds, 1)).sum().backward()

    return {"cfm_losses": {"fused": cfm_fused, "N1": cfm_n1, "separate": cfm_separate},
            "chain_logprob": {"fused": chain_fused, "separate": chain_separate}}


# --------------------------------------------------------------------------------------------
# the plan: what is measured, its FLOPs and estimated time


@dataclass
class Spec:
    bench: str
    N: int
    provider: str
    useful: float  # FLOPs credited (the cached / fused count of the shape)
    computed: float  # FLOPs this provider computes
    items: int
    skip: str | None = None
    fp32: float = 0.0  # of computed, FLOPs in float32 on a GPU (SigLIP + projector), for the time estimate


def rollout_specs(c: PolicyConfig, s: PrefixShape, N: int, dev: str, max_baseline: float) -> list[Spec]:
    useful = flops_rollout(c, s, N, "cached")
    provs = ["cached"] + (["cached+tf32"] + (["graph", "graph+tf32"] if s.B == 1 else []) if dev == "cuda" else [])
    img = s.images * (flops_siglip(c) + flops_projector(c))
    specs = [Spec("rollout", N, prov, useful, useful, s.B * N, fp32=img) for prov in provs]
    for prov in ("recompute", "clone"):
        f = flops_rollout(c, s, N, prov)
        skip = (f"not run: {prov} computes {f / 1e12:.0f} TFLOP/call > --max-baseline-tflop "
                f"{max_baseline / 1e12:g}" if f > max_baseline else None)
        specs.append(Spec("rollout", N, prov, useful, f, s.B * N, skip, img * (K * N if prov == "recompute" else 1)))
    return specs


def update_specs(c: PolicyConfig, s: PrefixShape, max_baseline: float) -> list[Spec]:
    specs = []
    img = s.images * (flops_siglip(c) + 2 * flops_projector(c))
    for bench, provs in (("cfm_losses", ("fused", "N1", "separate")), ("chain_logprob", ("fused", "separate"))):
        useful = flops_update(c, s, bench, "fused")
        for prov in provs:
            if prov == "N1":
                f = flops_update(c, s, bench, "fused", N=1)
                specs.append(Spec(bench, 1, prov, f, f, s.B, fp32=img))
                continue
            f = flops_update(c, s, bench, prov)
            skip = (f"not run: {prov} computes {f / 1e12:.0f} TFLOP/call > --max-baseline-tflop "
                    f"{max_baseline / 1e12:g}" if prov == "separate" and f > max_baseline else None)
            N = N_UPDATE if bench == "cfm_losses" else 1
            passes = 1 if prov == "fused" else (N_UPDATE if bench == "cfm_losses" else K)
            specs.append(Spec(bench, N, prov, useful, f, s.B * N, skip, img * passes))
    return specs


@dataclass
class Timing:
    warmup: int
    min_reps: int
    budget_s: float

    def estimate_s(self, call_s: float) -> float:
        reps = max(self.min_reps, min(200, int(self.budget_s / max(call_s, 1e-9)) + 1))
        return (self.warmup + reps) * call_s


def timing_for(call_s: float, budget_s: float) -> Timing:
    """Fewer warm-up calls and repetitions for slow calls (≥ 0.2 s: 1 warm-up; ≥ 0.5 s: 2 reps)."""
    return Timing(1 if call_s >= 0.2 else 3, 2 if call_s >= 0.5 else 3, budget_s)


# --------------------------------------------------------------------------------------------
# rows


def row_cells(r: dict) -> list[object]:
    def num(key, fmt):
        return "" if r.get(key) is None else format(r[key], fmt)

    cells = [r["config"], r["bench"], r["B"], r["N"], r["provider"], f"{r['views']:g}", r["P"],
             num("median_ms", ".2f"), num("p20", ".2f"), num("p80", ".2f"), num("items_per_s", ".1f"),
             "" if r.get("speedup") is None else f"{r['speedup']:.2f}x", num("tflop", ".3g"),
             num("tflops", ".3g"), "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", r.get("note", "")]
    return cells


def results_block(device_name: str, variant: str, peak: float | None, dev: str, path: Path | None) -> ResultsBlock:
    date = _dt.date.today().isoformat()
    prec = "float32" if dev == "cpu" else "bf16 Gemma, float32 SigLIP"
    peak_s = f"peak {peak:g} TFLOP/s bf16 dense" if peak else "no peak: MFU blank"
    return ResultsBlock(
        path,
        f"## bench_policy ({date}, {_commit()}, {device_name}, {variant}, {prec}, torch {torch.__version__}, {peak_s})",
        "rollout: action chunks/s (K 10, H 50, ODE); cfm_losses: (τ, ε) pairs/s (fwd+bwd, VLM trainable); "
        "chain_logprob: chains/s (K 10, Flow-Noise, fwd+bwd). `time vs ref` = median time / that of the "
        "shape's cached (fused N 8) provider. `views`/`P`: valid cameras and computed prefix positions per "
        "observation. `useful TFLOP`: the cached (fused) provider's FLOPs per call, credited to every "
        "provider of the shape (counted analytically; see the script's docstring); MFU = useful / time / "
        "peak. Rows are appended as measured: a missing tail means the run was cut off.",
        list(COLUMNS))


# --------------------------------------------------------------------------------------------


def _defaults(dev: str, name: str) -> tuple[str, str]:
    """(rollout batches, update batches) by device and config."""
    if dev == "cpu":
        return ("1,16,64", "1,16,64") if name.startswith("tiny") else ("1", "1")
    if name.startswith(("pi0", "pi05")):
        return "1,64", "1"
    return "1,16,64", "1,16"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--configs", default=None, help="comma list (default CPU tiny,small; GPU pi0,small)")
    ap.add_argument("--batches", default=None,
                    help="rollout batches, comma list (default CPU: tiny 1,16,64, others 1; GPU: pi0 1,64, small "
                         "1,16,64)")
    ap.add_argument("--update-batches", default=None,
                    help="update batches (default: CPU as --batches; GPU: pi0 1, small 1,16)")
    ap.add_argument("--groups", default="1,8", help="group sizes N for rollout")
    ap.add_argument("--variant", default="pi0", help="pi0 | pi05")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement (CPU 1, GPU 0.5)")
    ap.add_argument("--max-baseline-tflop", type=float, default=None,
                    help="skip a recompute/clone/separate call computing more (default GPU 500, CPU unlimited)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after start past which measurements are skipped (default GPU 240, CPU none)")
    ap.add_argument("--eff-tflops", type=float, default=None,
                    help="effective TFLOP/s for the time estimates (default GPU 400, CPU 0.05)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: by device name)")
    ap.add_argument("--no-update", action="store_true", help="skip the update (cfm_losses / chain_logprob) benchmarks")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (FLOPs, estimated time); run nothing")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = args.device
    gpu = dev == "cuda"
    budget = args.budget if args.budget is not None else (0.5 if gpu else 1.0)
    max_baseline = 1e12 * (args.max_baseline_tflop if args.max_baseline_tflop is not None
                           else (500.0 if gpu else float("inf")))
    deadline = args.deadline if args.deadline is not None else (240.0 if gpu else 0.0)
    eff = 1e12 * (args.eff_tflops or (400.0 if gpu else 0.05))
    eff32 = 50e12 if gpu else eff  # float32 SigLIP on a GPU: no bf16 tensor cores
    overhead_s = 0.05 if gpu else 0.0
    configs = (args.configs or ("tiny,small" if dev == "cpu" else "pi0,small")).split(",")
    groups = [int(g) for g in args.groups.split(",")]
    device_name = "(dry run)" if args.dry_run else _device_name(dev)
    peak = args.peak_tflops or peak_tflops(device_name, dev)
    record = not (args.no_record or args.dry_run)
    checks_before = _checks._value_checks
    fk.set_value_checks(False)
    block = results_block(device_name, args.variant, peak, dev, RESULTS if record else None)
    block.start()  # the heading first: a run cut off before its first row still says what ran
    print(f"# device: {device_name}; K {K}; peak {peak or '-'} TFLOP/s; plan at {eff / 1e12:g} TFLOP/s effective")
    print(f"{'config':<7} {'bench':<14} {'B':>3} {'N':>2} {'provider':<11} {'views':>5} {'P':>4} {'median ms':>10} "
          f"{'items/s':>9} {'vs ref':>7} {'TFLOP':>8} {'TFLOP/s':>8} {'MFU':>6}  note")
    rows: list[dict] = []
    total_est = 0.0
    slow = 1.0

    def emit(row: dict) -> None:
        rows.append(row)
        med = "" if row.get("median_ms") is None else f"{row['median_ms']:.2f}"
        ips = "" if row.get("items_per_s") is None else f"{row['items_per_s']:.1f}"
        sp = "" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
        tfs = "" if row.get("tflops") is None else f"{row['tflops']:.3g}"
        mfu = "" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        print(f"{row['config']:<7} {row['bench']:<14} {row['B']:>3} {row['N']:>2} {row['provider']:<11} "
              f"{row['views']:>5g} {row['P']:>4} {med:>10} {ips:>9} {sp:>7} {row['tflop']:>8.3g} {tfs:>8} {mfu:>6}  "
              f"{row.get('note', '')}", flush=True)
        block.add(row_cells(row))

    try:
        for name in configs:
            c = get_config(name, variant=args.variant) if not name.endswith("_pi05") else get_config(name)
            p = None
            slow = 1.0  # per config
            if not args.dry_run:
                try:
                    torch.manual_seed(0)
                    p = _build(c, dev)
                except Exception as e:  # one failure must not lose the other configs
                    _cleanup(dev)
                    emit(dict(config=name, bench="build", B=0, N=0, provider="-", views=0, P=0, tflop=0.0,
                              note=f"skipped: {_reason(e)}"))
                    continue
            rb, ub = _defaults(dev, name)
            rb = [int(b) for b in (args.batches or rb).split(",")]
            ub = [] if args.no_update else [int(b) for b in (args.update_batches or args.batches or ub).split(",")]
            for B in sorted(set(rb) | set(ub)):
                torch.manual_seed(1000 + B)
                obs = make_obs(c, B, "cpu" if args.dry_run else dev)
                s = prefix_shape(c, obs)
                plan: list[tuple[Spec, Callable[[], dict] | None]] = []
                if B in rb:
                    for N in groups:
                        plan += [(sp, partial(rollout_fns, p, obs, N) if p is not None else None)
                                 for sp in rollout_specs(c, s, N, dev, max_baseline)]
                if B in ub:
                    plan += [(sp, partial(update_fns, p, obs, N_UPDATE) if p is not None else None)
                             for sp in update_specs(c, s, max_baseline)]
                refs: dict[tuple[str, int], float] = {}
                fns_cache: dict = {}
                for sp, make_fns in plan:
                    call_s = (sp.computed - sp.fp32) / eff + sp.fp32 / eff32 + overhead_s
                    tm = timing_for(call_s, budget)
                    est = tm.estimate_s(call_s)
                    base = dict(config=name, bench=sp.bench, B=B, N=sp.N, provider=sp.provider, views=s.views, P=s.P,
                                tflop=sp.useful / 1e12)
                    note = "" if sp.computed == sp.useful else f"computes {sp.computed / 1e12:.3g} TFLOP/call"
                    if sp.skip:
                        emit({**base, "note": sp.skip})
                        continue
                    if args.dry_run:
                        total_est += est
                        emit({**base, "note": f"est {est:.1f} s ({call_s * 1e3:.0f} ms/call × "
                                              f"{tm.warmup}+{tm.estimate_s(call_s) / call_s - tm.warmup:.0f})"})
                        continue
                    left = deadline - (time.perf_counter() - t_start)
                    est *= slow  # scaled by the worst measured / estimated call time so far
                    if deadline and est > left:
                        emit({**base, "note": f"skipped: deadline (est {est:.0f} s, {max(left, 0):.0f} s left)"})
                        continue
                    row = _measure(p, sp, make_fns, fns_cache, dev, tm, refs, peak, base, note)
                    if row.get("median_ms") is not None:
                        slow = max(slow, row["median_ms"] * 1e-3 / call_s)
                    emit(row)
                del obs, fns_cache, plan
                if p is not None:
                    _cleanup(dev, p)
            if p is not None:
                p = None
                _cleanup(dev)
    finally:
        fk.set_value_checks(checks_before)
    if args.dry_run:
        print(f"estimated time of the measurements: {total_est:.0f} s at {eff / 1e12:g} TFLOP/s + "
              f"{overhead_s * 1e3:.0f} ms/call (model builds and set-up not included)")
    ratios = [r for r in rows if r.get("ratio_n8_n1") is not None]
    for r in ratios:
        print(f"cfm_losses {r['config']} B {r['B']}: time(N 8) / time(N 1) = {r['ratio_n8_n1']:.2f} (target ≤ 1.5)")
    if record:
        print(f"appended {len(rows)} rows to {RESULTS}")
    return rows


def _build(c: PolicyConfig, dev: str) -> Pi0Policy:
    if dev == "cuda":
        try:  # initialise on the GPU (a 3B-parameter CPU init takes minutes)
            with torch.device(dev):
                p = Pi0Policy(c)
        except Exception:  # e.g. a CPU-only op in some init: build on the CPU and move
            _cleanup(dev)
            p = Pi0Policy(c)
        p = p.to(dev)
        p.set_precision()
    else:
        p = Pi0Policy(c).to(dev)
    return p.eval()


def _cleanup(dev: str, p: Pi0Policy | None = None) -> None:
    """Free what a measurement left (gradients, a captured graph, the allocator's cache); never raises
    (after a CUDA error every later measurement fails on its own and gets its skip row)."""
    try:
        if p is not None:
            p.zero_grad(set_to_none=True)
            p._graphs = {}  # a captured graph pins its cache and memory pool
    except Exception as e:
        print(f"cleanup: {_reason(e)}", flush=True)
    release_cuda(dev)


def _measure(p: Pi0Policy, sp: Spec, make_fns, fns_cache: dict, dev: str, tm: Timing, refs: dict,
             peak: float | None, base: dict, note: str) -> dict:
    """One measurement under a try: a row with the timing, or a skip row naming the error."""
    update = sp.bench != "rollout"
    key = ("update", 0) if update else (sp.bench, sp.N)
    err = None
    try:
        if key not in fns_cache:
            fns_cache.clear()  # the previous shape's closures (graphs, chains) go first
            _cleanup(dev, p)
            if update:
                p.freeze("expert_and_vlm")
                p.train()
                fns_cache[key] = make_fns()
            else:
                p.eval()
                with torch.no_grad():
                    fns_cache[key] = make_fns()
        fns = fns_cache[key][sp.bench] if update else fns_cache[key]
        fn = fns[sp.provider]
        if update:
            p.train()
            ts = _time(fn, dev, tm.min_reps, tm.budget_s, warmup=tm.warmup)
            p.zero_grad(set_to_none=True)
        else:
            p.eval()
            with torch.no_grad():
                ts = _time(fn, dev, tm.min_reps, tm.budget_s, warmup=tm.warmup)
    except Exception as e:  # e.g. torch.OutOfMemoryError: record it and go on
        err = _reason(e)
    if err is not None:  # freed outside the except block: its traceback's frames hold the tensors
        _cleanup(dev, p)
        return {**base, "note": f"skipped: {err}"}
    med, p20, p80 = quantiles(ts)
    ref_key = (sp.bench, sp.N, "cached") if not update else (sp.bench, "fused")
    if sp.provider in ("cached", "fused"):
        refs[ref_key] = med
    ref = refs.get(ref_key)
    row = {**base, "median_ms": med, "p20": p20, "p80": p80, "items_per_s": sp.items / (med * 1e-3),
           "speedup": med / ref if ref else None, "tflops": sp.useful / (med * 1e-3) / 1e12, "reps": len(ts)}
    row["mfu"] = row["tflops"] / peak if peak else None
    if sp.provider == "N1" and ref:
        row["ratio_n8_n1"] = ref / med
        note = (note + "; " if note else "") + f"time(N 8) / time(N 1) = {ref / med:.2f} (target ≤ 1.5)"
    row["note"] = (note + "; " if note else "") + f"{len(ts)} reps"
    return row


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
