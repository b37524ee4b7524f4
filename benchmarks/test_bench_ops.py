"""pytest-benchmark wrappers: ``pytest benchmarks --benchmark-only`` times the CPU set (B 256,
H 50, D 32, K 10, N 8) for torch eager and the C++ path side by side; compare the groups."""

from __future__ import annotations

import pytest
import torch
from bench_ops import CASES

import flowkernels as fk

B = 256


@pytest.fixture(autouse=True)
def _no_value_checks():
    fk.set_value_checks(False)
    yield
    fk.set_value_checks(True)


@pytest.mark.parametrize("provider", ["torch", "cpu"])
@pytest.mark.parametrize("op", list(CASES))
def test_bench(benchmark, op, provider):
    case = CASES[op]
    inputs = case.make(B, torch.float32, "cpu")
    benchmark.group = op
    benchmark(case.run, inputs, provider)
