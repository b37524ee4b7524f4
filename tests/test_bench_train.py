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
    assert text == "\n" + r["markdown"] and "## bench_train (" in text and "torch AdamW" in text
    # every table row's numeric cells are positive numbers
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| algorithm", "| env |"))]
    assert len(body) == 3, body
    for ln in body:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        nums = [float(c.rstrip("x")) for c in cells if re.fullmatch(r"[0-9.]+x?", c)]
        assert len(nums) >= 6 and all(v > 0 for v in nums), ln
