"""Keyed randomness: every random draw in hierfed comes from ``derive_seed(root, *keys)``.

No library code touches a global RNG. A draw is identified by what it is for — e.g.
``(seed, round, node_id, "sample")`` — so results do not depend on the order in which
workers happen to run, on the number of workers, or on where a run was resumed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(root: int, *keys: object) -> int:
    """A 63-bit seed that depends only on ``root`` and the ``keys`` (by their ``repr``).

    >>> derive_seed(0, 3, "inst-1") == derive_seed(0, 3, "inst-1")
    True
    >>> derive_seed(0, 3, "inst-1") != derive_seed(1, 3, "inst-1")
    True
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(int(root)).encode())
    for key in keys:
        h.update(b"\x1f")
        h.update(repr(key).encode())
    return int.from_bytes(h.digest(), "little") >> 1


def np_rng(root: int, *keys: object) -> np.random.Generator:
    """A numpy Generator keyed like ``derive_seed``."""
    return np.random.default_rng(derive_seed(root, *keys))


def torch_gen(root: int, *keys: object) -> torch.Generator:
    """A CPU torch.Generator keyed like ``derive_seed``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(root, *keys))
    return g
