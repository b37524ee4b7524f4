"""flowrl.checkpoint on its own: publishing, pruning, the ``latest`` pointer and its damage (found by a fuzzing
pass: pruning by name deleted the checkpoint just written, and a damaged pointer reached DeepSpeed as a bare
AssertionError)."""

from __future__ import annotations

import os

import pytest

from flowrl.checkpoint import (
    checkpoint_iteration,
    complete_checkpoints,
    finalize_checkpoint,
    latest_checkpoint,
    staging_dir,
    write_atomic,
)


def _save(run, it: int, keep: int = 2, payload: str = "x"):
    stage = staging_dir(run, it)
    stage.mkdir(parents=True)
    (stage / "data").write_text(payload)
    return finalize_checkpoint(run, it, keep=keep)


def _names(run) -> list[str]:
    return [p.name for p in complete_checkpoints(run)]


def test_prunes_by_iteration_number_and_never_the_new_checkpoint(tmp_path):
    for it in (999_998, 999_999, 1_000_000):  # by name, iter_1000000 sorts first and was pruned at once
        _save(tmp_path, it)
    assert _names(tmp_path) == ["iter_999999", "iter_1000000"]
    assert latest_checkpoint(tmp_path).name == "iter_1000000"
    # a save with a lower number than the ones present (another run's checkpoints) keeps the new one
    assert _save(tmp_path, 3).is_dir()
    assert latest_checkpoint(tmp_path).name == "iter_000003" and "iter_000003" in _names(tmp_path)
    assert len(_names(tmp_path)) == 2


@pytest.mark.parametrize("keep, left", [(0, 4), (1, 1), (3, 3)])
def test_keep(tmp_path, keep, left):
    for it in range(4):
        _save(tmp_path, it, keep=keep)
    assert len(_names(tmp_path)) == left and _names(tmp_path)[-1] == "iter_000003"


def test_same_iteration_saved_again_replaces_it(tmp_path):
    _save(tmp_path, 5, payload="old")
    d = _save(tmp_path, 5, payload="new")
    assert (d / "data").read_text() == "new" and _names(tmp_path) == ["iter_000005"]
    assert not list((tmp_path / "checkpoints").glob(".replaced_*"))


@pytest.mark.parametrize("pointer", ["", "  \n", ".", "..", "/etc", "../../other/iter_000001", ".staging_iter_000007",
                                     "iter_000009", "iter_x"])
def test_damaged_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, pointer):
    for it in (1, 2):
        _save(tmp_path, it)
    (tmp_path / "checkpoints" / ".staging_iter_000007").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text(pointer)
    with pytest.warns(UserWarning, match="not a complete checkpoint of this run; using the newest one, iter_000002"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "iter_000002"


def test_killed_before_the_pointer_and_empty_runs(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("iter_000001")  # names nothing: no checkpoint at all
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "iter_000000").mkdir()  # published, killed before `latest` was written
    assert latest_checkpoint(tmp_path).name == "iter_000000"
    assert checkpoint_iteration("iter_000012") == 12 and checkpoint_iteration(".staging_iter_000012") is None


def test_write_atomic_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    write_atomic(target, b"iter_000001")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"iter_000002")
    assert target.read_bytes() == b"iter_000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]
