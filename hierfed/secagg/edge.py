"""Secure aggregation as a tier edge option: ``topology.tiers.<parent>.secure_aggregation: secagg+``.

Every node of that tier merges its members' updates through SecAgg+ (``protocol``): each
member's update, divided by the edge's ``max_weight`` and clipped to ``clipping_range``, is
quantized to integers (``quantize``), masked, and only the sum is unmasked. The node then
runs its aggregator on that one summed update, so only rules that merge by summing
(``associative``: ``weighted_mean``, ``lora_naive``) are allowed; median, trimmed mean, Krum,
q-FFL and ``lora_exact`` need individual updates and are refused before the run starts.

Options (``secure_aggregation_options``), after Flower's ``SecAggPlusWorkflow``:

* ``clipping_range`` (8.0): ``|tensor / max_weight|`` is clipped to it per value;
* ``quantization_range`` (2^22): grid points per value; ``modulus_range`` (2^32): the ring;
* ``max_weight`` (0 = the largest weight bound of the node-round's members): the scale;
* ``reconstruction_threshold`` (0.5): shares needed, as a fraction of a sender's share
  holders (itself and its neighbours), at least 2 where there are 2;
* ``num_shares`` (0 = everyone): neighbourhood size (SecAgg+'s sparse graph when smaller);
* ``drop_after_masking`` (0.0): simulated probability that a member drops after sending its
  shares and before its masked input (keyed draw); the survivors' shares remove its masks.

The quantization error bound: each value of the unmasked sum of ``n`` members is within
``n * max_weight * clipping_range / L`` (``L = (quantization_range - 1) // 2``) of the
plain sum of their clipped values, and each weight within ``n * max_weight / L``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hierfed.errors import ConfigError
from hierfed.secagg.protocol import (
    Message,
    Params,
    SecAggFailure,
    SecAggServer,
    keyed_entropy,
    ring_neighbours,
    run_protocol,
)
from hierfed.secagg.quantize import (
    dequantize_sum,
    dequantize_weight_sum,
    levels_of,
    quantize,
    quantize_weight,
)
from hierfed.seeding import derive_seed, torch_gen
from hierfed.update import Update, UpdateMeta, merge_stats

MODES = ("none", "secagg+")
OPTION_DEFAULTS: dict[str, Any] = {
    "clipping_range": 8.0,
    "quantization_range": 2**22,
    "modulus_range": 2**32,
    "max_weight": 0.0,
    "reconstruction_threshold": 0.5,
    "num_shares": 0,
    "drop_after_masking": 0.0,
}


def check_options(options: Mapping[str, Any], key: str) -> None:
    """ConfigError naming the first bad ``secure_aggregation_options`` entry."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]}", options[unknown[0]], f"known: {', '.join(OPTION_DEFAULTS)}"
        )
    o = {**OPTION_DEFAULTS, **options}

    def real(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not real(o["clipping_range"]) or o["clipping_range"] <= 0:
        raise ConfigError(f"{key}.clipping_range", o["clipping_range"], "must be a number > 0")
    if not integer(o["quantization_range"]) or o["quantization_range"] < 3:
        raise ConfigError(
            f"{key}.quantization_range", o["quantization_range"], "must be an integer >= 3"
        )
    m = o["modulus_range"]
    if not integer(m) or m < 2 * o["quantization_range"] or m > 2**62:
        raise ConfigError(
            f"{key}.modulus_range",
            m,
            "must be an integer in [2 * quantization_range, 2^62] (e.g. 2^32)",
        )
    if not real(o["max_weight"]) or o["max_weight"] < 0:
        raise ConfigError(
            f"{key}.max_weight", o["max_weight"], "must be a number >= 0 (0 = the members' bound)"
        )
    t = o["reconstruction_threshold"]
    if not real(t) or not 0 < t <= 1:
        raise ConfigError(f"{key}.reconstruction_threshold", t, "must be a fraction in (0, 1]")
    if not integer(o["num_shares"]) or o["num_shares"] < 0:
        raise ConfigError(
            f"{key}.num_shares", o["num_shares"], "must be an integer >= 0 (0 = everyone)"
        )
    d = o["drop_after_masking"]
    if not real(d) or not 0 <= d < 1:
        raise ConfigError(f"{key}.drop_after_masking", d, "must be a probability in [0, 1)")


@dataclass(frozen=True)
class SecAggReport:
    """What one secure node-round put on the wire and who dropped after masking.

    ``messages``: ``(stage, src, dst, sizes)`` with ``sizes`` component -> bytes (masked
    inputs per component, the protocol's own messages as ``secagg.<stage>``)."""

    messages: tuple[tuple[str, str, str, tuple[tuple[str, int], ...]], ...]
    dropped: tuple[str, ...]
    bound: float  # the stated quantization error bound per value of the sum


def layout(
    state: Mapping[str, Mapping[str, torch.Tensor]], components: Sequence[str]
) -> list[tuple[str, str, int]]:
    """The vector layout every member shares: ``(component, parameter, numel)`` in sorted
    order, then one weight per component (its last ``len(components)`` entries)."""
    return [(c, p, state[c][p].numel()) for c in sorted(components) for p in sorted(state[c])]


def encode_member(
    update: Update,
    lay: list[tuple[str, str, int]],
    comps: Sequence[str],
    *,
    scale: float,
    opts: Mapping[str, Any],
    gen: torch.Generator,
) -> torch.Tensor:
    """A member's update as integers: its values / ``scale`` quantized, then its weights /
    ``scale`` (0 for components it does not send)."""
    levels = levels_of(opts["quantization_range"])
    parts = []
    for c, p, n in lay:
        t = update.tensors.get(c, {}).get(p)
        x = torch.zeros(n, dtype=torch.float64) if t is None else t.reshape(-1).double() / scale
        parts.append(quantize(x, clip=float(opts["clipping_range"]), levels=levels, gen=gen))
    w = torch.tensor(
        [float(update.weights.get(c, 0.0)) / scale for c in sorted(comps)], dtype=torch.float64
    )
    parts.append(quantize_weight(w, levels=levels, gen=gen))
    return torch.cat(parts)


def decode_sum(
    total: torch.Tensor,
    lay: list[tuple[str, str, int]],
    comps: Sequence[str],
    *,
    n: int,
    scale: float,
    opts: Mapping[str, Any],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """The float64 sums of the members' pre-weighted tensors and weights."""
    levels, clip = levels_of(opts["quantization_range"]), float(opts["clipping_range"])
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    at = 0
    for c, p, k in lay:
        tensors.setdefault(c, {})[p] = (
            dequantize_sum(total[at : at + k], n=n, clip=clip, levels=levels) * scale
        )
        at += k
    ws = dequantize_weight_sum(total[at:], levels=levels) * scale
    return tensors, {c: float(w) for c, w in zip(sorted(comps), ws)}


def secure_sum(
    updates: Sequence[Update],
    *,
    like: Mapping[str, Mapping[str, torch.Tensor]],
    components: Sequence[str],
    scale: float,
    opts: Mapping[str, Any],
    seed: int,
    key: Sequence[object],
    node: str,
    bounds: Mapping[str, float] | None = None,
) -> tuple[Update | None, list[Update], SecAggReport, SecAggServer]:
    """Sum ``updates`` under SecAgg+; returns the unmasked sum (the dtype of ``like``), the
    updates that survived, the ledger report and the server (what it saw).

    ``bounds``: each member's weight bound, known to the server; a dequantized weight sum is
    clamped to the survivors' total (the true sum never exceeds it, and a sum at its bound,
    every member at full weight, must not come out above it by the rounding error)."""
    o = {**OPTION_DEFAULTS, **opts}
    comps = sorted(c for c in components if c in like)
    lay = layout(like, comps)
    by = {u.meta.senders[0]: u for u in updates}
    ids = sorted(by)
    levels, m = levels_of(o["quantization_range"]), int(o["modulus_range"])
    if len(ids) * 2 * levels >= m:
        raise SecAggFailure(
            f"{len(ids)} members x {2 * levels} levels wrap around modulus_range {m}; raise it or lower quantization_range"
        )
    plain = {
        i: encode_member(
            by[i], lay, comps, scale=scale, opts=o, gen=torch_gen(seed, *key, node, i, "secagg-q")
        )
        for i in ids
    }
    nb = ring_neighbours(ids, int(o["num_shares"]))
    holders = min((len(v) + 1 for v in nb.values()), default=1)
    t = min(
        holders,
        max(2 if holders >= 2 else 1, math.ceil(float(o["reconstruction_threshold"]) * holders)),
    )
    params = Params(m, t, nb, f"{seed}/{tuple(key)}/{node}")
    p_drop = float(o["drop_after_masking"])
    drop = {
        i
        for i in ids
        if p_drop > 0 and derive_seed(seed, *key, node, i, "secagg-drop") / 2**63 < p_drop
    }
    mod_nbytes = math.ceil(math.log2(m) / 8)
    total, alive, log, server = run_protocol(
        plain,
        params=params,
        server_id=node,
        drop=drop,
        entropy_of=lambda i: keyed_entropy(seed, *key, node, i),
        modulus_nbytes=mod_nbytes,
    )
    survivors = [by[i] for i in alive]
    report = SecAggReport(
        _ledger(log, lay, comps, mod_nbytes),
        tuple(sorted(drop)),
        len(alive) * scale * float(o["clipping_range"]) / levels,
    )
    if not survivors:
        return None, [], report, server
    sums, weights = decode_sum(total, lay, comps, n=len(survivors), scale=scale, opts=o)
    if bounds is not None:
        cap = sum(float(bounds[i]) for i in alive)
        weights = {c: min(w, cap) for c, w in weights.items()}
    keep = [c for c in comps if weights[c] > 0]
    tensors = {
        c: {p: t.reshape(like[c][p].shape).to(like[c][p].dtype) for p, t in sums[c].items()}
        for c in keep
    }
    meta = UpdateMeta(
        tuple(sorted(alive)),
        max(u.meta.round for u in survivors),
        sum(u.meta.num_samples for u in survivors),
        merge_stats(survivors),
    )
    return Update(tensors, {c: weights[c] for c in keep}, meta), survivors, report, server


def _ledger(
    log: Sequence[Message], lay: list[tuple[str, str, int]], comps: Sequence[str], mod_nbytes: int
) -> tuple[tuple[str, str, str, tuple[tuple[str, int], ...]], ...]:
    """Protocol messages with their sizes by component: a masked input splits into its
    components' values and weights; the rest is ``secagg.<stage>``."""
    per_comp: dict[str, int] = {c: mod_nbytes for c in comps}  # its weight
    for c, _, n in lay:
        per_comp[c] += n * mod_nbytes
    out = []
    for msg in log:
        if msg.stage == "masked":
            sizes = tuple(sorted(per_comp.items()))
        else:
            sizes = ((f"secagg.{msg.stage}", msg.nbytes),)
        out.append((msg.stage, msg.src, msg.dst, sizes))
    return tuple(out)
