"""How benchmarks/bench_ops.py and bench_attention.py record: every run appends its own dated block
(heading, paragraph, table header) at the end of RESULTS.md, rows follow their header, every row has
the header's column count, rows are written as they are measured (a run cut short keeps them), and a
provider failing at one shape is skipped at that shape only, with the shape in its row."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import load_benchmark

import flowkernels._checks as _checks

OLD = "# Benchmark results\n\n## bench_ops\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## other\n\nA last paragraph."
ATTN_ARGS = ["--device", "cpu", "--rows", "2", "--groups", "1,2", "--prefix", "8", "--modes", "fwd", "--budget",
             "0.01", "--providers", "grouped,sdpa_expand,sdpa_clone,sdpa_dense"]
OPS_ARGS = ["--device", "cpu", "--batches", "1", "--ops", "flow_step_ode", "--no-compile", "--budget", "0.01"]


@pytest.fixture(autouse=True)
def _restore_value_checks():
    saved = _checks._value_checks
    yield
    _checks._value_checks = saved  # the benchmarks switch them off for the process


@pytest.fixture(scope="module")
def ops():
    return load_benchmark("bench_ops")


@pytest.fixture(scope="module")
def attn():
    return load_benchmark("bench_attention")


def _cells(line: str) -> list[str]:
    assert line.startswith("| ") and line.endswith(" |"), line
    return [c.strip() for c in line[2:-2].split(" | ")]


def blocks(text: str, name: str) -> list[dict]:
    """The ``### name (...)`` blocks of a results file, checked for shape: a blank line before the
    heading, a paragraph, the header and its separator, then only rows of the header's width."""
    lines = text.split("\n")
    out = []
    for i, ln in enumerate(lines):
        if not ln.startswith(f"### {name} ("):
            continue
        assert lines[i - 1] == "", f"no blank line before {ln!r}"
        assert lines[i + 1] == "" and lines[i + 2] and lines[i + 3] == "", lines[i:i + 4]
        header = _cells(lines[i + 4])
        assert lines[i + 5] == "|" + "---|" * len(header), lines[i + 5]
        rows = []
        j = i + 6
        while j < len(lines) and lines[j].startswith("|"):
            cells = _cells(lines[j])
            assert len(cells) == len(header), (header, lines[j])
            rows.append(dict(zip(header, cells)))
            j += 1
        assert j == len(lines) or lines[j] == "", f"block {ln!r} ends with {lines[j]!r}"
        out.append(dict(heading=ln, paragraph=lines[i + 2], header=header, rows=rows))
    return out


def test_time_signature_and_l2_flush_noop_on_cpu(ops):
    calls = []
    ts = ops._time(lambda: calls.append(1), "cpu", 3, 0.001)  # positional, as bench_policy & co. call it
    assert len(ts) >= 3 and len(calls) == len(ts) + 3
    assert len(ops._time(lambda: None, "cpu", min_reps=2, budget_s=0.001, flush_l2=True)) >= 2
    assert ops.l2_flush_buffer("cpu") is None


def test_time_cuda_branch_flushes_outside_the_events(ops, monkeypatch):
    """The CUDA branch, with fake events: the L2 flush is queued before the start event of every timed rep."""
    log, made = [], []

    class Event:  # created in pairs: start, end
        def __init__(self, enable_timing=False):
            self.name = "se"[len(made) % 2]
            made.append(self)

        def record(self):
            log.append(self.name)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    class Buf:
        def zero_(self):
            log.append("flush")

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(ops, "l2_flush_buffer", lambda dev: Buf())
    ts = ops._time(lambda: log.append("fn"), "cuda", min_reps=3, budget_s=0.0, flush_l2=True)
    assert ts == [1.0] * 3
    assert log == ["fn"] * 3 + ["flush", "s", "fn", "e"] * 3
    log.clear()
    ops._time(lambda: log.append("fn"), "cuda", min_reps=2, budget_s=0.0)
    assert log == ["fn"] * 3 + ["s", "fn", "e"] * 2


def test_bench_ops_blocks(ops, tmp_path, monkeypatch):
    res = tmp_path / "RESULTS.md"
    res.write_text(OLD)  # no trailing newline: the block must still start after a blank line
    monkeypatch.setattr(ops, "RESULTS", res)
    monkeypatch.setattr(ops, "copy_bandwidth", lambda dev: 10.0)
    for _ in range(2):
        assert ops.main(OPS_ARGS)
    text = res.read_text()
    assert text.startswith(OLD + "\n\n### bench_ops (")
    bs = blocks(text, "bench_ops")
    assert len(bs) == 2
    for b in bs:
        assert "cpu" in b["heading"].lower() and "float32" in b["heading"]
        assert b["header"] == ops.COLUMNS and "% copy BW" in b["paragraph"]
        assert [(r["op"], r["B"], r["provider"]) for r in b["rows"]] == [("flow_step_ode", "1", "eager"),
                                                                         ("flow_step_ode", "1", "cpu")]
        assert all(float(r["median ms"]) > 0 and r["peak MB"] == "-" for r in b["rows"])
        assert b["rows"][0]["vs torch eager"] == "1.00x"


def test_bench_ops_skip_and_incremental(ops, tmp_path, monkeypatch):
    res = tmp_path / "RESULTS.md"
    monkeypatch.setattr(ops, "RESULTS", res)
    monkeypatch.setattr(ops, "copy_bandwidth", lambda dev: 10.0)
    case = ops.CASES["flow_step_ode"]

    def run(a, be):
        if be == "cpu" and a["x"].shape[0] == 2:
            raise RuntimeError("no | such\nkernel")
        return case.run(a, be)

    monkeypatch.setitem(ops.CASES, "flow_step_ode", ops.Case(case.name, case.make, run, case.bytes_moved))
    ops.main([*OPS_ARGS[:3], "1,2", *OPS_ARGS[4:]])
    (b,) = blocks(res.read_text(), "bench_ops")
    got = [(r["B"], r["provider"], r["median ms"].startswith("skipped")) for r in b["rows"]]
    assert got == [("1", "eager", False), ("1", "cpu", False), ("2", "eager", False), ("2", "cpu", True)]
    assert b["rows"][-1]["median ms"] == "skipped: RuntimeError: no / such"

    # a run interrupted at its third measurement keeps its first two rows
    res.unlink()
    real, n = ops._time, []

    def interrupted(*a, **k):
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ops, "_time", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ops.main([*OPS_ARGS[:3], "1,2", *OPS_ARGS[4:]])
    (b,) = blocks(res.read_text(), "bench_ops")
    assert [(r["B"], r["provider"]) for r in b["rows"]] == [("1", "eager"), ("1", "cpu")]


def test_bench_attention_blocks(attn, tmp_path, monkeypatch):
    res = tmp_path / "RESULTS.md"
    res.write_text(OLD + "\n")
    monkeypatch.setattr(attn, "RESULTS", res)
    real = attn.run_sdpa_expand

    def expand_fails_at_n2(a, note=None):
        if a["N"] == 2 and a["q"].shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return real(a, note)

    monkeypatch.setattr(attn, "run_sdpa_expand", expand_fails_at_n2)
    for _ in range(2):
        rows = attn.main(ATTN_ARGS)
        assert {r["provider"] for r in rows} == {"grouped", "sdpa_expand", "sdpa_clone", "sdpa_dense"}
    text = res.read_text()
    assert text.startswith(OLD + "\n\n### bench_attention (")
    bs = blocks(text, "bench_attention")
    assert len(bs) == 2
    for b in bs:
        assert b["header"] == attn.COLUMNS and "% dense" in b["header"] and "kernel" in b["header"]
        assert "sdpa_dense" in b["paragraph"] and "float32" in b["heading"]
        by = {(r["N"], r["B·N"], r["provider"]): r for r in b["rows"]}
        assert len(by) == len(b["rows"]) == 8
        # failed only at N 2, B·N 2, and recorded there with its shape; measured at N 1
        skip = by["2", "2", "sdpa_expand"]
        assert skip["mode"] == "fwd" and skip["P"] == "8"
        assert skip["median ms"].startswith("skipped: OutOfMemoryError: CUDA out of memory")
        assert float(by["1", "2", "sdpa_expand"]["median ms"]) > 0
        for (n, bn, prov), r in by.items():
            if r["median ms"].startswith("skipped"):
                continue
            assert r["% dense"].endswith("%") and r["vs sdpa_clone"].endswith("x"), r
            assert r["kernel"] in (("",) if prov == "grouped" else (*attn.SDPA_KERNELS.values(), "?")), r
            tf, ms = float(r["TFLOP/s"]), float(r["median ms"])
            assert tf == pytest.approx(attn.flops(int(bn) // int(n), int(n), 8, "fwd") / (ms * 1e-3) / 1e12, rel=0.02)
            dense = by[n, bn, "sdpa_dense"]
            pct = 100 * float(dense["median ms"]) / ms  # same counted FLOPs: % dense = dense time / this time
            assert float(r["% dense"].rstrip("%")) == pytest.approx(pct, rel=0.02, abs=0.1)
        assert by["1", "2", "sdpa_dense"]["% dense"] == "100.0%"
        assert by["1", "2", "sdpa_clone"]["vs sdpa_clone"] == "1.00x"


def test_bench_attention_incremental(attn, tmp_path, monkeypatch):
    res = tmp_path / "RESULTS.md"
    monkeypatch.setattr(attn, "RESULTS", res)
    real, n = attn.time_and_peak, []

    def interrupted(*a, **k):
        n.append(1)
        if len(n) == 5:  # the first measurement of the second shape
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(attn, "time_and_peak", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attn.main(ATTN_ARGS)
    (b,) = blocks(res.read_text(), "bench_attention")
    assert sorted(r["provider"] for r in b["rows"]) == ["grouped", "sdpa_clone", "sdpa_dense", "sdpa_expand"]
    assert {(r["N"], r["B·N"]) for r in b["rows"]} == {("1", "2")}


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_sdpa_dense_matches_expand(attn, mode):
    """With every suffix key visible, the unmasked dense call computes what sdpa_expand computes."""
    a = attn.make_inputs(2, 2, 8, torch.float32, "cpu", grad=mode == "fwdbwd")
    a["smask"] = torch.ones_like(a["smask"])
    q, k, v = attn.make_dense(a, grad=mode == "fwdbwd")
    assert q.is_contiguous() and k.is_contiguous() and k.shape == (4, attn.HQ, 8 + attn.S, attn.D)
    note = {}
    dense = attn.run_sdpa_dense(q, k, v, note).transpose(1, 2)
    torch.testing.assert_close(dense, attn.run_sdpa_expand(a), atol=1e-5, rtol=1e-5)
    assert note["kernel"] in attn.SDPA_KERNELS.values()
    gout = torch.randn(4, attn.S, attn.HQ, attn.D)
    fn, _ = attn._runner("sdpa_dense", a, gout, mode)
    out = fn()
    if mode == "fwdbwd":
        assert [g.shape for g in out] == [q.shape, k.shape, v.shape]
    else:
        assert out.shape == (4, attn.HQ, attn.S, attn.D)


def test_sdpa_kernel_name_fallbacks(attn, monkeypatch):
    q = torch.randn(1, 8, 4, 16)
    k8, k1 = torch.randn(1, 8, 6, 16), torch.randn(1, 1, 6, 16)
    assert attn.sdpa_kernel(q, k8, k8) in attn.SDPA_KERNELS.values()

    def old_signature(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None):
        return 0

    monkeypatch.setattr(torch, "_fused_sdp_choice", old_signature)
    assert attn.sdpa_kernel(q, k8, k8, enable_gqa=False) == "math"
    assert attn.sdpa_kernel(q, k8, k8, enable_gqa=True) == "math"  # heads equal: asking without it is the same
    assert attn.sdpa_kernel(q, k1, k1, enable_gqa=True) == "?"

    def broken(*a, **k):
        raise RuntimeError("no")

    monkeypatch.setattr(torch, "_fused_sdp_choice", broken)
    assert attn.sdpa_kernel(q, k8, k8) == "?"
    assert re.fullmatch(r"\?", attn.sdpa_kernel(q, k1, k1, enable_gqa=True))
