"""What crosses the top edge in a deployment, as bytes: states and updates as safetensors,
everything else as JSON. No pickle: a message is data, never code.

>>> import torch
>>> from hierfed.update import Update
>>> u = Update.from_delta({"head.t": {"w": torch.ones(2)}}, 3.0, sender="global/i0", round=1)
>>> v = update_from_wire(*update_to_wire(u))
>>> v.tensors["head.t"]["w"].tolist(), v.weights, v.meta.senders
([3.0, 3.0], {'head.t': 3.0}, ('global/i0',))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hierfed.engine.subtree import SubtreeReply
from hierfed.update import State, Update, UpdateMeta, flat_state, unflat_state


def state_to_bytes(state: Mapping[str, Mapping[str, torch.Tensor]]) -> bytes:
    """``component/param`` -> tensor as one safetensors buffer (dtypes kept bit for bit)."""
    flat = {k: v.detach().contiguous() for k, v in flat_state(state).items()}
    return st_save(flat) if flat else b""


def state_from_bytes(data: bytes) -> State:
    return unflat_state(st_load(data)) if data else {}


def update_to_wire(update: Update) -> tuple[bytes, str]:
    """An Update as (tensors, JSON of its weights and metadata)."""
    meta = update.meta
    head = {
        "weights": dict(update.weights),
        "senders": list(meta.senders),
        "round": meta.round,
        "num_samples": meta.num_samples,
        "stats": dict(meta.stats),
    }
    return state_to_bytes(update.tensors), json.dumps(head, sort_keys=True)


def update_from_wire(data: bytes, head_json: str) -> Update:
    head = json.loads(head_json)
    meta = UpdateMeta(
        tuple(head["senders"]),
        int(head["round"]),
        int(head["num_samples"]),
        {k: float(v) for k, v in head["stats"].items()},
    )
    weights = {c: float(w) for c, w in head["weights"].items()}
    return Update(state_from_bytes(data), weights, meta)


def reply_to_wire(reply: SubtreeReply) -> tuple[bytes, str]:
    """A SubtreeReply as (its update's tensors, JSON of everything else)."""
    data, upd = update_to_wire(reply.update) if reply.update is not None else (b"", "")
    head: dict[str, Any] = {
        "node_id": reply.node_id,
        "update": upd,
        "sizes": reply.sizes,
        "down_sizes": reply.down_sizes,
        **stats_head(reply),
    }
    return data, json.dumps(head, sort_keys=True)


def stats_head(reply: SubtreeReply) -> dict[str, Any]:
    """``reply``'s statistics of the subtree's round as JSON values (``reply_stats`` reads them)."""
    return {
        "elapsed_s": reply.elapsed_s,
        "participants": reply.participants,
        "loss_sum": reply.loss_sum,
        "loss_rows": reply.loss_rows,
        "failures": [list(x) for x in reply.failures],
        "rejections": [list(x) for x in reply.rejections],
        "dropped": list(reply.dropped),
        "late": list(reply.late),
        "privacy": reply.privacy,
        "contributions": reply.contributions,
    }


def reply_stats(h: dict[str, Any]) -> dict[str, Any]:
    """A reply head's statistics of the subtree's round, as ``SubtreeReply`` fields."""
    return {
        "elapsed_s": float(h["elapsed_s"]),
        "participants": int(h["participants"]),
        "loss_sum": float(h["loss_sum"]),
        "loss_rows": int(h["loss_rows"]),
        "failures": tuple((a, b) for a, b in h["failures"]),
        "rejections": tuple((a, b) for a, b in h["rejections"]),
        "dropped": tuple(h["dropped"]),
        "late": tuple(h["late"]),
        "privacy": dict(h["privacy"]),
        "contributions": {k: float(v) for k, v in h["contributions"].items()},
    }


def reply_from_wire(data: bytes, head_json: str) -> SubtreeReply:
    h = json.loads(head_json)
    return SubtreeReply(
        node_id=h["node_id"],
        update=update_from_wire(data, h["update"]) if h["update"] else None,
        sizes={c: int(n) for c, n in h["sizes"].items()},
        down_sizes={c: int(n) for c, n in h.get("down_sizes", {}).items()},
        **reply_stats(h),
    )
