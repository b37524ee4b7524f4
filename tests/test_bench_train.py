"""Smoke test of benchmarks/bench_train.py: ``--quick`` for two algorithms (+ the pipeline row)."""

from __future__ import annotations

import re

from conftest import load_benchmark


def _load():
    return load_benchmark("bench_train")


def test_bench_train_quick(tmp_path):
    from flowkernels import _checks

    out = tmp_path / "results.md"
    r = _load().main(["--quick", "--algos", "fpo,sft", "--device", "cpu", "--out", str(out)])
    assert _checks._value_checks, "the benchmark must not switch flowkernels' value checks off on CPU"
    assert [row["algo"] for row in r["rows"]] == ["fpo", "sft"]
    for row in r["rows"]:
        for k in ("rollout_sps", "env_steps_ps", "update_sps", "rollout_ms", "update_ms"):
            assert row[k] > 0, (row["algo"], k, row[k])
        assert row["update_samples"] == 2 * 4  # --quick: 2 optimizer steps of 4 samples
    (pipe,) = r["pipeline"]
    assert pipe["env"] == "reach" and pipe["sps1"] > 0 and pipe["sps2"] > 0 and pipe["ratio"] > 0
    text = out.read_text()
    # the printed tables, recorded as two blocks (the pipelined table under its own heading)
    header = r["markdown"].splitlines()[0]
    assert text == r["markdown"].replace("\n\nPipelined", f"\n\n{header}: pipelined rollout\n\nPipelined"), text
    assert "## bench_train (" in text and "torch AdamW" in text
    # every table row's numeric cells are positive numbers
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| algorithm", "| env |"))]
    assert len(body) == 3, body
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        nums = [float(c.rstrip("x")) for c in cells if re.fullmatch(r"[0-9.]+x?", c)]
        assert len(nums) >= 6 and all(v > 0 for v in nums), ln


def test_bench_train_records_each_row_as_measured_and_a_failure_as_a_skip_row(tmp_path, monkeypatch):
    """A measurement that fails (out of memory with the small model on a GPU, say) is a skip row saying why; the
    rows before it are in the file already (they were lost when the table was written only at the end) and the
    later algorithms still run. A bad --set is an error before any work."""
    import pytest

    bench = _load()
    out = tmp_path / "results.md"
    seen_in_file: list[str] = []
    orig = bench.bench_algo

    def flaky(algo, *a, **k):
        seen_in_file.append(out.read_text() if out.exists() else "")
        if algo == "flow_sde_ppo":
            raise RuntimeError("CUDA out of memory | tried to allocate 2 GiB")
        return orig(algo, *a, **k)

    monkeypatch.setattr(bench, "bench_algo", flaky)
    r = bench.main(["--quick", "--algos", "fpo,flow_sde_ppo,sft", "--device", "cpu", "--pipeline-algo", "",
                    "--out", str(out)])
    assert [row["algo"] for row in r["rows"]] == ["fpo", "flow_sde_ppo", "sft"]
    assert r["rows"][1]["skipped"] == "RuntimeError: CUDA out of memory / tried to allocate 2 GiB"
    assert "| fpo | tiny |" in seen_in_file[1] and "| flow_sde_ppo |" in seen_in_file[2]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| algorithm")]
    assert [ln.split("|")[1].strip() for ln in rows] == ["fpo", "flow_sde_ppo", "sft"]
    assert "skipped: RuntimeError: CUDA out of memory / tried" in rows[1] and rows[2].count("| - ") == 0
    with pytest.raises(Exception, match="no_such_key"):
        bench.main(["--quick", "--algos", "fpo", "--device", "cpu", "--set", "algo.no_such_key=1"])
