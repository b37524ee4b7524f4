"""Counter-based normal noise shared by every backend.

All backends (torch, C++, CUDA, Triton) draw in-kernel noise with the same algorithm, so a
``(seed, offset)`` pair gives the same noise on every backend up to float rounding of
``log``/``cos``:

* Philox4x32-10 with key ``(seed & 0xffffffff, seed >> 32)`` and counter
  ``(c & 0xffffffff, c >> 32, 0, 0)`` where ``c = offset + i`` and ``i`` is the element's
  linear index in the output tensor (row-major).
* Box-Muller on the first two 32-bit outputs ``r0, r1``:
  ``u0 = (2·(r0 >> 9) + 1)·2⁻²⁴ ∈ (0, 1)``, ``u1 = (r1 >> 8)·2⁻²⁴ ∈ [0, 1)``,
  ``z = sqrt(−2·ln u0)·cos(2π·u1)``, computed in float32.

The torch implementation below is the oracle for the kernels' in-kernel noise.
"""

from __future__ import annotations

import math
import operator

import torch

from flowkernels._checks import check_int

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

__all__ = ["PHILOX_ROUNDS", "philox4x32", "philox_normal"]


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64. a·b < 2^64 wraps in int64, but the bit pattern equals
    # the uint64 product, so masking recovers both halves exactly.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(
    counter: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on 64-bit counters.

    Args:
        counter: int64 tensor of any shape, the 64-bit counter values ``c`` (non-negative).
        seed: 64-bit key, ``0 <= seed < 2**63``.

    Returns:
        Four int64 tensors of ``counter``'s shape holding the uint32 outputs.
    """
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_normal(
    seed: int,
    offset: int,
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal float32 noise of ``shape``, element ``i`` drawn from counter ``offset + i``.

    ``seed`` is an int in ``[0, 2**63)``, ``offset`` an int in ``[0, 2**62)``, ``shape`` a tuple of
    sizes ``>= 0``; anything else raises ``TypeError`` / ``ValueError`` naming the argument.

    Bit-compatible with the in-kernel noise of every flowkernels backend (up to the rounding
    of ``log``/``cos`` in float32).
    """
    op = "philox_normal"
    seed = check_int(op, "seed", seed, 0, 2**63, "2**63")
    offset = check_int(op, "offset", offset, 0, 2**62, "2**62")
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: shape must be a tuple of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{op}: shape must have sizes >= 0, got {shape}")
    n = math.prod(shape)
    counter = torch.arange(n, dtype=torch.int64, device=device) + offset
    r0, r1, _, _ = philox4x32(counter, seed)
    u0 = ((r0 >> 9) * 2 + 1).to(torch.float32) * (2.0**-24)
    u1 = (r1 >> 8).to(torch.float32) * (2.0**-24)
    z = torch.sqrt(-2.0 * torch.log(u0)) * torch.cos((2.0 * math.pi) * u1)
    return z.reshape(shape)
