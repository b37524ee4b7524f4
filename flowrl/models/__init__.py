"""The π0 / π0.5 policy built on flowkernels (see docs/policy.md)."""

from flowrl.models.config import CONFIGS, PolicyConfig, get_config
from flowrl.models.policy import Observation, Pi0Policy, PrefixCache, SampleResult
from flowrl.models.weights import CheckpointKeyError


def from_pretrained(directory: str, config: PolicyConfig | None = None, strict: bool = True, verify: bool = True,
                    **overrides) -> Pi0Policy:
    """Load a local checkpoint directory (flowrl, lerobot PI0/PI05, openpi PyTorch); see Pi0Policy.from_pretrained."""
    return Pi0Policy.from_pretrained(directory, config=config, strict=strict, verify=verify, **overrides)


__all__ = ["CONFIGS", "CheckpointKeyError", "Observation", "Pi0Policy", "PolicyConfig", "PrefixCache",
           "SampleResult", "from_pretrained", "get_config"]
