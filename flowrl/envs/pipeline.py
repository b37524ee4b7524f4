"""A pipelined rollout: one group of envs steps while the policy acts for another group.

:class:`PipelinedEnv` presents consecutive sub-envs (groups) as one :class:`VecEnv` whose
``num_envs`` is their sum: observations and steps are concatenated in order, a plain
:meth:`~PipelinedEnv.step` steps every group. Its :meth:`~PipelinedEnv.step_chunks` (the act →
step loop of a rollout) interleaves the groups, as RLinf's hybrid pipelining does::

    chunk t:  act(obs_0) → step_async_0 │ act(obs_1) → step_async_1 │ …
    chunk t+1: step_wait_0 → act(obs_0') → step_async_0 │ step_wait_1 → act(obs_1') → …

so while group 0's chunk runs in its simulator workers, the policy computes group 1's actions,
and so on around the ring: with stepping and inference of similar cost, the accelerator and the
simulators both stay busy. The yields are those of the sequential loop (``(obs, act outputs,
step)`` for all envs per chunk), so an algorithm's rollout reads the same with and without it.

A sub-env steps asynchronously through its own ``step_async`` / ``step_wait`` when it overrides
them (:class:`~flowrl.envs.libero.LiberoEnv`: the actions go to its worker processes, which step
while the caller goes on; no thread is used for it, whatever ``threaded`` says). One that only
has the synchronous default can be stepped on a background thread (``threaded=True``): the
actions are copied to the host without blocking the caller (pinned memory + a CUDA event), and
the thread waits for that copy, then runs ``step``. Simulator workers (separate processes) and
torch ops release the GIL, so the step overlaps the caller's inference. Without threads, such a
sub-env steps synchronously inside ``step_async`` (correct, no overlap: the right choice for
:class:`~flowrl.envs.reach.ReachEnv`, whose step is a few batched tensor ops on the policy's
device).

Sub-envs built with an ``env_offset`` attribute (ReachEnv, LiberoEnv) must hold consecutive
global env indices; they then get the same reset seed and are told apart by their offsets (a
PipelinedEnv of ReachEnvs runs exactly the episodes of one ReachEnv of the summed size). Other
sub-envs get the distinct seeds ``seed + 1_000_003·g``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from flowrl.envs.base import ActFn, ChunkStep, EnvObs, VecEnv, cat_obs, cat_outputs

__all__ = ["FORWARDED_METHODS", "PipelinedEnv"]

_SHARED = ("action_dim", "state_dim", "num_cameras", "image_size", "chunk_steps", "max_episode_steps",
           "vocab_size", "max_token_len")
_SEED_STRIDE = 1_000_003


def _native_async(env: VecEnv) -> bool:
    """Whether ``env`` overrides the synchronous default ``step_async``."""
    return type(env).step_async is not VecEnv.step_async


class PipelinedEnv(VecEnv):
    """Consecutive sub-envs as one VecEnv, with a rollout loop that overlaps their stepping.

    Args:
        envs: the groups (≥ 1), in global env order; they must agree on the action / state /
            camera / chunk / episode / vocabulary sizes, the device and ``group_size`` (GRPO
            groups never straddle two sub-envs: each sub-env's ``num_envs`` is a multiple of it).
        threaded: step sub-envs without a native ``step_async`` on a background thread (see the
            module docstring); False: they step synchronously inside ``step_async``.

    Attributes every sub-env has are forwarded: per-env tensors / arrays (leading dim
    ``num_envs``, e.g. ReachEnv's ``goal``) concatenated, values they share (``expert_quality``)
    as they are. Methods only when they take no env indices (:data:`FORWARDED_METHODS`:
    ``observe``, ``expert_actions``, ``optimal_steps``, ``set_expert_quality``), with their
    results concatenated; others (e.g. LiberoEnv's ``set_next_init``) are called on
    ``.envs[g]`` with that sub-env's local indices.
    """

    def __init__(self, envs: Sequence[VecEnv], threaded: bool = False) -> None:
        envs = list(envs)
        if not envs:
            raise ValueError("PipelinedEnv: needs at least one sub-env")
        first = envs[0]
        for name in _SHARED:
            vals = [getattr(e, name) for e in envs]
            if any(v != vals[0] for v in vals):
                raise ValueError(f"PipelinedEnv: the sub-envs disagree on {name}: {vals}")
        devs = [torch.device(e.device) for e in envs]
        if any(d != devs[0] for d in devs):
            raise ValueError(f"PipelinedEnv: the sub-envs live on different devices: {devs}")
        sizes = [int(e.num_envs) for e in envs]
        gs = [int(getattr(e, "group_size", 1)) for e in envs]
        if any(g != gs[0] for g in gs):
            raise ValueError(f"PipelinedEnv: the sub-envs have different group_size {gs}")
        if any(n % gs[0] for n in sizes):
            raise ValueError(f"PipelinedEnv: sub-env sizes {sizes} must be multiples of group_size={gs[0]} "
                             "(a GRPO group must not straddle two sub-envs)")
        offsets = [getattr(e, "env_offset", None) for e in envs]
        self.offset_seeding = all(o is not None for o in offsets)
        if self.offset_seeding:
            want = [int(offsets[0]) + sum(sizes[:g]) for g in range(len(envs))]
            if [int(o) for o in offsets] != want:
                raise ValueError(f"PipelinedEnv: sub-env env_offsets {offsets} must be consecutive for sizes "
                                 f"{sizes} (expected {want}): each sub-env holds the next block of global envs")
        self.envs = envs
        self.num_envs = sum(sizes)
        for name in _SHARED:
            setattr(self, name, getattr(first, name))
        self.device = devs[0]
        self.group_size = gs[0]
        self.env_offset = int(offsets[0]) if self.offset_seeding else 0
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        self.slices = [slice(bounds[g], bounds[g + 1]) for g in range(len(envs))]
        self._pool = (ThreadPoolExecutor(max_workers=len(envs), thread_name_prefix="flowrl-env")
                      if threaded and not all(_native_async(e) for e in envs) else None)
        self._futures: list[Future | None] = [None] * len(envs)
        self._in_flight = [False] * len(envs)

    # ------------------------------------------------------------------ episodes
    def reset(self, seed: int | None = None) -> EnvObs:
        self._drain()
        if seed is None or self.offset_seeding:
            return cat_obs([e.reset(seed) for e in self.envs])
        return cat_obs([e.reset(seed + _SEED_STRIDE * g) for g, e in enumerate(self.envs)])

    def state_dict(self) -> dict[str, Any]:
        """Every sub-env's state (for trainer checkpoints)."""
        return {"pipelined": [e.state_dict() for e in self.envs]}  # type: ignore[attr-defined]

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        parts = sd.get("pipelined") if isinstance(sd, dict) else None
        if parts is None or len(parts) != len(self.envs):
            got = "a single env's state" if parts is None else f"{len(parts)} groups"
            raise ValueError(f"PipelinedEnv.load_state_dict: the state holds {got}, this env has "
                             f"{len(self.envs)} groups (resume with the same env.pipeline_groups)")
        self._drain()
        for e, p in zip(self.envs, parts):
            e.load_state_dict(p)  # type: ignore[attr-defined]

    def close(self) -> None:
        try:
            self._drain()
        finally:
            for e in self.envs:
                e.close()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # ------------------------------------------------------------------ stepping one group
    def _start(self, g: int, actions: torch.Tensor) -> None:
        """Start group ``g``'s step with its actions ``(B_g, H, A)``."""
        env = self.envs[g]
        if self._in_flight[g]:
            raise RuntimeError(f"PipelinedEnv: group {g} already has a step in flight")
        if self._pool is not None and not _native_async(env):
            event = None
            if isinstance(actions, torch.Tensor) and actions.is_cuda and torch.device(env.device).type == "cpu":
                # hand the copy to the host over without waiting for it here: the thread waits
                actions = actions.detach().to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._futures[g] = self._pool.submit(_threaded_step, env, actions, event)
        else:
            env.step_async(actions)
        self._in_flight[g] = True

    def _wait(self, g: int) -> ChunkStep:
        if not self._in_flight[g]:
            raise RuntimeError(f"PipelinedEnv: group {g} has no step in flight")
        self._in_flight[g] = False
        fut = self._futures[g]
        if fut is not None:
            self._futures[g] = None
            return fut.result()
        return self.envs[g].step_wait()

    def _drain(self) -> None:
        """Collect (and drop) every step still in flight, e.g. after a rollout stopped early."""
        err: BaseException | None = None
        for g in range(len(self.envs)):
            if self._in_flight[g]:
                try:
                    self._wait(g)
                except BaseException as e:  # collect the others, then re-raise the first
                    err = err or e
        if err is not None:
            raise err

    # ------------------------------------------------------------------ VecEnv stepping
    def _split(self, actions: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(actions, torch.Tensor) or actions.dim() != 3 or actions.shape[0] != self.num_envs:
            got = tuple(actions.shape) if isinstance(actions, torch.Tensor) else type(actions).__name__
            raise ValueError(f"PipelinedEnv.step: actions must have shape (B={self.num_envs}, H, A), got {got}")
        return [actions[s] for s in self.slices]

    def step_async(self, actions: torch.Tensor) -> None:
        parts = self._split(actions)
        self.check_actions(actions)  # the whole chunk before any group starts (global row numbers in the error)
        try:
            for g, a in enumerate(parts):
                self._start(g, a)
        except BaseException:
            self._drain()  # a later group failed to start: collect the earlier ones, leave nothing in flight
            raise

    def step_wait(self) -> ChunkStep:
        if not any(self._in_flight):
            raise RuntimeError("PipelinedEnv.step_wait: no step in flight (call step_async first)")
        steps = []
        try:
            for g in range(len(self.envs)):
                steps.append(self._wait(g))
        finally:
            self._drain()
        return ChunkStep.cat(steps)

    def step(self, actions: torch.Tensor) -> ChunkStep:
        self.step_async(actions)
        return self.step_wait()

    def step_chunks(self, act_fn: ActFn, obs: EnvObs, num_chunks: int
                    ) -> Iterator[tuple[EnvObs, tuple[Any, ...], ChunkStep]]:
        """The rollout loop with the groups interleaved (module docstring); yields as :meth:`VecEnv.step_chunks`.

        ``act_fn`` is called once per group and chunk, on that group's observations, in group
        order; a chunk's yield comes once every group's step of it is collected (the first
        groups' next chunks are already started then). Stopping the iteration early (``break``)
        collects the steps still in flight and drops them.
        """
        G = len(self.envs)
        parts = [obs.index(s) for s in self.slices]
        outs: list[tuple[Any, ...] | None] = [None] * G
        steps: list[ChunkStep | None] = [None] * G
        try:
            for t in range(num_chunks + 1):
                prev, outs = outs, [None] * G
                for g in range(G):
                    if t > 0:  # collect group g's chunk t − 1 ...
                        steps[g] = step_g = self._wait(g)
                        parts[g] = step_g.obs
                        if g == G - 1:  # ... the whole chunk t − 1 is in: hand it out
                            step = ChunkStep.cat(steps)  # type: ignore[arg-type]
                            yield obs, cat_outputs(prev), step  # type: ignore[arg-type]
                            obs = step.obs
                    if t < num_chunks:  # ... and start its chunk t while the other groups step
                        outs[g] = out = act_fn(parts[g])
                        self._start(g, out[0])
        finally:
            self._drain()

    # ------------------------------------------------------------------ forwarding
    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails: forward what every sub-env has (see the class docstring)
        envs = self.__dict__.get("envs")
        if envs is None or name.startswith("_") or not all(hasattr(e, name) for e in envs):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (not every sub-env has it)")
        vals = [getattr(e, name) for e in envs]
        if callable(vals[0]):
            if name not in FORWARDED_METHODS:
                raise AttributeError(f"PipelinedEnv.{name}: methods are forwarded only when they take no env "
                                     f"indices ({', '.join(FORWARDED_METHODS)}); call it on .envs[g] with that "
                                     "sub-env's own indices (global env index = offset of .slices[g] + local)")

            def call(*args: Any, **kwargs: Any) -> Any:
                return _combine(name, [f(*args, **kwargs) for f in vals], envs)

            return call
        return _combine(name, vals, envs)


#: list attributes with one entry per env (concatenated over the groups, never taken as shared)
PER_ENV_LISTS = ("task_of_env", "task_names", "instructions", "num_init_states", "worker_pids")
#: methods forwarded to every sub-env (none takes env indices): results concatenated
FORWARDED_METHODS = ("observe", "expert_actions", "optimal_steps", "set_expert_quality")


def _threaded_step(env: VecEnv, actions: torch.Tensor, event: Any) -> ChunkStep:
    if event is not None:
        event.synchronize()
    return env.step(actions)


def _combine(name: str, vals: list[Any], envs: list[VecEnv]) -> Any:
    """Per-env values (tensors / arrays with a leading ``num_envs`` dim, observations, steps) are
    concatenated; values every sub-env shares are returned as they are."""
    v0 = vals[0]
    if all(v is None for v in vals):
        return None
    if name in PER_ENV_LISTS and all(isinstance(v, (list, tuple)) and len(v) == e.num_envs
                                     for v, e in zip(vals, envs)):
        return [x for v in vals for x in v]
    if isinstance(v0, EnvObs):
        return cat_obs(vals)
    if isinstance(v0, ChunkStep):
        return ChunkStep.cat(vals)
    per_env = all(getattr(v, "shape", ())[:1] == (e.num_envs,) for v, e in zip(vals, envs))
    if isinstance(v0, torch.Tensor) and per_env:
        return torch.cat(vals)
    if type(v0).__module__ == "numpy" and per_env:
        import numpy as np

        return np.concatenate(vals)
    try:
        same = all(torch.equal(v, v0) if isinstance(v0, torch.Tensor) else bool(v == v0) for v in vals)
    except (TypeError, ValueError, RuntimeError):  # arrays of other shapes
        same = False
    if same:
        return v0
    raise AttributeError(f"PipelinedEnv.{name}: the sub-envs hold different values; read it from .envs[g]")
