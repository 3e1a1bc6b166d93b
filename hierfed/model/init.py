"""Keyed parameter initialisation: every tensor's initial value depends on (seed, its name)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hierfed.seeding import torch_gen


@torch.no_grad()
def init_module(module: nn.Module, seed: int, prefix: str) -> None:
    """(Re)initialise every parameter of ``module`` from generators keyed by its full name.

    Weights of rank >= 2 get N(0, 1/fan_in); LayerNorm weights 1; biases 0; LoRA B 0 (so a
    fresh adapter is the identity), LoRA A N(0, 1/fan_in); embeddings N(0, 0.02^2)·50.
    """
    for name, p in module.named_parameters():
        full = f"{prefix}.{name}"
        g = torch_gen(seed, "init", full)
        if "lora_B" in name:
            p.zero_()
        elif name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        elif p.dim() == 1:
            p.zero_()
        else:
            fan_in = p.shape[-1] if p.dim() == 2 else int(p[0].numel())
            std = 1.0 / math.sqrt(max(1, fan_in))
            if "embed" in name or "prompt" in full:
                std = 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
