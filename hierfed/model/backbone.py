"""Frozen backbones. A backbone maps token embeddings [B, T, D] (+ mask) to [B, T, D].

``tiny`` is a small pre-norm transformer built in code, with ``q_proj/k_proj/v_proj/o_proj``
and ``fc1/fc2`` linear layers that peft's LoRA can target. Its weights come from the run seed,
so every worker builds the same backbone without it ever being transmitted.

Registered builders take ``(cfg: ModelConfig, seed: int)`` and return a ``Backbone``.
"""

from __future__ import annotations

import torch
from torch import nn

from hierfed.config import ModelConfig
from hierfed.model.init import init_module
from hierfed.registry import BACKBONES


class Backbone(nn.Module):
    """Interface: ``d_model``, ``forward(tokens, mask)``; optional ``embed_text(ids)``.

    ``embed_text`` is None for backbones without their own vocabulary (then the text
    encoder learns its embeddings); a pretrained language model supplies its own.
    """

    d_model: int
    max_tokens: int

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - interface
        return None

    @property
    def text_vocab_size(self) -> int | None:
        return None


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        attn_mask = mask[:, None, None, :].to(torch.bool)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(Backbone):
    """A small pre-norm transformer encoder built in code (for tests and quick runs)."""

    def __init__(self, d_model: int, num_layers: int, num_heads: int, max_tokens: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_tokens = max_tokens
        self.pos = nn.Parameter(torch.zeros(max_tokens, d_model))
        self.layers = nn.ModuleList(_Block(d_model, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = tokens + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm_out(x)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None


@BACKBONES.register("tiny")
def build_tiny(cfg: ModelConfig, seed: int) -> Backbone:
    bb = TinyTransformer(cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.max_tokens)
    init_module(bb, seed, "backbone")
    with torch.no_grad():  # a pretrained-like positional signal, fixed by the seed
        bb.pos.mul_(0.1)
    return bb
