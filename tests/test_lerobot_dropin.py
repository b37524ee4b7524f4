"""flowkernels as a drop-in for lerobot 0.6.1's π0 / π0.5 (flowkernels/integrations/lerobot.py).

lerobot needs Python ≥ 3.12 and torch < 2.12, so it lives in its own venv (``scripts/setup_lerobot_env.sh``
builds ``.venv-lerobot`` and installs flowkernels into it, editable; ``LEROBOT_VENV`` moves it). These
tests run ``tests/lerobot_dropin_worker.py`` there and assert on its JSON report:

* ``basic`` — for the tiny random π0 and π0.5: patched ``sample_actions`` == lerobot's (≤ 1e-5, fp32,
  same noise) on a live instance, for every option combination, and with the class patched before
  construction; the patched path clones the prefix cache 0 times (lerobot: once per step) and never
  appends to it; revert restores the original methods and bit-identical outputs; applying twice is
  harmless; ``sample_actions_with_logprob`` (Flow-SDE all steps / one step per sample with a dim mask,
  Flow-Noise with a fixed std) returns log-probs equal to ``fk.chain_logprob`` recomputed from the chain
  with lerobot's own ``denoise_step`` velocities.
* ``compile`` (slow: 6 inductor compilations, about 5.5 min on a 2-core CPU; runs in CI;
  ``FLOWKERNELS_SKIP_LEROBOT_COMPILE_TEST=1`` skips it) — the same with lerobot's
  ``config.compile_model`` (torch.compile of ``sample_actions`` bound on the instance,
  ``compile_mode="default"`` on CPU): a compiled live
  instance is patched and recompiled, the class patched before construction is compiled by lerobot,
  revert gives back lerobot's compiled method.

Both skip with a reason when the venv or flowkernels inside it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import lerobot_env, lerobot_python, lerobot_skip_reason

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "lerobot_dropin_worker.py"


def _skip_reason() -> str | None:
    return lerobot_skip_reason("lerobot.policies.pi0.modeling_pi0", "flowkernels.integrations.lerobot")


def _run_worker(group: str, tmp_path: Path, timeout: int) -> list[dict]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / f"{group}.json"
    proc = subprocess.run(
        [str(lerobot_python()), str(WORKER), "--group", group, "--out", str(out)],
        capture_output=True,
        text=True,
        env=lerobot_env(),  # offline; the venv imports its own (editable) flowkernels
        cwd=ROOT,
        timeout=timeout,
    )
    if not out.exists():
        pytest.fail(f"worker wrote no report (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def _assert_all(results: list[dict]) -> None:
    assert results, "the worker ran no checks"
    failed = [f"{r['name']}: {r['detail']}" for r in results if not r["ok"]]
    assert not failed, "failed checks:\n" + "\n".join(failed)


def test_lerobot_dropin_eager(tmp_path):
    results = _run_worker("basic", tmp_path, timeout=900)
    names = {r["name"] for r in results}
    for variant in ("pi0", "pi05"):
        assert f"{variant}/instance patch == lerobot" in names
        assert f"{variant}/patched path never clones or extends the cache" in names
    _assert_all(results)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FLOWKERNELS_SKIP_LEROBOT_COMPILE_TEST") == "1",
    reason="FLOWKERNELS_SKIP_LEROBOT_COMPILE_TEST=1: torch.compile (inductor) of lerobot's sample_actions skipped "
    "(6 compilations, about 5.5 min on a 2-core CPU)",
)
def test_lerobot_dropin_compiled(tmp_path):
    results = _run_worker("compile", tmp_path, timeout=3600)
    _assert_all(results)


def test_bench_lerobot_records_its_block_row_by_row(tmp_path):
    """benchmarks/bench_lerobot.py (the GPU session's lerobot stage) wrote its table only at the end, and one
    failing shape ended the run: it now writes its block with the first row and each row as measured (a failing
    shape is a skip row); bad arguments are refused before any work."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n")
    cmd = [str(lerobot_python()), str(ROOT / "benchmarks" / "bench_lerobot.py"), "--device", "cpu", "--variants",
           "pi0", "--budget", "0.01", "--min-reps", "1", "--threads", "1", "--out", str(out)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], capture_output=True, text=True, env=lerobot_env(), cwd=ROOT,
                              timeout=600)

    proc = run("--sizes", "tiny", "--batches", "1,2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0] == "# results" and lines[1] == "" and lines[2].startswith("## bench_lerobot (")
    table = [ln for ln in lines if ln.startswith("|")]
    header, rows = table[0], table[2:]
    assert header.startswith("| size | variant | B | provider |")
    assert all(r.count("|") == header.count("|") for r in rows), rows
    assert [(r.split("|")[3].strip(), r.split("|")[4].strip()) for r in rows] == [
        (b, p) for b in ("1", "2") for p in ("lerobot", "flowkernels", "reuse_only")]
    for extra, msg in ((["--sizes", "huge"], "unknown --sizes"), (["--batches", "0"], "--batches must be >= 1")):
        proc = run(*extra)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
