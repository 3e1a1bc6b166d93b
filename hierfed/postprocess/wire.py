"""What a sender puts on the wire, and the shape every codec shares (``Codec``).

A codec encodes the sender's *mean* delta (``tensors / weight``) value by value and sends one
fp32 weight per component beside it; the receiver sees the decoded values times the weight.
A lower-rank client (``model.resource_ranks``) holds adapters zero-padded to the stored rank:
only its first ``rank`` slots (rows of ``lora_A``, columns of ``lora_B``) are on the wire; the
rest of its delta is minus the parent's own values there, which the receiver knows, so those
entries pass through every codec unchanged and cost no bytes.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> u = Update.from_delta({"adapter.x": {"l.lora_A.weight": torch.ones(4, 3),
    ...                                      "l.lora_B.weight": torch.ones(5, 4)}}, 1.0,
    ...                       sender="s", round=0)
    >>> payload_nbytes(u, None), payload_nbytes(u, 1)  # (12 + 20) * 4 and (3 + 5) * 4
    ({'adapter.x': 128}, {'adapter.x': 32})
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch

from hierfed.aggregators.lora import lora_pairs
from hierfed.postprocess.base import PostContext, Postprocessor
from hierfed.update import Update

WEIGHT_NBYTES = 4  # one fp32 weight per component


def wire_masks(params: Mapping[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """Per parameter of one component, the boolean mask of entries on the wire for a sender
    of LoRA rank ``rank``; parameters sent whole are absent (all of them when ``rank`` is
    None or at least every layer's stored rank)."""
    if rank is None:
        return {}
    out: dict[str, torch.Tensor] = {}
    for ka, kb in lora_pairs(params):
        a, b = params[ka], params[kb]
        if rank >= a.shape[0]:
            continue
        ma = torch.zeros(a.shape, dtype=torch.bool)
        ma[:rank] = True
        mb = torch.zeros(b.shape, dtype=torch.bool)
        mb[:, :rank] = True
        out[ka], out[kb] = ma, mb
    return out


def payload_nbytes(update: Update, rank: int | None) -> dict[str, int]:
    """Raw bytes per component of what a sender of ``rank`` sends (float values only)."""
    out: dict[str, int] = {}
    for c, params in update.tensors.items():
        masks = wire_masks(params, rank)
        out[c] = sum(
            int(masks[p].sum() if p in masks else t.numel()) * t.element_size()
            for p, t in params.items()
        )
    return out


def on_wire_counts(update: Update, rank: int | None) -> dict[str, dict[str, int]]:
    """Values on the wire per component and parameter."""
    out: dict[str, dict[str, int]] = {}
    for c, params in update.tensors.items():
        masks = wire_masks(params, rank)
        out[c] = {p: int(masks[p].sum()) if p in masks else t.numel() for p, t in params.items()}
    return out


class Codec(Postprocessor):
    """A lossy encoding of each sent tensor of mean values; one fp32 weight per component.

    Subclasses give ``encode`` (the values as decoded by the receiver) and ``tensor_nbytes``
    (encoded bytes of ``n`` values of one tensor, with its own overhead such as a scale)."""

    @abstractmethod
    def encode(
        self, x: torch.Tensor, *, ctx: PostContext, component: str, param: str
    ) -> torch.Tensor:
        """The 1-D float tensor ``x`` of mean values as the receiver decodes it."""

    @abstractmethod
    def tensor_nbytes(self, n: int) -> int:
        """Encoded bytes of ``n`` values of one tensor."""

    def process(self, update: Update, ctx: PostContext) -> Update:
        tensors = {}
        for c, params in update.tensors.items():
            w = update.weights[c]
            masks = wire_masks(params, ctx.rank)
            out = {}
            for p, t in params.items():
                mean = t / w
                if p not in masks:
                    dec = self.encode(mean.reshape(-1), ctx=ctx, component=c, param=p)
                    out[p] = dec.reshape(t.shape).to(t.dtype) * w
                    continue
                m = masks[p]
                dec = self.encode(mean[m], ctx=ctx, component=c, param=p)
                sent = t.clone()  # entries off the wire arrive exactly (the receiver knows them)
                sent[m] = dec.to(t.dtype) * w
                out[p] = sent
            tensors[c] = out
        return Update(tensors, dict(update.weights), update.meta)

    def encoded_nbytes(self, update: Update, rank: int | None) -> dict[str, int]:
        """Bytes per component on the wire: every tensor's encoding plus the weight."""
        return {
            c: sum(self.tensor_nbytes(n) for n in counts.values()) + WEIGHT_NBYTES
            for c, counts in on_wire_counts(update, rank).items()
        }
