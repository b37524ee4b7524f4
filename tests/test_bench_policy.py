"""benchmarks/bench_policy.py: its FLOP formulas against FlopCounterMode, and main()'s recording."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from flowrl.models import Pi0Policy, get_config

bp = load_benchmark("bench_policy")

# FlopCounterMode has no formula for the CPU SDPA kernel (SigLIP's attention on CPU)
_MAP = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v)}


def _count(fn) -> int:
    fc = FlopCounterMode(display=False, custom_mapping=_MAP)
    with fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["tiny", "tiny_pi05"])
def test_flop_formulas_match_flop_counter(name):
    from flowkernels import _checks

    checks = _checks._value_checks
    c = get_config(name)
    torch.manual_seed(0)
    p = Pi0Policy(c).eval()
    try:
        for B in (1, 4):  # B 1: full observation; B 4: masked cameras, ragged token counts (padding)
            obs = bp.make_obs(p, B, "cpu")
            s = bp.prefix_shape(c, obs)
            if B == 4:
                assert s.views < c.num_cameras and s.B * s.P > int(
                    (obs.image_masks.sum(1) * c.tokens_per_image + obs.token_masks.sum(1)).sum())
            with torch.no_grad():
                for N in (1, 3):
                    fns = bp.rollout_fns(p, obs, N)
                    for prov in ("cached", "recompute", "clone"):
                        got, want = _count(fns[prov]), bp.flops_rollout(c, s, N, prov)
                        assert want == pytest.approx(got, rel=1e-3), (B, N, prov)
            p.freeze("expert_and_vlm")
            p.train()
            for bench, fns in bp.update_fns(p, obs, bp.N_UPDATE).items():
                for prov, fn in fns.items():
                    got = _count(fn)
                    p.zero_grad(set_to_none=True)
                    want = (bp.flops_update(c, s, bench, "fused", N=1) if prov == "N1"
                            else bp.flops_update(c, s, bench, prov))
                    assert want == pytest.approx(got, rel=0.01), (B, bench, prov)
            p.eval()
    finally:
        _checks.set_value_checks(checks)


def test_pi0_flop_counts():
    """The π0 numbers quoted in DESIGN §3."""
    c = get_config("pi0")
    s = bp.PrefixShape(B=1, images=3, P=816)
    assert bp.flops_siglip(c) / 1e12 == pytest.approx(0.219, abs=1e-3)
    assert bp.flops_prefix(c, s, split=True)["vlm"] / 1e12 == pytest.approx(3.33, abs=0.01)
    assert bp.flops_suffix(c, 1, bp.cache_len(c, s)) / 1e9 == pytest.approx(37.9, abs=0.1)
    assert bp.flops_rollout(c, s, 1, "cached") / 1e12 == pytest.approx(4.37, abs=0.01)


def test_peak_table():
    assert bp.peak_tflops("NVIDIA H200", "cuda") == 989.4
    assert bp.peak_tflops("NVIDIA H100 80GB HBM3", "cuda") == 989.4
    assert bp.peak_tflops("NVIDIA A100-SXM4-80GB", "cuda") == 312.0
    assert bp.peak_tflops("NVIDIA GeForce RTX 4090", "cuda") is None
    assert bp.peak_tflops("CPU x86_64", "cpu") is None


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    cells = [[x.strip() for x in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_main_records_rows_as_measured(tmp_path, monkeypatch):
    from flowkernels import _checks

    out = tmp_path / "results.md"
    monkeypatch.setattr(bp, "RESULTS", out)
    real_update_fns = bp.update_fns

    def update_fns(p, obs, N):  # chain_logprob's separate baseline raises, as an OOM would
        fns = real_update_fns(p, obs, N)

        def boom():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB\nmore detail")

        fns["chain_logprob"]["separate"] = boom
        return fns

    monkeypatch.setattr(bp, "update_fns", update_fns)
    checks = _checks._value_checks
    rows = bp.main(["--device", "cpu", "--configs", "tiny", "--batches", "1", "--groups", "1,2", "--budget", "0"])
    assert _checks._value_checks == checks, "main must restore flowkernels' value checks"
    text = out.read_text()
    assert text.count("## bench_policy (") == 1 and "CPU" in text
    header, body = _table(text)
    assert tuple(header) == bp.COLUMNS
    assert all(len(r) == len(header) for r in body), body
    assert len(body) == len(rows) == 2 * 3 + 3 + 2  # rollout N 1, 2 × (cached, recompute, clone); cfm 3; chain 2
    by = {(r[1], r[3], r[4]): dict(zip(header, r, strict=True)) for r in body}
    assert by[("rollout", "1", "cached")]["views"] == "2" and by[("rollout", "1", "cached")]["MFU"] == ""
    for key in (("rollout", "2", "clone"), ("cfm_losses", "8", "fused"), ("cfm_losses", "1", "N1")):
        r = by[key]
        assert float(r["median ms"]) > 0 and float(r["useful TFLOP"]) > 0 and float(r["TFLOP/s"]) > 0, r
    n1 = by[("cfm_losses", "1", "N1")]
    ratio = next(r["ratio_n8_n1"] for r in rows if r["provider"] == "N1")
    assert ratio > 0 and f"time(N 8) / time(N 1) = {ratio:.2f}" in n1["note"]
    skip = by[("chain_logprob", "1", "separate")]
    assert skip["median ms"] == ""
    assert skip["note"] == "skipped: OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB"
    assert float(by[("chain_logprob", "1", "fused")]["median ms"]) > 0  # measured before the failure


def test_main_rows_survive_a_cut(tmp_path, monkeypatch):
    """Rows are on disk as soon as measured: a run killed mid-way keeps the heading and its rows."""
    out = tmp_path / "results.md"
    monkeypatch.setattr(bp, "RESULTS", out)
    seen = []
    real = bp._measure

    def measure(*args, **kwargs):
        if len(seen) == 2:
            raise KeyboardInterrupt  # stands in for `timeout` killing the run
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bp, "_measure", measure)
    with pytest.raises(KeyboardInterrupt):
        bp.main(["--device", "cpu", "--configs", "tiny", "--batches", "1", "--groups", "1", "--budget", "0",
                 "--no-update"])
    header, body = _table(out.read_text())
    assert tuple(header) == bp.COLUMNS and len(body) == 2


def test_dry_run_and_baseline_cap(capsys):
    rows = bp.main(["--device", "cuda", "--dry-run", "--configs", "pi0", "--no-update"])
    by = {(r["B"], r["N"], r["provider"]): r for r in rows}
    assert by[(1, 1, "cached")]["views"] == 3 and by[(1, 1, "cached")]["P"] == 816
    assert "graph" in {r["provider"] for r in rows}
    assert by[(64, 8, "recompute")]["note"].startswith("not run: recompute computes")
    assert "estimated time" in capsys.readouterr().out
