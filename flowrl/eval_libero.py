"""LIBERO evaluation as the public evaluations do it: every (task, init state) pair run once.

    python -m flowrl.eval --checkpoint runs/x --suite libero_spatial \\
        --videos 3 --video-dir videos --json result.json

Each task of a suite has 50 fixed init states; :func:`evaluate_libero` runs each chosen
``(task, init state)`` pair exactly once, from that init state (by index), batched over the worker
processes of :class:`~flowrl.envs.libero.LiberoEnv`. An episode ends on success or at the suite's
time limit. Result: per-task success rates with Wilson 95% intervals (task name and instruction),
the suite's success rate over all episodes with its interval, and each episode's outcome.

Scheduling: the tasks are taken in groups of at most ``num_envs`` (one LiberoEnv per group, its
workers spread round-robin over the group's tasks); each task's init states form a queue that the
task's workers drain. When a worker finishes an episode it starts the next pair of its task at once
(the init state of every worker's next episode is pinned ahead with ``LiberoEnv.set_next_init``).
An episode cut short by a worker failure (``executed = 0``) is run again, up to ``max_retries``
times, then counted as a failure.

Determinism: given ``seed`` and ``num_envs`` (the initial noise of a chunk is drawn for the whole
batch from one generator seeded with ``seed``; the MuJoCo seed of a pair depends on
``(seed, task, init state)`` only).

Videos: the first ``num_videos`` pairs in (task, init state) order are recorded, one frame at
the start of the episode and one after each chunk, the agent view with the wrist camera beside it
(``video_wrist``), as H.264 mp4 (imageio-ffmpeg, whose wheel ships an ffmpeg binary) named
``{suite}_task{t}_init{i}_{success|fail}.mp4``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowrl.envs.libero import MAX_EPISODE_STEPS, NUM_TASKS, SUITES

__all__ = [
    "NUM_INIT_STATES",
    "check_libero_args",
    "evaluate_libero",
    "format_libero_result",
    "read_video",
    "video_frame",
    "write_video",
]

#: Fixed init states per task in the standard suites.
NUM_INIT_STATES = 50
#: LIBERO's control frequency (Hz): videos play in real time at ``CONTROL_HZ / chunk_steps`` frames/s.
CONTROL_HZ = 20


# ---------------------------------------------------------------------------------- arguments
def check_libero_args(suite: str, task_ids: Sequence[int] | None,
                      init_states: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """Validate and expand the evaluation's (suite, tasks, init states); needs no LIBERO install.

    Args:
        suite: one of :data:`flowrl.envs.libero.SUITES`.
        task_ids: task indices of the suite; ``None``: all of them.
        init_states: a count ``n`` (the first ``n`` init states, ``1 ≤ n ≤ 50``) or explicit indices
            in ``[0, 50)``.

    Returns:
        ``(task_ids, init_states)`` as lists.

    Raises:
        ValueError: naming the bad argument (``suite``, ``task_ids`` or ``init_states``).
    """
    if suite not in SUITES:
        raise ValueError(f"suite: unknown LIBERO suite {suite!r}; expected one of {list(SUITES)}")
    n_tasks = NUM_TASKS[suite]
    if task_ids is None:
        tasks = list(range(n_tasks))
    else:
        tasks = [int(t) for t in task_ids]
        if not tasks:
            raise ValueError("task_ids: empty; give at least one task id (or None for all tasks)")
        bad = [t for t in tasks if not 0 <= t < n_tasks]
        if bad:
            raise ValueError(f"task_ids: {bad} out of range: {suite} has {n_tasks} tasks (ids 0..{n_tasks - 1})")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task_ids: {tasks} has duplicates")
    if isinstance(init_states, int | np.integer):
        n = int(init_states)
        if not 1 <= n <= NUM_INIT_STATES:
            raise ValueError(f"init_states: {n} init states asked for; each LIBERO task has {NUM_INIT_STATES} "
                             f"(give 1..{NUM_INIT_STATES})")
        inits = list(range(n))
    else:
        inits = [int(i) for i in init_states]
        if not inits:
            raise ValueError("init_states: empty")
        if len(inits) > NUM_INIT_STATES:
            raise ValueError(f"init_states: {len(inits)} init states asked for; each LIBERO task has "
                             f"{NUM_INIT_STATES}")
        bad = [i for i in inits if not 0 <= i < NUM_INIT_STATES]
        if bad:
            raise ValueError(f"init_states: indices {bad} out of range [0, {NUM_INIT_STATES})")
        if len(set(inits)) != len(inits):
            raise ValueError(f"init_states: {inits} has duplicates")
    return tasks, inits


# ---------------------------------------------------------------------------------- videos
def _ffmpeg() -> Any:
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise RuntimeError("mp4 videos need imageio-ffmpeg (in the [libero] extra): pip install imageio-ffmpeg "
                           "(its wheel ships an ffmpeg binary; nothing is downloaded at run time)") from e
    return imageio_ffmpeg


def _hwc(frames_u8: np.ndarray, wrist: bool) -> np.ndarray:
    """``(C, S, S, 3)`` uint8 cameras → one ``(S, S or C·S, 3)`` frame (agent view, wrist beside it)."""
    return np.ascontiguousarray(np.concatenate(list(frames_u8), axis=1) if wrist else frames_u8[0])


def video_frame(images: torch.Tensor, wrist: bool = True) -> np.ndarray:
    """One env's cameras ``(C, 3, S, S)`` float in ``[-1, 1]`` → a video frame ``(S, S·C or S, 3)`` uint8.

    Camera 0 (agent view) on the left, the others (wrist) beside it when ``wrist``.
    """
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return _hwc(u8.permute(0, 2, 3, 1).numpy(), wrist)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float) -> None:
    """Write ``frames`` (each ``(h, w, 3)`` uint8, all the same size) as an H.264 / yuv420p mp4.

    Odd sizes are padded by one edge row / column (yuv420p needs even sizes).
    """
    if not frames:
        raise ValueError("write_video: no frames")
    ff = _ffmpeg()
    h, w = frames[0].shape[:2]
    ph, pw = h % 2, w % 2
    writer = ff.write_frames(str(path), (w + pw, h + ph), fps=float(fps), codec="libx264", pix_fmt_out="yuv420p",
                             macro_block_size=2, quality=None, output_params=["-crf", "18"],
                             ffmpeg_log_level="error")
    writer.send(None)  # start ffmpeg
    try:
        for f in frames:
            if f.shape != frames[0].shape or f.dtype != np.uint8:
                raise ValueError(f"write_video: frame {f.shape} {f.dtype}, expected {frames[0].shape} uint8")
            if ph or pw:
                f = np.pad(f, ((0, ph), (0, pw), (0, 0)), mode="edge")
            writer.send(np.ascontiguousarray(f))
    finally:
        writer.close()


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4: ``(frames (T, h, w, 3) uint8, fps)``."""
    ff = _ffmpeg()
    gen = ff.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in gen]
    return (np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8)), float(meta["fps"])


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class _Episode:
    task: int
    init: int
    order: int  # position in the (task, init state) list
    seed: int
    tries: int = 0
    frames: list[np.ndarray] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _episode_seed(seed: int, task: int, init: int) -> int:
    return (seed * 1_000_003 + task * 7_919 + init) % (2**31)


def _check_tokenizer_fits(policy: Any, tokenizer: Any, env_kwargs: dict[str, Any]) -> None:
    """The env's token ids must fit the policy: at most ``max_token_len`` of them, ids below ``vocab_size``."""
    from flowrl.envs.libero import make_tokenizer

    tok = make_tokenizer(tokenizer, **{k: env_kwargs[k] for k in ("vocab_size", "max_token_len") if k in env_kwargs})
    # (a callable is checked only where it says its sizes)
    length, vocab = getattr(tok, "max_token_len", None), getattr(tok, "vocab_size", None)
    pcfg = policy.config
    if length is not None and int(length) > pcfg.max_token_len:
        raise ValueError(f"tokenizer: the LIBERO env's {tokenizer!r} tokenizer gives {length} tokens per instruction, "
                         f"above the policy's max_token_len={pcfg.max_token_len} (evaluate_libero: pass "
                         "env_kwargs={'max_token_len': ...}; or use a policy built for the env, as the trainer builds "
                         "tiny/small policies with the env's sizes)")
    if vocab is not None and int(vocab) > pcfg.vocab_size:
        raise ValueError(f"tokenizer: the LIBERO env's {tokenizer!r} tokenizer has a vocabulary of {vocab}, above the "
                         f"policy's vocab_size={pcfg.vocab_size}")


def _make_env(suite: str, task_ids: list[int], num_envs: int, **kw: Any) -> Any:
    from flowrl.envs.libero import LiberoEnv

    return LiberoEnv(suite, task_ids, num_envs, **kw)


def _run_group(env: Any, queues: dict[int, deque[_Episode]], policy: Any, num_steps: int,
               noise_fn: Callable[[Any, Any, torch.Generator], torch.Tensor] | None, gen: torch.Generator,
               video_wrist: bool, max_retries: int, finish: Callable[[_Episode, bool, int, bool], None],
               say: Callable[[str], None]) -> None:
    """Drain the per-task queues of episodes on one env (its workers are bound to the queues' tasks)."""
    from flowrl.eval import eval_actions

    B = env.num_envs
    task_of = list(env.task_of_env)
    cur: list[_Episode | None] = [queues[task_of[i]].popleft() for i in range(B)]
    nxt: list[_Episode | None] = [None] * B

    def reserve(i: int) -> None:
        """Pin env i's next episode to the next pair of its task (it starts when the current one ends)."""
        q = queues[task_of[i]]
        nxt[i] = q.popleft() if q else None
        if nxt[i] is not None:
            env.set_next_init([i], [nxt[i].init], [nxt[i].seed])

    def start(i: int, obs: Any) -> None:
        ep = cur[i]
        assert ep is not None
        got = getattr(env, "episode_init", None)
        if got is not None and int(got[i]) != ep.init:
            raise RuntimeError(f"evaluate_libero: env {i} started init state {int(got[i])}, expected {ep.init} "
                               f"(task {ep.task})")
        if ep.frames is not None:
            ep.frames = [video_frame(obs.images[i], video_wrist)]

    first = [e for e in cur if e is not None]
    obs = env.reset_to([e.init for e in first], seeds=[e.seed for e in first])
    for i in range(B):
        start(i, obs)
        reserve(i)
    while any(e is not None for e in cur):
        step = env.step(eval_actions(policy, obs, gen, num_steps, noise_fn))
        obs = step.obs
        done = step.done.cpu().tolist()
        succ = step.success.cpu().tolist()
        executed = step.executed.cpu().tolist()
        length = step.episode_length.cpu().tolist()
        final = getattr(env, "final_images", None)
        for i in range(B):
            ep = cur[i]
            if ep is None:
                continue  # an idle worker: its episode is not counted
            if not done[i]:
                if ep.frames is not None:
                    ep.frames.append(video_frame(obs.images[i], video_wrist))
                continue
            failed = int(executed[i]) == 0  # the worker died or hung: the episode was cut short
            if failed and ep.tries < max_retries:
                ep.tries += 1
                say(f"[flowrl.eval] task {ep.task} init {ep.init}: worker failure, running it again")
                ep.frames = [] if ep.frames is not None else None
                queues[ep.task].appendleft(ep)
            else:
                if ep.frames is not None and final is not None and not failed:  # obs is the next episode's:
                    ep.frames.append(_hwc(np.asarray(final[i]), video_wrist))  # the env kept the last frame
                finish(ep, bool(succ[i]) and not failed, int(length[i]), failed)
            cur[i], nxt[i] = nxt[i], None  # the env already runs its pinned next episode (if any)
            if cur[i] is not None:
                start(i, obs)
                reserve(i)
        # a rerun waiting while its task's workers are idle: start it now
        idle = [i for i in range(B) if cur[i] is None and queues[task_of[i]]]
        if idle:
            eps = [queues[task_of[i]].popleft() for i in idle]
            for i, e in zip(idle, eps):
                cur[i] = e
            obs = env.reset_to([e.init for e in eps], env_ids=idle, seeds=[e.seed for e in eps])
            for i in idle:
                start(i, obs)
                reserve(i)


@torch.no_grad()
def evaluate_libero(
    policy: Any,
    suite: str = "libero_spatial",
    task_ids: Sequence[int] | None = None,
    init_states: int | Sequence[int] = NUM_INIT_STATES,
    *,
    num_envs: int = 8,
    num_steps: int = 10,
    seed: int = 0,
    noise_fn: Callable[[Any, Any, torch.Generator], torch.Tensor] | None = None,
    video_dir: str | Path | None = None,
    num_videos: int = 0,
    video_wrist: bool = True,
    video_fps: float | None = None,
    image_size: int | None = None,
    fast_render: bool = False,
    flip: str = "vertical",
    chunk_steps: int = 5,
    max_episode_steps: int | None = None,
    settle_steps: int = 10,
    tokenizer: Any = "word",
    max_retries: int = 2,
    env_kwargs: dict[str, Any] | None = None,
    env_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Success rates of ``policy`` on a LIBERO suite: every ``(task, init state)`` pair run once.

    Args:
        policy: a π0-family policy (:class:`flowrl.models.Pi0Policy`) taking 2 cameras of
            ``image_size``² and the env's tokens; sampled with ``num_steps`` ODE steps (fresh initial
            noise per chunk).
        suite: ``libero_spatial | libero_object | libero_goal | libero_10 | libero_90``.
        task_ids: tasks of the suite; ``None``: all of them.
        init_states: a count (the first ``n`` of the 50 fixed init states) or explicit indices.
        num_envs: worker processes (= parallel episodes).
        num_steps: denoising steps K.
        seed: the evaluation's seed (initial noise, MuJoCo seeds).
        noise_fn: ``noise_fn(policy, obs, generator) → (B, H, D)`` initial latents (VLA-FPO's
            ``eval_noise``); default ``N(0, I)``.
        video_dir, num_videos: write mp4s of the first ``num_videos`` pairs (task-major order) there.
        video_wrist: put the wrist camera beside the agent view (frames ``(S, 2S, 3)``, else ``(S, S, 3)``).
        video_fps: frames per second (default ``20 / chunk_steps``: real time, one frame per chunk).
        image_size: camera resolution S (default: the policy's ``config.image_size``).
        fast_render, flip, chunk_steps, settle_steps, tokenizer: as :class:`~flowrl.envs.libero.LiberoEnv`.
        max_episode_steps: time limit in policy steps; ``None``: the suite's standard one.
        max_retries: reruns of an episode cut short by a worker failure before it counts as a failure.
        env_kwargs: more keyword arguments for :class:`~flowrl.envs.libero.LiberoEnv` (timeouts,
            ``gl_backend``, ``vocab_size``, ...).
        env_factory: ``(suite, task_ids, num_envs, **kw) → env`` (default: ``LiberoEnv``; for tests).
        log: called with progress lines (a task finished, a video written).

    Returns:
        ``{"suite", "episodes", "successes", "success_rate", "ci_low", "ci_high", "tasks": [per task:
        {"task_id", "name", "instruction", "episodes", "successes", "success_rate", "ci_low", "ci_high",
        "mean_length"}], "episode_results": [per pair: {"task_id", "init_state", "success", "length",
        "worker_failure", "video"}], "videos": [paths], "config": {...}, "wall_s"}``. Rates are over the
        episodes run; ``length`` is in policy steps.

    Raises:
        ValueError: a bad ``suite``, ``task_ids``, ``init_states``, ``num_envs``, ``num_steps``,
            ``num_videos`` / ``video_dir`` or ``image_size`` (the message names it).
    """
    from flowrl.eval import wilson_interval

    tasks, inits = check_libero_args(suite, task_ids, init_states)
    if num_envs < 1:
        raise ValueError(f"num_envs: must be >= 1, got {num_envs}")
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if num_videos < 0:
        raise ValueError(f"num_videos: must be >= 0, got {num_videos}")
    if max_retries < 0:
        raise ValueError(f"max_retries: must be >= 0, got {max_retries}")
    if num_videos and video_dir is None:
        raise ValueError(f"video_dir: needed to write num_videos={num_videos} videos")
    pcfg = policy.config
    image_size = int(image_size or pcfg.image_size)
    if image_size != pcfg.image_size:
        raise ValueError(f"image_size: {image_size} differs from the policy's image_size {pcfg.image_size}")
    if chunk_steps > pcfg.action_horizon:
        raise ValueError(f"chunk_steps: {chunk_steps} > the policy's action_horizon {pcfg.action_horizon}")
    if env_factory is None:  # LiberoEnv's tokenizer against the policy, before any worker starts
        _check_tokenizer_fits(policy, tokenizer, env_kwargs or {})
    out_dir: Path | None = None
    if video_dir is not None and num_videos:
        _ffmpeg()  # fail before any episode runs
        out_dir = Path(video_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    fps = float(video_fps or CONTROL_HZ / chunk_steps)
    say = log or (lambda _msg: None)
    factory = env_factory or _make_env
    env_kw = {"chunk_steps": chunk_steps, "image_size": image_size, "max_episode_steps": max_episode_steps,
              "settle_steps": settle_steps, "fast_render": fast_render, "flip": flip, "tokenizer": tokenizer,
              "seed": seed, **(env_kwargs or {})}

    t0 = time.perf_counter()
    episodes = [_Episode(t, i, n, _episode_seed(seed, t, i)) for n, (t, i) in
                enumerate((t, i) for t in tasks for i in inits)]
    for ep in episodes[:num_videos if out_dir is not None else 0]:
        ep.frames = []
    info: dict[int, tuple[str, str]] = {}  # task → (name, instruction)
    videos: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    left = {t: len(inits) for t in tasks}
    max_steps_used = None

    def finish(ep: _Episode, success: bool, length: int, failure: bool) -> None:
        ep.result = {"task_id": ep.task, "init_state": ep.init, "success": bool(success), "length": int(length),
                     "worker_failure": bool(failure), "video": None}
        if ep.frames is not None and out_dir is not None:
            path = out_dir / f"{suite}_task{ep.task}_init{ep.init}_{'success' if success else 'fail'}.mp4"
            write_video(path, ep.frames, fps)
            ep.result["video"] = str(path)
            videos.append(str(path))
            ep.frames = None
            say(f"[flowrl.eval] video {path}")
        left[ep.task] -= 1
        if left[ep.task] == 0:
            done_t = [e.result["success"] for e in episodes if e.task == ep.task]
            say(f"[flowrl.eval] {suite} task {ep.task}: {sum(done_t)}/{len(done_t)} "
                f"({time.perf_counter() - t0:.0f} s)")

    for g0 in range(0, len(tasks), num_envs):
        group = tasks[g0 : g0 + num_envs]
        queues = {t: deque(e for e in episodes if e.task == t) for t in group}
        # every env gets a first episode: round-robin over the group, at most len(inits) envs per task
        env = factory(suite, list(group), min(num_envs, len(group) * len(inits)), **env_kw)
        try:
            max_steps_used = int(env.max_episode_steps)
            names = getattr(env, "task_names", None)
            for i, t in enumerate(env.task_of_env):
                info.setdefault(t, (str(names[i]) if names else "", str(env.instructions[i])))
            _run_group(env, queues, policy, num_steps, noise_fn, gen, video_wrist, max_retries, finish, say)
        finally:
            env.close()

    # ------------------------------------------------------------------ summary
    per_task = []
    for t in tasks:
        res = [e.result for e in episodes if e.task == t]
        k = sum(r["success"] for r in res)
        lo, hi = wilson_interval(k, len(res))
        name, instr = info.get(t, ("", ""))
        per_task.append({"task_id": t, "name": name, "instruction": instr, "episodes": len(res), "successes": k,
                         "success_rate": k / len(res), "ci_low": lo, "ci_high": hi,
                         "mean_length": sum(r["length"] for r in res) / len(res)})
    k = sum(e.result["success"] for e in episodes)
    n = len(episodes)
    lo, hi = wilson_interval(k, n)
    return {
        "suite": suite, "episodes": n, "successes": k, "success_rate": k / n, "ci_low": lo, "ci_high": hi,
        "tasks": per_task,
        "episode_results": [e.result for e in episodes],
        "videos": videos,
        "config": {"task_ids": tasks, "init_states": inits, "num_envs": num_envs, "num_steps": num_steps,
                   "seed": seed, "chunk_steps": chunk_steps, "image_size": image_size,
                   "max_episode_steps": max_steps_used or max_episode_steps or MAX_EPISODE_STEPS[suite],
                   "fast_render": fast_render, "flip": flip, "noise": "custom" if noise_fn is not None else "N(0, I)"},
        "wall_s": time.perf_counter() - t0,
    }


def format_libero_result(r: dict[str, Any]) -> str:
    """A per-task table and the suite's line, for printing."""
    rows = [f"{'task':>4}  {'success':>7}  {'95% CI':>11}  {'episodes':>8}  {'mean len':>8}  instruction"]
    for t in r["tasks"]:
        rows.append(f"{t['task_id']:>4}  {t['success_rate']:>7.3f}  {t['ci_low']:.3f}-{t['ci_high']:.3f}  "
                    f"{t['episodes']:>8}  {t['mean_length']:>8.1f}  {t['instruction']}")
    c = r["config"]
    rows.append(f"{r['suite']}: success {r['success_rate']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}) over "
                f"{r['episodes']} episodes ({len(c['task_ids'])} tasks x {len(c['init_states'])} init states), "
                f"K={c['num_steps']}, seed {c['seed']}, {r['wall_s']:.0f} s")
    return "\n".join(rows)
