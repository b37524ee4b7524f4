"""flowrl: reinforcement fine-tuning of flow-matching VLA policies (π0 / π0.5) on flowkernels.

Subpackages: :mod:`flowrl.models` (the policy, heads, checkpoint loading).
"""

__version__ = "0.1.0"
