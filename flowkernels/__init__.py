"""flowkernels: fused kernels for flow-matching Vision-Language-Action policies (π0 / π0.5).

Ops (each takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``):

* :func:`flow_step` — one batched ODE / Flow-SDE / Flow-Noise denoising transition + log-prob.
* :func:`chain_logprob` — log-prob of stored denoising chains under recomputed velocities.
* :func:`cfm_loss`, :func:`cfm_interpolate`, :func:`fpo_ratio` — per-sample flow-matching
  losses and FPO's likelihood-free ratio.
* :func:`prefix_attention`, :func:`merge_attention_states` — attention of action tokens over a
  shared, cached VLM prefix (read once per observation, never copied).

Conventions (t = 1 is noise, t = 0 the action) follow docs/design.md (DESIGN §1); the kernel
ABI is in docs/kernels.md.
"""

from flowkernels._backend import BACKENDS, BackendUnavailableError, available_backends, resolve_backend
from flowkernels._checks import set_value_checks
from flowkernels.ops.attention import merge_attention_states, prefix_attention
from flowkernels.ops.cfm_loss import cfm_interpolate, cfm_loss, fpo_ratio
from flowkernels.ops.chain_logprob import chain_logprob
from flowkernels.ops.flow_step import FlowStepResult, flow_step
from flowkernels.random import philox_normal

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "FlowStepResult",
    "available_backends",
    "cfm_interpolate",
    "cfm_loss",
    "chain_logprob",
    "flow_step",
    "fpo_ratio",
    "merge_attention_states",
    "philox_normal",
    "prefix_attention",
    "resolve_backend",
    "set_value_checks",
]
