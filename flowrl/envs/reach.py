"""The built-in task: language-conditioned reaching from pixels, batched in torch.

An agent (a white dot) moves in the square ``[-1, 1]²`` among ``num_targets`` coloured squares
(red, green, blue, yellow). The instruction names one colour ("go to the red square"); the
episode succeeds (reward 1, then it ends) when the agent is within ``success_radius`` of that
target. Actions are 2-D displacements in ``[-1, 1]`` scaled by ``max_speed`` per step. The
policy sees a rendered RGB top view (``image_size²``), the tokenized instruction and the agent's
position (optionally also the targets' positions: the easy variant).

Every env is seeded from ``(seed, global env index, episode number)`` (global index =
``env_offset`` + index), so a run is reproducible on any device and batch split: envs
``[k, k + n)`` of a ReachEnv equal a ReachEnv of ``n`` envs built with ``env_offset=k``.

A scripted expert with a controllable quality produces demonstrations for SFT and offline RL:
with probability ``1 − quality`` an episode's expert heads for a wrong target, and its actions
carry Gaussian noise of scale ``noise·(1 − quality)``; with ``aim_noise`` > 0 it aims, for the
whole episode, at a point offset from its target by a Gaussian of that standard deviation per
axis (an imprecise expert: some demonstrations miss, graded by how far they miss).
"""

from __future__ import annotations

import math
import operator

import torch

from flowrl.envs.base import ChunkStep, EnvObs, VecEnv

__all__ = ["COLORS", "VOCAB", "ReachEnv", "tokenize"]

COLORS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
_PHRASES = ("go to the {} square", "move to the {} square", "reach the {} square", "touch the {} square")
VOCAB = ("<pad>", "go", "to", "the", "move", "reach", "touch", "square", *COLORS)
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(instructions: list[str], max_len: int = 8, device: torch.device | str = "cpu") -> tuple:
    """Word-level tokenizer of the task's instructions.

    Returns:
        ``tokens (B, max_len)`` int64 (0 = padding) and ``masks (B, max_len)`` bool.
    """
    tokens = torch.zeros(len(instructions), max_len, dtype=torch.int64)
    for i, text in enumerate(instructions):
        words = text.lower().split()
        if len(words) > max_len:
            raise ValueError(f"tokenize: instruction {text!r} has {len(words)} words, more than max_len={max_len}")
        for j, w in enumerate(words):
            if w not in _WORD_ID:
                raise ValueError(f"tokenize: unknown word {w!r} in {text!r}; vocabulary: {VOCAB}")
            tokens[i, j] = _WORD_ID[w]
    tokens = tokens.to(device)
    return tokens, tokens != 0


class ReachEnv(VecEnv):
    """``num_envs`` reaching episodes stepped together (see the module docstring).

    Args:
        num_envs: batch of parallel episodes.
        num_targets: coloured squares per scene (1 … 4); the instruction names one of them.
        image_size: rendered view side in pixels.
        chunk_steps: H', actions executed per chunk step.
        max_episode_steps: time limit in single steps.
        success_radius, max_speed: in arena units (the arena is ``[-1, 1]²``).
        state_with_targets: append the targets' positions (in colour order) to the state: the
            policy still has to read the instruction to know which one is the goal.
        state_with_goal: also append the goal's one-hot (the trivially easy variant).
        state_with_time: also append the fraction of the time limit left, ``1 − t/max_episode_steps``
            (makes the value of a state predictable under a tight time limit).
        group_size: consecutive envs that start each reset from the same scene (GRPO groups).
        env_offset: global index of env 0 (a multiple of ``group_size``): this env runs the
            episodes of envs ``[env_offset, env_offset + num_envs)`` of a larger one.
        device: where the batch lives.
    """

    def __init__(
        self,
        num_envs: int,
        *,
        num_targets: int = 3,
        image_size: int = 32,
        chunk_steps: int = 5,
        max_episode_steps: int = 40,
        success_radius: float = 0.15,
        max_speed: float = 0.1,
        state_with_targets: bool = False,
        state_with_goal: bool = False,
        state_with_time: bool = False,
        group_size: int = 1,
        env_offset: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, val in (("num_envs", num_envs), ("num_targets", num_targets), ("image_size", image_size),
                          ("chunk_steps", chunk_steps), ("max_episode_steps", max_episode_steps),
                          ("group_size", group_size), ("env_offset", env_offset)):
            _check_int(name, val)
        for name, val in (("success_radius", success_radius), ("max_speed", max_speed)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 < val < math.inf):
                raise ValueError(f"ReachEnv: {name} must be a finite float > 0, got {val!r}")
        if num_envs < 1:
            raise ValueError(f"ReachEnv: num_envs must be >= 1, got {num_envs}")
        if not 1 <= num_targets <= len(COLORS):
            raise ValueError(f"ReachEnv: num_targets must be in [1, {len(COLORS)}], got {num_targets}")
        if image_size < 8:
            raise ValueError(f"ReachEnv: image_size must be >= 8, got {image_size}")
        if chunk_steps < 1 or max_episode_steps < chunk_steps:
            raise ValueError(f"ReachEnv: need 1 <= chunk_steps <= max_episode_steps, got {chunk_steps}, "
                             f"{max_episode_steps}")
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"ReachEnv: group_size={group_size} must be >= 1 and divide num_envs={num_envs}")
        if env_offset < 0 or env_offset % group_size:
            raise ValueError(f"ReachEnv: env_offset={env_offset} must be >= 0 and a multiple of "
                             f"group_size={group_size}")
        self.num_envs = num_envs
        self.num_targets = num_targets
        self.image_size = image_size
        self.chunk_steps = chunk_steps
        self.max_episode_steps = max_episode_steps
        self.success_radius = success_radius
        self.max_speed = max_speed
        self.state_with_targets = state_with_targets
        self.group_size = group_size
        self.env_offset = int(env_offset)
        self.device = torch.device(device)
        self.action_dim = 2
        self.state_with_goal = state_with_goal
        self.state_with_time = state_with_time
        self.state_dim = (2 + (2 * num_targets if state_with_targets else 0) + (num_targets if state_with_goal else 0)
                          + int(state_with_time))
        self.num_cameras = 1
        self.vocab_size = len(VOCAB)
        self.max_token_len = 8
        B = num_envs
        dev = self.device
        self.pos = torch.zeros(B, 2, device=dev)
        self.targets = torch.zeros(B, num_targets, 2, device=dev)
        self.goal = torch.zeros(B, dtype=torch.int64, device=dev)
        self.expert_target = torch.zeros(B, dtype=torch.int64, device=dev)
        self.phrase = torch.zeros(B, dtype=torch.int64, device=dev)
        self.t = torch.zeros(B, dtype=torch.int64, device=dev)
        self.ret = torch.zeros(B, device=dev)
        self.episode = torch.zeros(B, dtype=torch.int64)
        self.seed = 0
        self.expert_quality = 1.0
        self.expert_speed = 1.0
        self.expert_aim_noise = 0.0
        self.expert_offset = torch.zeros(B, 2, device=dev)
        self._color_names = list(COLORS)[:num_targets]
        self._colors = torch.tensor([COLORS[c] for c in self._color_names], device=dev)  # (T, 3)
        self._instr_tokens = torch.zeros(B, self.max_token_len, dtype=torch.int64, device=dev)
        self._instructions = [""] * B
        self._started = False

    # ------------------------------------------------------------------ episodes
    def set_expert_quality(self, quality: float, speed: float | None = None, aim_noise: float | None = None) -> None:
        """Quality in [0, 1] of the demonstrations of episodes started from now on, and
        optionally the expert's speed in (0, 1] (a fraction of ``max_speed``: a slow expert) and
        its aim noise >= 0 (standard deviation per axis, arena units, of a per-episode offset of
        the point it heads for)."""
        if not 0.0 <= quality <= 1.0:
            raise ValueError(f"ReachEnv: expert quality must be in [0, 1], got {quality}")
        if speed is not None and not 0.0 < speed <= 1.0:
            raise ValueError(f"ReachEnv: expert speed must be in (0, 1], got {speed}")
        if aim_noise is not None and not aim_noise >= 0.0:
            raise ValueError(f"ReachEnv: expert aim_noise must be >= 0, got {aim_noise}")
        self.expert_quality = float(quality)
        if speed is not None:
            self.expert_speed = float(speed)
        if aim_noise is not None:
            self.expert_aim_noise = float(aim_noise)

    def _init_episodes(self, ids: torch.Tensor) -> None:
        T = self.num_targets
        for i in ids.tolist():
            scene = (self.env_offset + i) // self.group_size
            # folded into manual_seed's signed 64-bit range (large seeds, e.g. a timestamp, overflowed it)
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + scene) * 65_537 + int(self.episode[i]))
                                              % (2**63 - 1))
            for _ in range(100):  # targets apart by at least 3 success radii
                tg = torch.rand(T, 2, generator=g) * 1.6 - 0.8
                if T == 1 or torch.pdist(tg).min() > 3 * self.success_radius:
                    break
            start = torch.rand(2, generator=g) * 1.8 - 0.9
            goal = int(torch.randint(T, (1,), generator=g))
            wrong = float(torch.rand(1, generator=g)) > self.expert_quality and T > 1
            other = (goal + 1 + int(torch.randint(max(T - 1, 1), (1,), generator=g))) % T
            phrase = int(torch.randint(len(_PHRASES), (1,), generator=g))
            offset = torch.randn(2, generator=g) * self.expert_aim_noise  # drawn last: other draws unchanged
            self.targets[i] = tg.to(self.device)
            self.pos[i] = start.to(self.device)
            self.goal[i] = goal
            self.expert_target[i] = other if wrong else goal
            self.phrase[i] = phrase
            self.expert_offset[i] = offset.to(self.device)
            self._instructions[i] = _PHRASES[phrase].format(self._color_names[goal])
            self.episode[i] += 1
        tok, _ = tokenize([self._instructions[i] for i in ids.tolist()], self.max_token_len, self.device)
        self._instr_tokens[ids.to(self.device)] = tok
        self.t[ids.to(self.device)] = 0
        self.ret[ids.to(self.device)] = 0.0

    def reset(self, seed: int | None = None) -> EnvObs:
        if seed is not None:
            self.seed = _check_int("seed", seed)
        self.episode.zero_()
        self._init_episodes(torch.arange(self.num_envs))
        self._started = True
        return self.observe()

    def _settings(self) -> dict:
        """The constructor settings a saved state is only valid for."""
        return {
            "num_targets": self.num_targets, "image_size": self.image_size, "chunk_steps": self.chunk_steps,
            "max_episode_steps": self.max_episode_steps, "success_radius": self.success_radius,
            "max_speed": self.max_speed, "state_with_targets": self.state_with_targets,
            "state_with_goal": self.state_with_goal, "state_with_time": self.state_with_time,
            "group_size": self.group_size, "env_offset": self.env_offset,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue these episodes exactly (for checkpoints)."""
        return {
            "settings": self._settings(),
            "pos": self.pos.cpu().clone(), "targets": self.targets.cpu().clone(), "goal": self.goal.cpu().clone(),
            "expert_target": self.expert_target.cpu().clone(), "phrase": self.phrase.cpu().clone(),
            "t": self.t.cpu().clone(), "ret": self.ret.cpu().clone(), "episode": self.episode.clone(),
            "seed": self.seed, "expert_quality": self.expert_quality,
            "expert_speed": self.expert_speed, "expert_aim_noise": self.expert_aim_noise,
            "expert_offset": self.expert_offset.cpu().clone(), "instructions": list(self._instructions),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue the episodes saved by :meth:`state_dict`.

        Raises:
            ValueError: the state was saved by an env with other settings (batch, targets, time
                limit, speed, state layout, …): its episodes would continue under other rules.
        """
        if sd["pos"].shape != self.pos.shape or sd["targets"].shape != self.targets.shape:
            raise ValueError(f"ReachEnv.load_state_dict: state for {tuple(sd['targets'].shape)} targets does not fit "
                             f"this env {tuple(self.targets.shape)}")
        saved = sd.get("settings")  # states saved before settings were recorded carry none
        if saved is not None:
            mine = self._settings()
            diff = [f"{k}: saved {saved.get(k)!r}, this env {v!r}" for k, v in mine.items() if saved.get(k) != v]
            if diff:
                raise ValueError("ReachEnv.load_state_dict: the state was saved by an env with other settings ("
                                 + "; ".join(diff) + "); build the env with the saved settings to continue it")
        for k in ("pos", "targets", "goal", "expert_target", "phrase", "t", "ret"):
            setattr(self, k, sd[k].to(self.device).clone())
        self.episode = sd["episode"].clone()
        self.seed, self.expert_quality = int(sd["seed"]), float(sd["expert_quality"])
        self.expert_speed = float(sd.get("expert_speed", 1.0))
        self.expert_aim_noise = float(sd.get("expert_aim_noise", 0.0))
        self.expert_offset = sd.get("expert_offset", torch.zeros(self.num_envs, 2)).to(self.device).clone()
        self._instructions = list(sd["instructions"])
        self._instr_tokens = tokenize(self._instructions, self.max_token_len, self.device)[0]
        self._started = True

    # ------------------------------------------------------------------ observation
    def render(self) -> torch.Tensor:
        """Top view ``(B, 3, S, S)`` float32 in [0, 1]; row 0 is the top (y = +1)."""
        S = self.image_size
        dev = self.device
        coords = (torch.arange(S, device=dev, dtype=torch.float32) + 0.5) / S * 2 - 1  # pixel centres
        xs = coords[None, None, :]  # (1, 1, S) x grows to the right
        ys = coords.flip(0)[None, :, None]  # (1, S, 1) y grows upwards
        img = torch.full((self.num_envs, 3, S, S), 0.12, device=dev)
        half = max(self.success_radius * 0.6, 1.5 / S)
        for j in range(self.num_targets):
            c = self.targets[:, j]  # (B, 2)
            inside = ((xs - c[:, 0, None, None]).abs() <= half) & ((ys - c[:, 1, None, None]).abs() <= half)
            img = torch.where(inside[:, None], self._colors[j][None, :, None, None], img)
        r = max(0.06, 1.5 / S)
        d2 = (xs - self.pos[:, 0, None, None]) ** 2 + (ys - self.pos[:, 1, None, None]) ** 2
        img = torch.where((d2 <= r * r)[:, None], torch.ones((), device=dev), img)
        return img

    def observe(self) -> EnvObs:
        if not self._started:
            raise RuntimeError("ReachEnv: call reset() before observe()/step()")
        images = (self.render() * 2 - 1)[:, None]  # (B, 1, 3, S, S) in [-1, 1]
        state = self.pos.clone()
        if self.state_with_targets:
            state = torch.cat([state, self.targets.flatten(1)], dim=1)
        if self.state_with_goal:
            state = torch.cat([state, torch.nn.functional.one_hot(self.goal, self.num_targets).float()], dim=1)
        if self.state_with_time:
            state = torch.cat([state, (1.0 - self.t.float() / self.max_episode_steps)[:, None]], dim=1)
        tokens = self._instr_tokens.clone()
        return EnvObs(images, torch.ones(self.num_envs, 1, dtype=torch.bool, device=self.device), tokens,
                      tokens != 0, state, list(self._instructions))

    # ------------------------------------------------------------------ dynamics
    def _goal_pos(self, which: torch.Tensor) -> torch.Tensor:
        return self.targets.gather(1, which[:, None, None].expand(-1, 1, 2))[:, 0]

    def step(self, actions: torch.Tensor) -> ChunkStep:
        if not self._started:
            raise RuntimeError("ReachEnv: call reset() before step()")
        a = self.check_actions(actions).clamp(-1.0, 1.0)
        B, dev = self.num_envs, self.device
        goal = self._goal_pos(self.goal)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        success = torch.zeros(B, dtype=torch.bool, device=dev)
        executed = torch.zeros(B, dtype=torch.int64, device=dev)
        reward = torch.zeros(B, device=dev)
        for h in range(self.chunk_steps):
            step_ok = active & (self.t < self.max_episode_steps)
            self.pos = torch.where(step_ok[:, None], (self.pos + self.max_speed * a[:, h]).clamp(-1, 1), self.pos)
            self.t += step_ok.long()
            executed += step_ok.long()
            hit = step_ok & ((self.pos - goal).norm(dim=1) <= self.success_radius)
            reward += hit.float()
            success |= hit
            active = step_ok & ~hit
        self.ret += reward
        truncated = ~success & (self.t >= self.max_episode_steps)
        done = success | truncated
        ep_ret = torch.where(done, self.ret, torch.zeros_like(self.ret))
        ep_len = torch.where(done, self.t, torch.zeros_like(self.t))
        if bool(done.any()):
            self._init_episodes(done.nonzero()[:, 0].cpu())
        return ChunkStep(self.observe(), reward, done, success, truncated, executed, ep_ret, ep_len)

    # ------------------------------------------------------------------ expert
    def expert_actions(
        self, horizon: int, generator: torch.Generator | None = None, noise: float = 0.5
    ) -> torch.Tensor:
        """The scripted expert's chunk ``(B, horizon, 2)`` from the current state.

        Heads in a straight line, at ``expert_speed`` of the full speed, for this episode's
        expert target (the goal, or a wrong target with probability ``1 − quality`` drawn at
        episode start) plus its aim offset (``aim_noise``), then stays; adds Gaussian noise of
        scale ``noise·(1 − quality)``.
        """
        if _check_int("horizon", horizon) < 0:
            raise ValueError(f"ReachEnv.expert_actions: horizon must be >= 0, got {horizon}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
            raise ValueError(f"ReachEnv.expert_actions: noise must be a finite float >= 0, got {noise!r}")
        tgt = (self._goal_pos(self.expert_target) + self.expert_offset).clamp(-1, 1)
        pos = self.pos.clone()
        out = torch.zeros(self.num_envs, horizon, 2, device=self.device)
        for h in range(horizon):
            a = ((tgt - pos) / self.max_speed).clamp(-1, 1) * self.expert_speed
            out[:, h] = a
            pos = (pos + self.max_speed * a).clamp(-1, 1)
        sigma = noise * (1.0 - self.expert_quality)
        if sigma > 0:
            eps = torch.randn(out.shape, generator=generator, device="cpu").to(self.device)
            out = (out + sigma * eps).clamp(-1, 1)
        return out

    def optimal_steps(self) -> torch.Tensor:
        """Lower bound on the steps to the goal from the current state, ``(B,)``."""
        d = (self._goal_pos(self.goal) - self.pos).abs().amax(dim=1) - self.success_radius / math.sqrt(2)
        return torch.ceil(d.clamp(min=0) / self.max_speed).long()


def _check_int(name: str, value: object) -> int:
    """``value`` as a Python int (ints and integer scalars; not bool, float or str), else a TypeError naming it."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"ReachEnv: {name} must be an int, got {type(value).__name__} {value!r}")
