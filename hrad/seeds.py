"""The one rule for a seed in a config: the range torch takes, and its bits for narrower libraries.

``torch.manual_seed`` takes -2**63 .. 2**64 - 1 (a negative seed is read as its 64-bit two's
complement); a larger one was a traceback ("Overflow when unpacking long long"). numpy's
``default_rng`` refuses negative seeds, scikit-learn's ``random_state`` takes 32 bits and faiss's
k-means a C ``int``: :func:`seed_bits` gives them the seed's low bits, the same value for every
seed those libraries took before (non-negative and small), a valid one for the rest.
Imports nothing of hrad.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: the range of ``torch.manual_seed``
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

#: a config field's seed: every value torch takes, refused at validation otherwise
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]


def seed_bits(seed: int, bits: int = 64) -> int:
    """``seed`` as an unsigned ``bits``-bit number (its low bits; a negative seed as torch reads
    it), for numpy (64), scikit-learn (32) and faiss (31: a non-negative C int)."""
    return seed & ((1 << bits) - 1)
