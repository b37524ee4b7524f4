"""Vectorized environments over action chunks: the built-in reaching task (and LIBERO)."""

from flowrl.envs.base import ChunkStep, EnvObs, VecEnv
from flowrl.envs.pipeline import PipelinedEnv
from flowrl.envs.reach import ReachEnv, tokenize

__all__ = ["ChunkStep", "EnvObs", "PipelinedEnv", "ReachEnv", "VecEnv", "tokenize"]
