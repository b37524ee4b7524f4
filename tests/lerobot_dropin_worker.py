"""Checks of flowkernels.integrations.lerobot, run inside the lerobot venv (Python 3.12, lerobot 0.6.1).

Started by tests/test_lerobot_dropin.py as a subprocess (the project's .venv cannot import lerobot):

    .venv-lerobot/bin/python tests/lerobot_dropin_worker.py --group basic|compile --out result.json

Builds the tiny random π0 / π0.5 of scripts/lerobot_reference.py and writes a JSON list of checks
``{"name", "ok", "detail"}``; it never raises on a failed check (the pytest side asserts), only on
a broken environment. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import lerobot_reference as ref  # noqa: E402
import torch  # noqa: E402

import flowkernels as fk  # noqa: E402
import flowkernels.integrations.lerobot as fkl  # noqa: E402

CHUNK, SEED = 10, 0
TOL = 1e-5  # fp32 actions, patched vs lerobot
RESULTS: list[dict] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def build(variant: str, compile_model: bool = False):
    """The tiny policy of lerobot_reference.build_policy, optionally with lerobot's torch.compile."""
    ref._patch_lerobot_builders()
    cfg = ref._make_config(variant, CHUNK)
    if compile_model:
        cfg.compile_model = True
        cfg.compile_mode = "default"  # lerobot's default "max-autotune" benchmarks kernels: minutes on CPU
    policy = ref._policy_class(variant)(cfg)
    policy.to(torch.float32)
    ref._randomize(policy, SEED)
    policy.eval()
    return policy


def model_args(variant: str, inputs: dict) -> list:
    args = [list(inputs["images"].unbind(1)), list(inputs["img_masks"].unbind(1)), inputs["lang_tokens"]]
    args.append(inputs["lang_masks"])
    if variant == "pi0":
        args.append(inputs["state"])
    return args


def run(model, variant: str, inputs: dict) -> torch.Tensor:
    return model.sample_actions(*model_args(variant, inputs), noise=inputs["noise"].clone())


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class Counters:
    """Counts lerobot's cache clones and transformers' cache appends while active."""

    def __init__(self, variant: str):
        import lerobot.policies.pi0.modeling_pi0 as m0
        import lerobot.policies.pi05.modeling_pi05 as m05
        from transformers.cache_utils import DynamicLayer

        self.mod = m0 if variant == "pi0" else m05
        self.layer_cls = DynamicLayer
        self.clones = self.updates = 0

    def __enter__(self):
        self._clone, self._update = self.mod.clone_past_key_values, self.layer_cls.update

        def clone(*a, **k):
            self.clones += 1
            return self._clone(*a, **k)

        def update(*a, **k):
            self.updates += 1
            return self._update(*a, **k)

        self.mod.clone_past_key_values = clone
        self.layer_cls.update = update
        return self

    def __exit__(self, *exc):
        self.mod.clone_past_key_values = self._clone
        self.layer_cls.update = self._update


def basic(variant: str) -> None:
    policy = build(variant)
    model = policy.model
    cls = type(model)
    original = cls.__dict__["sample_actions"]
    inputs = ref.make_inputs(policy, variant, CHUNK, SEED)
    K = model.config.num_inference_steps
    depth = len(model.paligemma_with_expert.gemma_expert.model.layers)

    with Counters(variant) as c0:
        a0 = run(model, variant, inputs)
    check(f"{variant}/lerobot clones the cache every step", c0.clones == K, f"{c0.clones} clones, {c0.updates} appends")

    # live instance, default options
    fkl.apply_flowkernels(policy)
    check(f"{variant}/instance patched", "sample_actions" in model.__dict__ and fkl.is_patched(policy))
    snap = {}
    real_prefix = fkl._compute_prefix

    def spy(*a, **k):
        p = real_prefix(*a, **k)
        snap["prefix"] = p
        snap["keys"] = [t.clone() for t in p.keys]
        snap["shapes"] = [tuple(layer.keys.shape) for layer in p.cache.layers]
        return p

    fkl._compute_prefix = spy
    try:
        with Counters(variant) as c1:
            a1 = run(model, variant, inputs)
    finally:
        fkl._compute_prefix = real_prefix
    d = maxdiff(a0, a1)
    check(f"{variant}/instance patch == lerobot", d <= TOL, f"max|Δ| {d:.2e} (|a|max {a0.abs().max().item():.2f})")
    check(
        f"{variant}/patched path never clones or extends the cache",
        c1.clones == 0 and c1.updates == depth,
        f"{c1.clones} clones, {c1.updates} appends (prefix pass: {depth})",
    )
    p = snap["prefix"]
    same = all(torch.equal(a, b) for a, b in zip(snap["keys"], p.keys)) and snap["shapes"] == [
        tuple(layer.keys.shape) for layer in p.cache.layers
    ]
    check(f"{variant}/prefix cache unchanged after {K} steps", same, f"shapes {snap['shapes'][0]}")

    # options
    for kw in (
        {"attention": False},
        {"denoise": False},
        {"attention": False, "reuse_prefix": False},
        {"attention": False, "reuse_prefix": False, "denoise": False},
    ):
        fkl.apply_flowkernels(policy, **kw)
        with Counters(variant) as c:
            d = maxdiff(a0, run(model, variant, inputs))
        clones = 0 if kw.get("reuse_prefix", True) else K
        ok = d <= TOL and c.clones == clones
        check(f"{variant}/options {kw} == lerobot", ok, f"max|Δ| {d:.2e}, {c.clones} clones")

    # idempotent + revert
    fkl.apply_flowkernels(policy)
    fkl.apply_flowkernels(policy.model)
    fkl.revert_flowkernels(policy)
    a2 = run(model, variant, inputs)
    check(
        f"{variant}/revert restores lerobot exactly",
        "sample_actions" not in model.__dict__
        and "sample_actions_with_logprob" not in model.__dict__
        and cls.__dict__["sample_actions"] is original
        and not fkl.is_patched(policy)
        and torch.equal(a0, a2),
        f"max|Δ| {maxdiff(a0, a2):.2e}",
    )

    # class, before construction
    policy_cls = type(policy)
    fkl.apply_flowkernels(policy_cls)
    fkl.apply_flowkernels(policy_cls)  # twice: harmless
    p2 = build(variant)
    a3 = run(p2.model, variant, inputs)
    patched_fn = getattr(cls.__dict__["sample_actions"], "__flowkernels_original__", None)
    check(
        f"{variant}/class patch before construction == lerobot",
        patched_fn is original and maxdiff(a0, a3) <= TOL,
        f"max|Δ| {maxdiff(a0, a3):.2e}",
    )
    fkl.revert_flowkernels(policy_cls)
    check(
        f"{variant}/class revert restores the original methods",
        cls.__dict__["sample_actions"] is original
        and "sample_actions_with_logprob" not in cls.__dict__
        and torch.equal(run(p2.model, variant, inputs), a0),
    )

    # Flow-SDE / Flow-Noise log-probs == chain_logprob with lerobot's own velocities
    fkl.apply_flowkernels(policy)
    args = model_args(variant, inputs)
    state = args.pop() if variant == "pi0" else None
    B = inputs["noise"].shape[0]
    s_ode = model.sample_actions_with_logprob(*args, state=state, noise=inputs["noise"].clone(), mode="ode")
    check(f"{variant}/logprob sampler, mode ode == sample_actions", maxdiff(s_ode.actions, a0) <= TOL)
    dim_mask = torch.zeros(32, dtype=torch.bool)
    dim_mask[: ref.RAW_ACTION_DIM] = True
    cases = [
        ("sde", {"noise_level": 0.5}),
        ("sde", {"noise_level": 0.7, "sde_steps": torch.tensor([3, 0])[:B], "dim_mask": dim_mask}),
        ("noise", {"noise_std": 0.2}),
    ]
    for mode, kw in cases:
        s = model.sample_actions_with_logprob(
            *args, state=state, noise=inputs["noise"].clone(), mode=mode, seed=7, **kw
        )
        again = model.sample_actions_with_logprob(
            *args, state=state, noise=inputs["noise"].clone(), mode=mode, seed=7, **kw
        )
        # the model's velocities on the stored chain, with lerobot's own denoise_step
        with torch.no_grad():
            prefix = fkl._compute_prefix(model, *args)
            v = []
            for k in range(K):
                t = s.t_grid[k].expand(B)
                x = s.chain[:, k]
                if variant == "pi0":
                    v.append(model.denoise_step(state, prefix.pad_masks, prefix.cache, x, t))
                else:
                    v.append(model.denoise_step(prefix.pad_masks, prefix.cache, x, t))
            v = torch.stack(v, dim=1)
        lp = fk.chain_logprob(
            s.chain,
            v,
            s.t_grid,
            mode,
            std=s.std,
            noise_level=kw.get("noise_level", 0.5),
            steps=kw.get("sde_steps"),
            dim_mask=kw.get("dim_mask"),
            include_initial=False,
        )
        dv = maxdiff(v, s.velocities)
        dlp = maxdiff(lp, s.logprob)
        name = f"{variant}/{mode} {sorted(kw)} log-prob == chain_logprob(lerobot velocities)"
        check(
            name,
            dv <= TOL and dlp <= 1e-4 * max(1.0, s.logprob.abs().max().item()) and torch.equal(s.chain, again.chain),
            f"max|Δv| {dv:.2e}, logp {s.logprob.tolist()} vs {lp.tolist()} (Δ {dlp:.2e})",
        )
    fkl.revert_flowkernels(policy)
    found_by_fuzzing(variant, policy, inputs, a0)


def found_by_fuzzing(variant: str, policy, inputs: dict, a0: torch.Tensor) -> None:
    """Cases a fuzzing pass found: each crashed, or silently differed from lerobot, before its fix."""
    import copy
    import types as _types
    import warnings

    from lerobot.policies.rtc.configuration_rtc import RTCConfig

    model = policy.model
    # torch.autocast (lerobot's eval with use_amp): the cached prefix K/V came out float32, the suffix q bf16, and
    # prefix_attention / flow_step refused the mix; lerobot's matmuls cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_amp = run(model, variant, inputs)
        for kw in ({}, {"attention": False}, {"denoise": False}):
            fkl.apply_flowkernels(policy, **kw)
            try:
                got = run(model, variant, inputs)
                d = maxdiff(ref_amp, got)
                ok = got.dtype == ref_amp.dtype and d <= 0.05 * max(1.0, ref_amp.abs().max().item())
                check(f"{variant}/autocast bf16 {kw} ≈ lerobot under autocast", ok, f"max|Δ| {d:.2e}")
            except Exception as e:
                check(f"{variant}/autocast bf16 {kw} ≈ lerobot under autocast", False, repr(e))
    # deepcopy of a patched policy, then revert: the copy got a bare sentinel object as its sample_actions
    fkl.apply_flowkernels(policy)
    q = copy.deepcopy(policy)
    fkl.revert_flowkernels(q)
    fkl.revert_flowkernels(policy)
    ok = "sample_actions" not in q.model.__dict__ and not fkl.is_patched(q)
    check(f"{variant}/deepcopy + revert gives lerobot back", ok and torch.equal(run(q.model, variant, inputs), a0))
    # RTC debug tracking with RTC off: lerobot records every step; the patched loop recorded none
    r = build(variant)
    r.config.rtc_config = RTCConfig(enabled=False, debug=True)
    r.init_rtc_processor()
    fkl.apply_flowkernels(r)
    run(r.model, variant, inputs)
    n = len(r.rtc_processor.get_all_debug_steps())
    check(f"{variant}/RTC debug tracking still records the steps", n == r.model.config.num_inference_steps, f"{n}")
    # options and classes checked when patching, not at the first inference
    for kw, exc, msg in (({"backend": "bogus"}, ValueError, "backend must be one of"),
                         ({"attention": "no"}, TypeError, "attention must be a bool")):
        try:
            fkl.apply_flowkernels(policy, **kw)
            check(f"{variant}/apply_flowkernels({kw}) refused", False, "accepted")
        except exc as e:
            check(f"{variant}/apply_flowkernels({kw}) refused", msg in str(e), str(e))
    fake = _types.new_class("PI0Pytorch", (torch.nn.Module,))
    try:
        fkl.apply_flowkernels(fake)
        check(f"{variant}/a PI0Pytorch from another module refused", False, "accepted")
    except TypeError as e:
        check(f"{variant}/a PI0Pytorch from another module refused", "is not lerobot's" in str(e), str(e))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lerobot 0.6.x: no version warning
        fkl.apply_flowkernels(policy)
    # train mode with gradient checkpointing: transformers returns no cache; the error names the fix
    model.gradient_checkpointing_enable()
    policy.train()
    try:
        run(model, variant, inputs)
        check(f"{variant}/train mode + gradient checkpointing: clear error", False, "no error")
    except RuntimeError as e:
        check(f"{variant}/train mode + gradient checkpointing: clear error", "policy.eval()" in str(e), str(e))
    finally:
        model.gradient_checkpointing_disable()
        policy.eval()
        fkl.revert_flowkernels(policy)


def compiled(variant: str) -> None:
    import torch._dynamo

    eager = build(variant)
    inputs = ref.make_inputs(eager, variant, CHUNK, SEED)
    a0 = run(eager.model, variant, inputs)

    # lerobot's own compile (config.compile_model): instance attribute bound at construction
    t0 = time.perf_counter()
    policy = build(variant, compile_model=True)
    model = policy.model
    lerobot_compiled = model.__dict__.get("sample_actions")
    check(f"{variant}/lerobot binds a compiled sample_actions", fkl._is_compiled(lerobot_compiled))
    ac = run(model, variant, inputs)
    check(
        f"{variant}/compiled lerobot == eager lerobot",
        maxdiff(a0, ac) <= TOL,
        f"max|Δ| {maxdiff(a0, ac):.2e} ({time.perf_counter() - t0:.0f} s incl. compile)",
    )

    t0 = time.perf_counter()
    fkl.apply_flowkernels(policy)
    bound = model.__dict__["sample_actions"]
    a1 = run(model, variant, inputs)
    check(
        f"{variant}/live compiled instance: patched + recompiled == lerobot",
        fkl._is_compiled(bound) and bound is not lerobot_compiled and maxdiff(a0, a1) <= TOL,
        f"max|Δ| {maxdiff(a0, a1):.2e} ({time.perf_counter() - t0:.0f} s incl. compile)",
    )
    fkl.revert_flowkernels(policy)
    check(
        f"{variant}/revert restores lerobot's compiled method",
        model.__dict__["sample_actions"] is lerobot_compiled and torch.equal(run(model, variant, inputs), ac),
    )

    # class patched before construction: lerobot's __init__ compiles the patched method
    torch._dynamo.reset()
    t0 = time.perf_counter()
    fkl.apply_flowkernels(type(policy))
    p2 = build(variant, compile_model=True)
    fn = p2.model.__dict__["sample_actions"]
    with Counters(variant) as c:  # the first call traces: a traced clone_past_key_values would count
        a2 = run(p2.model, variant, inputs)
    check(
        f"{variant}/class patch + lerobot compile == lerobot",
        fkl._is_compiled(fn) and c.clones == 0 and maxdiff(a0, a2) <= TOL,
        f"max|Δ| {maxdiff(a0, a2):.2e}, {c.clones} clones traced ({time.perf_counter() - t0:.0f} s incl. compile)",
    )
    fkl.revert_flowkernels(type(policy))
    # lerobot bound the compiled patched method on p2 at construction: still patched after the class revert, and
    # reverting the instance gives lerobot's own method, compiled (is_patched said False; revert did nothing)
    still = fkl.is_patched(p2)
    fkl.revert_flowkernels(p2)
    fn = p2.model.__dict__["sample_actions"]
    orig = getattr(fn, "_torchdynamo_orig_callable", None)
    lerobots = inspect.unwrap(type(p2.model).__dict__["sample_actions"])
    check(
        f"{variant}/instance built from a patched class: is_patched, and revert gives lerobot's compiled method",
        still and not fkl.is_patched(p2) and fkl._is_compiled(fn)
        and inspect.unwrap(getattr(orig, "__func__", orig)) is lerobots,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", choices=("basic", "compile"), required=True)
    ap.add_argument("--variants", default="pi0,pi05")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    for variant in args.variants.split(","):
        try:
            (basic if args.group == "basic" else compiled)(variant)
        except Exception:  # a crash is a failed check with its traceback, not a lost report
            check(f"{variant}/{args.group} ran to the end", False, traceback.format_exc())
    if args.out:
        args.out.write_text(json.dumps(RESULTS, indent=1))
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
