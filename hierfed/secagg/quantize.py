"""Real vectors to integers mod ``M`` and back: what SecAgg+ masks and sums.

A sender's values ``x`` are clipped to ``[-C, C]`` (``clipping_range``) and stochastically
rounded to the grid ``C / L * {-L..L}`` with ``L = (quantization_range - 1) // 2`` (0 stays
exact), then shifted by ``L`` into ``[0, 2L]``. Weights (in ``[0, 1]`` after dividing by
the edge's ``max_weight``) use the grid ``{0..L} / L``. ``n`` such vectors sum without
wrapping around the modulus ``M`` (``modulus_range``) while ``n * 2L < M``; the server
subtracts ``n L`` (values) and scales back. Stochastic rounding is unbiased and each
rounding moves a value by less than one step, so the dequantized sum of ``n`` senders is
within ``n * C / L`` of the plain sum of their clipped values (weights: ``n / L``).

These are plain functions of tensors (a deployment can use them on either side).

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q = quantize(torch.tensor([0.0, 1.0, -3.0]), clip=2.0, levels=4, gen=g)
    >>> q.tolist()  # 0 -> 4 (the shift), 1.0 -> 6, -3.0 clipped to -2.0 -> 0
    [4, 6, 0]
    >>> dequantize_sum(q, n=1, clip=2.0, levels=4).tolist()
    [0.0, 1.0, -2.0]
"""

from __future__ import annotations

import torch


def levels_of(quantization_range: int) -> int:
    """``L``: the grid has ``2L + 1 <= quantization_range`` points."""
    return (int(quantization_range) - 1) // 2


def stochastic_round(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``floor(x + u)``, ``u ~ U[0, 1)``: unbiased, as int64 (``x`` in float64)."""
    u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
    return torch.floor(x + u).to(torch.int64)


def quantize(x: torch.Tensor, *, clip: float, levels: int, gen: torch.Generator) -> torch.Tensor:
    """Values in ``[-clip, clip]`` (clipped) to integers in ``[0, 2 levels]``."""
    scaled = x.double().clamp(-clip, clip) * (levels / clip)
    return stochastic_round(scaled, gen).clamp(-levels, levels) + levels


def quantize_weight(w: torch.Tensor, *, levels: int, gen: torch.Generator) -> torch.Tensor:
    """Weights in ``[0, 1]`` to integers in ``[0, levels]``."""
    return stochastic_round(w.double().clamp(0, 1) * levels, gen).clamp(0, levels)


def dequantize_sum(total: torch.Tensor, *, n: int, clip: float, levels: int) -> torch.Tensor:
    """The real sum of ``n`` senders' values from the sum of their quantized values."""
    return (total - n * levels).double() * (clip / levels)


def dequantize_weight_sum(total: torch.Tensor, *, levels: int) -> torch.Tensor:
    return total.double() / levels
