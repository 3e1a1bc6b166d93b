"""Shamir's t-of-n secret sharing over the prime field GF(2^521 - 1).

A secret ``s < P`` becomes the points ``(x, f(x))``, ``x = 1..n``, of a random polynomial
``f`` of degree ``t - 1`` with ``f(0) = s``; any ``t`` of them give ``s`` back by Lagrange
interpolation at 0, and ``t - 1`` of them say nothing about it (every ``s`` fits them equally).
``P`` is the Mersenne prime 2^521 - 1, wide enough for a 32-byte seed or X25519 private key.

Example::

    >>> import random
    >>> shares = share(123456789, n=5, t=3, rng=random.Random(0))
    >>> reconstruct(shares[1:4]), reconstruct([shares[0], shares[4], shares[2]])
    (123456789, 123456789)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

P = 2**521 - 1  # a Mersenne prime
SHARE_NBYTES = 66  # one field element on the wire: ceil(521 / 8)


def share(secret: int, *, n: int, t: int, rng: random.Random) -> list[tuple[int, int]]:
    """``n`` shares ``(x, y)`` of ``secret`` (``0 <= secret < P``), any ``t`` of which
    reconstruct it; ``rng`` draws the polynomial's coefficients."""
    if not 0 <= secret < P:
        raise ValueError("the secret must be an integer in [0, P)")
    if not 1 <= t <= n:
        raise ValueError(f"the threshold t={t} must be in [1, n={n}]")
    coeffs = [secret] + [rng.randrange(P) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for a in reversed(coeffs):  # Horner
            y = (y * x + a) % P
        out.append((x, y))
    return out


def reconstruct(shares: Sequence[tuple[int, int]]) -> int:
    """The secret behind ``shares`` (distinct ``x``; at least the threshold of them)."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("shares must have distinct x")
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    return secret
