"""Update: the currency of a federation.

An Update carries, per *component*, a pre-weighted sum of parameter deltas and the sum of
the weights behind it::

    tensors[c][p] = sum_i w_i[c] * delta_i[c][p]        weights[c] = sum_i w_i[c]

Weights are per component because clients hold different subsets of components: a student
without a camera contributes nothing, and no weight, to ``encoder.image``. ``+`` is
associative and commutative (up to float rounding), and the division happens once, at the
top of a tier (``Update.mean``) — so a hierarchical weighted mean equals the flat one.

Metadata (who sent it, the round, sample counts, and named scalar statistics such as the
sender's training loss) travels beside the tensors; algorithms never add optional fields
here: a rule that needs a sender statistic reads it by name from ``meta.stats``.

Example::

    >>> import torch
    >>> a = Update.from_delta({"head.t": {"w": torch.ones(2)}}, 1.0, sender="s1", round=0)
    >>> b = Update.from_delta({"head.t": {"w": torch.zeros(2)}}, 3.0, sender="s2", round=0)
    >>> (a + b).mean()["head.t"]["w"].tolist()
    [0.25, 0.25]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# component -> parameter name -> tensor
State = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class UpdateMeta:
    """Who and what stands behind an Update; never used by the math."""

    senders: tuple[str, ...]
    round: int
    num_samples: int = 0
    # named scalar statistics of the sender(s), e.g. {"loss": 0.71} (the mean training loss
    # over the last local epoch); a merge keeps their sample-weighted mean (``merge_stats``)
    stats: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Update:
    """Pre-weighted per-component delta sums; immutable, never mutated in place."""

    tensors: Mapping[str, Mapping[str, torch.Tensor]]
    weights: Mapping[str, float]
    meta: UpdateMeta = field(default_factory=lambda: UpdateMeta((), 0))

    @classmethod
    def from_delta(
        cls,
        delta: Mapping[str, Mapping[str, torch.Tensor]],
        weight: float | Mapping[str, float],
        *,
        sender: str,
        round: int,
        num_samples: int = 0,
        stats: Mapping[str, float] | None = None,
    ) -> Update:
        """Weight a plain delta: ``tensors[c] = w[c] * delta[c]``; ``weight`` may be per component."""
        ws = {c: float(weight if not isinstance(weight, Mapping) else weight[c]) for c in delta}
        tensors = {c: {p: t * ws[c] for p, t in params.items()} for c, params in delta.items()}
        return cls(tensors, ws, UpdateMeta((sender,), round, num_samples, dict(stats or {})))

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted(self.tensors))

    def __add__(self, other: Update) -> Update:
        if not isinstance(other, Update):
            return NotImplemented
        return _fold([self, other])

    @staticmethod
    def sum(updates: Iterable[Update]) -> Update | None:
        """Sum in sorted sender order, so the float result does not depend on arrival order."""
        ordered = sorted(updates, key=lambda u: u.meta.senders)
        if len(ordered) <= 1:
            return ordered[0] if ordered else None
        return _fold(ordered)

    def mean(self) -> State:
        """Divide once: the weighted mean delta of every component with positive weight.

        The division runs in float64 and is cast back (a float32 quotient by a tiny weight
        overflows; for weights exact in the tensor's dtype the result is the same bits)."""
        return {
            c: {p: (t.double() / self.weights[c]).to(t.dtype) for p, t in params.items()}
            for c, params in self.tensors.items()
            if self.weights[c] > 0
        }

    def nbytes(self) -> dict[str, int]:
        """Raw (unencoded) size of every component in bytes."""
        return {c: state_nbytes(params) for c, params in self.tensors.items()}

    def __reduce__(self) -> tuple:
        """Pickle (Ray's object store, process pools) as one byte buffer plus a layout.

        A worker sends hundreds of small updates per round; pickling each tensor on its own
        costs ~25 us apiece (torch's storage protocol), packing them costs one copy. The
        receiver gets independent tensors with the same dtypes, shapes and values, bit for bit.
        Updates holding anything but CPU tensors (e.g. still on a GPU) pickle field by field."""
        packed = _pack_tensors(self.tensors)
        if packed is None:
            return (Update, (self.tensors, self.weights, self.meta))
        return (_unpack_update, (*packed, dict(self.weights), self.meta))

    def restrict(self, components: Iterable[str]) -> Update:
        keep = set(components)
        return Update(
            {c: p for c, p in self.tensors.items() if c in keep},
            {c: w for c, w in self.weights.items() if c in keep},
            self.meta,
        )


def _fold(ordered: list[Update]) -> Update:
    """``ordered[0] + ordered[1] + ...``: per component, the additions in this order, into
    accumulators owned here (so in place; the inputs are never mutated), and the sender set
    built once. Folding pairwise copied every dict and re-sorted the growing sender tuple per
    update, quadratic in n (1,000 updates: 0.082 s, now 0.017 s)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    weights: dict[str, float] = {}
    senders: set[str] = set()
    rnd, samples = ordered[0].meta.round, 0
    for u in ordered:
        for c, params in u.tensors.items():
            mine = tensors.get(c)
            if mine is None:
                tensors[c] = {p: t.clone() for p, t in params.items()}
                weights[c] = u.weights[c]
                continue
            if mine.keys() != params.keys():
                raise ValueError(f"component '{c}' has different parameters in the two updates")
            for p, t in params.items():
                acc = mine[p]
                if acc.dtype == t.dtype and acc.shape == t.shape:
                    acc.add_(t)
                else:  # type promotion or broadcasting: exactly what tensor ``+`` does
                    mine[p] = acc + t
            weights[c] = weights[c] + u.weights[c]
        senders.update(u.meta.senders)
        rnd = max(rnd, u.meta.round)
        samples += u.meta.num_samples
    meta = UpdateMeta(tuple(sorted(senders)), rnd, samples, merge_stats(ordered))
    return Update(tensors, weights, meta)


def merge_stats(updates: Sequence[Update]) -> dict[str, float]:
    """The senders' statistics of a merge: per name carried by *every* update, the mean
    weighted by ``num_samples`` (a plain mean when no update counts samples). A name some
    update lacks is dropped: its mean over the others would misdescribe the merge."""
    if not updates or not any(u.meta.stats for u in updates):
        return {}
    names = set(updates[0].meta.stats).intersection(*(u.meta.stats for u in updates[1:]))
    n = [float(u.meta.num_samples) for u in updates]
    total = sum(n)
    if total <= 0:
        n, total = [1.0] * len(updates), float(len(updates))
    return {
        k: sum(w * float(u.meta.stats[k]) for w, u in zip(n, updates)) / total
        for k in sorted(names)
    }


_ALIGN = 8  # every tensor starts on an 8-byte boundary, so a uint8 slice views as any dtype


def _pack_tensors(
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[bytes, tuple[tuple[str, str, str, tuple[int, ...], int], ...]] | None:
    layout = []
    chunks: list[torch.Tensor] = []
    offset = 0
    for c, params in tensors.items():
        for p, t in params.items():
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_sparse:
                return None
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            pad = -offset % _ALIGN
            if pad:
                chunks.append(torch.zeros(pad, dtype=torch.uint8))
                offset += pad
            layout.append((c, p, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
            chunks.append(flat)
            offset += flat.numel()
    buf = torch.cat(chunks).numpy().tobytes() if chunks else b""
    return buf, tuple(layout)


def _unpack_update(
    buf: bytes,
    layout: tuple[tuple[str, str, str, tuple[int, ...], int], ...],
    weights: dict[str, float],
    meta: UpdateMeta,
) -> Update:
    # (torch.frombuffer refuses an empty buffer: an update of empty tensors only)
    raw = (
        torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        if buf
        else torch.empty(0, dtype=torch.uint8)
    )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for c, p, dtype_name, shape, offset in layout:
        dtype = getattr(torch, dtype_name)
        n = math.prod(shape) * dtype.itemsize
        # views of one buffer, then cloned: every tensor owns its storage, as after torch's pickle
        t = raw[offset : offset + n].view(dtype).reshape(shape).clone()
        tensors.setdefault(c, {})[p] = t
    return Update(tensors, weights, meta)


def state_nbytes(params: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def state_sub(
    a: Mapping[str, Mapping[str, torch.Tensor]], b: Mapping[str, Mapping[str, torch.Tensor]]
) -> State:
    """``a - b`` over the components of ``a``."""
    return {c: {p: t - b[c][p] for p, t in params.items()} for c, params in a.items()}


def state_add(
    a: Mapping[str, Mapping[str, torch.Tensor]], delta: Mapping[str, Mapping[str, torch.Tensor]]
) -> State:
    """``a + delta``; components of ``a`` that ``delta`` lacks are kept as they are."""
    out: State = {c: dict(p) for c, p in a.items()}
    for c, params in delta.items():
        out[c] = {p: out[c][p] + t for p, t in params.items()}
    return out


def state_norm(a: Mapping[str, Mapping[str, torch.Tensor]]) -> float:
    sq = sum(float(t.double().pow(2).sum()) for params in a.values() for t in params.values())
    return math.sqrt(sq)


def first_nonfinite(state: Mapping[str, Mapping[str, torch.Tensor]]) -> str | None:
    """``component/param`` of the first tensor (in sorted order) holding NaN or Inf, else None."""
    for c in sorted(state):
        for p in sorted(state[c]):
            if not bool(torch.isfinite(state[c][p]).all()):
                return f"{c}/{p}"
    return None


def flat_state(a: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``component/param`` -> tensor, the layout used on disk (safetensors)."""
    return {f"{c}/{p}": t for c, params in sorted(a.items()) for p, t in sorted(params.items())}


def unflat_state(flat: Mapping[str, torch.Tensor]) -> State:
    out: State = {}
    for key, t in flat.items():
        c, _, p = key.partition("/")
        out.setdefault(c, {})[p] = t
    return out
