"""The subprocess side of :class:`flowrl.envs.libero.LiberoEnv`: one LIBERO scene per process.

Runs in a process started with the ``spawn`` (or ``forkserver``) context. The GL backend
(``MUJOCO_GL`` / ``PYOPENGL_PLATFORM``) is set from the spec *before* robosuite / mujoco are
imported. Talks to the parent over a pipe with small tuples:

- parent → worker: ``("reset", init_index, seed, settle_steps)``, ``("step", actions (n, 7) float32)``,
  ``("ping",)``, ``("close",)``.
- worker → parent: ``("ok", payload)`` or ``("error", traceback text)``. The first message after
  start is ``("ready", info)`` (or ``("error", ...)`` when the scene cannot be built).

Observations sent back are uint8 images already turned upright, so the pipe carries
``2·S·S·3`` bytes per env and chunk.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from typing import Any

import numpy as np

SETTLE_ACTION = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0], dtype=np.float64)
CAMERAS = ("agentview", "robot0_eye_in_hand")


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) of a robosuite ``(x, y, z, w)`` quaternion, as openpi / lerobot compute it."""
    q = np.asarray(quat, dtype=np.float64).copy()
    q[3] = min(max(q[3], -1.0), 1.0)
    den = math.sqrt(1.0 - q[3] * q[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (q[:3] * 2.0 * math.acos(q[3])) / den


def _set_gl_env(backend: str) -> None:
    os.environ["MUJOCO_GL"] = backend
    if backend == "osmesa":
        os.environ["PYOPENGL_PLATFORM"] = "osmesa"
    elif backend == "egl":
        os.environ["PYOPENGL_PLATFORM"] = "egl"


class _Scene:
    """One LIBERO task scene with its init states."""

    def __init__(self, spec: dict[str, Any]) -> None:
        _set_gl_env(spec["gl_backend"])
        import logging

        logging.getLogger("robosuite").setLevel(logging.ERROR)
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        suite = benchmark.get_benchmark_dict()[spec["suite"]]()
        task = suite.get_task(spec["task_id"])
        self.instruction = str(task.language)
        self.init_states = np.asarray(suite.get_task_init_states(spec["task_id"]))
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        S = int(spec["image_size"])
        self.size = S
        self.flip = spec["flip"]
        self.fast_render = bool(spec["fast_render"])
        # Cameras are rendered by hand once per chunk (not by robosuite at every step):
        # use_camera_obs=False keeps the offscreen context but skips the per-step renders.
        self.env = OffScreenRenderEnv(
            bddl_file_name=bddl,
            camera_heights=S,
            camera_widths=S,
            use_camera_obs=False,
            hard_reset=bool(spec["hard_reset"]),
            horizon=100_000,
            ignore_done=True,
        )
        self._ctx_id = None
        self._configure_renderer()

    def _configure_renderer(self) -> None:
        """Apply the fast-render settings to the (possibly new) offscreen context."""
        sim = self.env.env.sim
        ctx = sim._render_context_offscreen
        if ctx is None or id(ctx) == self._ctx_id:
            return
        self._ctx_id = id(ctx)
        if not self.fast_render:
            return
        import mujoco

        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        if sim.model._model.vis.quality.offsamples != 0:  # no multisampling: rebuild the buffers
            sim.model._model.vis.quality.offsamples = 0
            ctx.gl_ctx.make_current()
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()

    def render(self) -> np.ndarray:
        """``(2, S, S, 3)`` uint8, agent view then wrist, upright."""
        sim = self.env.env.sim
        S = self.size
        out = np.empty((len(CAMERAS), S, S, 3), dtype=np.uint8)
        for c, cam in enumerate(CAMERAS):
            img = sim.render(camera_name=cam, width=S, height=S)  # OpenGL: bottom row first
            out[c] = img[::-1, ::-1] if self.flip == "rotate180" else img[::-1]
        return out

    def state(self) -> np.ndarray:
        """End-effector position (3), axis-angle (3), gripper joints (2): float32 (8,)."""
        env = self.env.env
        obs = env._get_observations(force_update=False)
        pos = obs["robot0_eef_pos"]
        quat = obs["robot0_eef_quat"]
        grip = obs["robot0_gripper_qpos"]
        return np.concatenate([pos, quat2axisangle(quat), grip]).astype(np.float32)

    def observe(self) -> dict[str, Any]:
        return {"images": self.render(), "state": self.state()}

    def reset(self, init_index: int, seed: int, settle: int) -> dict[str, Any]:
        self.env.seed(int(seed) % (2**31))
        self.env.reset()
        self._configure_renderer()
        self.env.set_init_state(self.init_states[init_index % len(self.init_states)])
        # robosuite keeps each gripper's last command in Python; neither reset() without hard_reset nor
        # set_init_state clears it, so the settle steps (and the episode) depended on the previous episode
        for robot in self.env.env.robots:
            robot.gripper.current_action = np.zeros(robot.gripper.dof)
        success = False
        for _ in range(settle):
            _, _, done, _ = self.env.step(SETTLE_ACTION)
            success = success or bool(done)
        out = self.observe()
        out["success"] = success
        return out

    def step(self, actions: np.ndarray) -> dict[str, Any]:
        """Execute the actions in order, stopping after the first one that succeeds."""
        executed, success = 0, False
        for a in np.asarray(actions, dtype=np.float64):
            _, _, done, _ = self.env.step(a)
            executed += 1
            if done:  # LIBERO's done is its success predicate
                success = True
                break
        out = self.observe()
        out["executed"] = executed
        out["success"] = success
        return out

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:
            pass


def worker_main(conn: Any, spec: dict[str, Any]) -> None:
    """Entry point of a worker process (see the module docstring)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes the workers
    try:
        t0 = time.perf_counter()
        scene = _Scene(spec)
        conn.send(("ready", {"instruction": scene.instruction, "num_init_states": len(scene.init_states),
                             "pid": os.getpid(), "build_s": time.perf_counter() - t0}))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            conn.close()
        return
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            cmd = msg[0]
            if cmd == "close":
                break
            try:
                if cmd == "reset":
                    out = scene.reset(msg[1], msg[2], msg[3])
                elif cmd == "step":
                    out = scene.step(msg[1])
                elif cmd == "ping":
                    out = {"pid": os.getpid()}
                elif cmd == "hang":  # test hook: stop answering
                    time.sleep(float(msg[1]))
                    continue
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", out))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except KeyboardInterrupt:
        pass
    finally:
        scene.close()
        try:
            conn.close()
        except Exception:
            pass
