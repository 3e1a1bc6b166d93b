"""Compression codecs. The receiver sees decoded values; the ledger counts encoded bytes."""

from __future__ import annotations

import torch

from hierfed.postprocess.base import PostContext, Postprocessor
from hierfed.registry import POSTPROCESSORS
from hierfed.update import Update


@POSTPROCESSORS.register("fp16")
class Fp16(Postprocessor):
    """Send the mean delta in half precision (2 bytes per value) plus one fp32 weight."""

    def process(self, update: Update, ctx: PostContext) -> Update:
        tensors = {}
        for c, params in update.tensors.items():
            w = update.weights[c]
            tensors[c] = {p: (t / w).to(torch.float16).to(t.dtype) * w for p, t in params.items()}
        return Update(tensors, dict(update.weights), update.meta)

    def wire_nbytes(self, update: Update, sizes: dict[str, int]) -> dict[str, int]:
        return {
            c: sum(t.numel() * 2 for t in params.values()) + 4
            for c, params in update.tensors.items()
        }
