"""Drop-in integrations of flowkernels into other π0 / π0.5 codebases.

* :mod:`flowkernels.integrations.lerobot` — ``apply_flowkernels`` / ``revert_flowkernels`` for
  lerobot's ``PI0Policy`` / ``PI05Policy`` (lerobot 0.6.x), plus Flow-SDE / Flow-Noise sampling
  with log-probs. Importing it does not import lerobot; the patch functions do.
"""

from flowkernels.integrations.lerobot import (
    FlowSample,
    apply_flowkernels,
    is_patched,
    revert_flowkernels,
)

__all__ = ["FlowSample", "apply_flowkernels", "is_patched", "revert_flowkernels"]
