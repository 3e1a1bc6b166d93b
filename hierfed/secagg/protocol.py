"""SecAgg+ on integer vectors: senders mask, the server learns only their sum.

The arithmetic of Bell et al. (2020), "Secure single-server aggregation with (poly)logarithmic
overhead" (SecAgg+), itself Bonawitz et al. (2017) on a sparse graph: each sender has
``neighbours`` (everyone, or its ring neighbourhood when ``num_shares`` is smaller).

1. *Keys*: every sender advertises two X25519 public keys (``c`` for encrypting shares, ``s``
   for masks); the server forwards each its neighbours' keys.
2. *Shares*: every sender splits its self-mask seed ``b`` and its mask private key ``s_sk``
   into Shamir shares (threshold ``t``) for itself and its neighbours, encrypts each for its
   holder (AES-GCM, key from the ``c`` key agreement) and sends them through the server,
   which cannot read them.
3. *Masked input*: sender ``i`` sends ``y_i = x_i + PRG(b_i) + sum_j ±PRG(s_ij) mod M`` where
   ``s_ij`` is the X25519 agreement of ``i`` and neighbour ``j`` (``+`` if ``i < j``): the pair
   masks cancel in the sum. A sender that drops now has sent shares but no ``y``.
4. *Unmask*: the server names survivors and dropouts; each survivor reveals, per neighbour,
   its share of ``b`` (a survivor) or of ``s_sk`` (a dropout), never both. With ``t`` shares
   the server removes every survivor's self mask and the dropouts' pair masks from the
   survivors' vectors: ``sum(y) - masks = sum of the survivors' x mod M``.

The server object (``SecAggServer``) is handed only what a real server receives: public
keys, ciphertexts, masked vectors and the revealed shares; ``received`` logs each (tests check
no plain vector is among them). Randomness comes from ``entropy(label, nbytes)``: keyed in
simulation (``keyed_entropy``: reproducible), ``os.urandom`` in a deployment. The PRG is torch's
generator seeded from SHA-256 of the seed: enough for simulation, not a cryptographic PRG.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hierfed.secagg import shamir

Entropy = Callable[[str, int], bytes]
KEY_NBYTES = 32  # an X25519 public key
ID_NBYTES = 4  # a sender's index in the round's list
REVEAL_NBYTES = ID_NBYTES + 1 + 2 + shamir.SHARE_NBYTES  # owner, kind, x, y


class SecAggFailure(Exception):
    """The round cannot be unmasked (too few shares survived, or a protocol violation)."""


def keyed_entropy(seed: int, *keys: object) -> Entropy:
    """Reproducible bytes for simulation: BLAKE2b of the keys and the label."""
    base = repr((int(seed), *keys)).encode()

    def draw(label: str, n: int) -> bytes:
        h = hashlib.blake2b(base + b"\x1f" + label.encode(), digest_size=64).digest()
        return h[:n]

    return draw


def prg(seed: bytes, dim: int, modulus: int) -> torch.Tensor:
    """``dim`` integers uniform in ``[0, modulus)`` expanded from ``seed``."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little") >> 1)
    return torch.randint(0, modulus, (dim,), generator=g, dtype=torch.int64)


def ring_neighbours(senders: Sequence[str], num_shares: int) -> dict[str, tuple[str, ...]]:
    """Each sender's neighbours: all others when ``num_shares`` is 0 or covers everyone,
    else those within ring distance ``(num_shares - 1) // 2`` in sorted order (symmetric)."""
    ids = sorted(senders)
    n = len(ids)
    if num_shares <= 0 or num_shares >= n:
        return {i: tuple(j for j in ids if j != i) for i in ids}
    h = max(1, (num_shares - 1) // 2)
    out = {}
    for a, i in enumerate(ids):
        near = {ids[(a + d) % n] for d in range(-h, h + 1)} - {i}
        out[i] = tuple(sorted(near))
    return out


def _raw(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class KeyAd:
    src: str
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class EncShare:
    src: str
    dst: str
    ciphertext: bytes


@dataclass(frozen=True)
class Masked:
    src: str
    y: torch.Tensor  # int64 in [0, M)


@dataclass(frozen=True)
class Reveal:
    src: str
    owner: str
    kind: str  # "b" (the owner survived) | "sk" (the owner dropped)
    share: tuple[int, int]


@dataclass(frozen=True)
class Params:
    """What every party knows before the round: modulus, threshold, the neighbour graph."""

    modulus: int
    threshold: int
    neighbours: Mapping[str, tuple[str, ...]]
    tag: str  # names the round (key agreement context, nonces)


def _agree(sk: X25519PrivateKey, pk: bytes, label: str) -> bytes:
    return hashlib.sha256(
        label.encode() + sk.exchange(X25519PublicKey.from_public_bytes(pk))
    ).digest()


class SecAggSender:
    """One sender's side; it alone holds its plain vector."""

    def __init__(self, sid: str, plain: torch.Tensor, params: Params, entropy: Entropy) -> None:
        self.sid, self.params = sid, params
        self._plain = plain
        self._c = X25519PrivateKey.from_private_bytes(entropy("c-key", 32))
        self._s = X25519PrivateKey.from_private_bytes(entropy("s-key", 32))
        self._b = entropy("self-mask", 32)
        self._rng = random.Random(int.from_bytes(entropy("shamir", 32), "little"))
        self._keys: dict[str, KeyAd] = {}
        self._held: dict[str, tuple[int, int, int]] = {}  # owner -> (x, share of b, of s_sk)

    def advertise(self) -> KeyAd:
        return KeyAd(self.sid, _raw(self._c.public_key()), _raw(self._s.public_key()))

    def _box(self, other: str) -> AESGCM:
        return AESGCM(_agree(self._c, self._keys[other].c_pk, f"{self.params.tag}/share"))

    def _nonce(self, src: str, dst: str) -> bytes:
        return hashlib.sha256(f"{self.params.tag}/{src}->{dst}".encode()).digest()[:12]

    def share(self, keys: Mapping[str, KeyAd]) -> list[EncShare]:
        """Shares of ``b`` and ``s_sk`` for itself and every neighbour (``keys``: theirs)."""
        self._keys = dict(keys)
        holders = sorted([self.sid, *self.params.neighbours[self.sid]])
        t = self.params.threshold
        sk = int.from_bytes(self._s.private_bytes_raw(), "little")
        sb = shamir.share(int.from_bytes(self._b, "little"), n=len(holders), t=t, rng=self._rng)
        ss = shamir.share(sk, n=len(holders), t=t, rng=self._rng)
        out = []
        for (x, yb), (_, ys), dst in zip(sb, ss, holders):
            if dst == self.sid:
                self._held[self.sid] = (x, yb, ys)
                continue
            plain = x.to_bytes(2, "little") + yb.to_bytes(66, "little") + ys.to_bytes(66, "little")
            ct = self._box(dst).encrypt(self._nonce(self.sid, dst), plain, self.sid.encode())
            out.append(EncShare(self.sid, dst, ct))
        return out

    def receive(self, shares: Sequence[EncShare]) -> None:
        for m in shares:
            if m.dst != self.sid or m.src not in self.params.neighbours[self.sid]:
                raise SecAggFailure(f"{self.sid} got a share it should not have ({m.src}->{m.dst})")
            plain = self._box(m.src).decrypt(
                self._nonce(m.src, m.dst), m.ciphertext, m.src.encode()
            )
            x = int.from_bytes(plain[:2], "little")
            yb = int.from_bytes(plain[2:68], "little")
            ys = int.from_bytes(plain[68:], "little")
            self._held[m.src] = (x, yb, ys)

    def masked(self) -> Masked:
        """``x + PRG(b) + sum_j ±PRG(s_ij) mod M`` over the neighbours whose shares it holds."""
        m, dim = self.params.modulus, self._plain.numel()
        y = (self._plain + prg(self._b, dim, m)) % m
        for j in self.params.neighbours[self.sid]:
            pair = prg(_agree(self._s, self._keys[j].s_pk, f"{self.params.tag}/mask"), dim, m)
            y = (y + pair) % m if self.sid < j else (y - pair) % m
        return Masked(self.sid, y)

    def reveal(self, survivors: set[str], dropped: set[str]) -> list[Reveal]:
        """For each owner whose shares it holds: the ``b`` share of a survivor, the ``s_sk``
        share of a dropout (never both of one owner: that would unmask its input)."""
        if survivors & dropped:
            raise SecAggFailure(
                f"the server named {sorted(survivors & dropped)} both alive and dropped"
            )
        out = []
        for owner, (x, yb, ys) in sorted(self._held.items()):
            if owner in survivors:
                out.append(Reveal(self.sid, owner, "b", (x, yb)))
            elif owner in dropped:
                out.append(Reveal(self.sid, owner, "sk", (x, ys)))
        return out


@dataclass
class SecAggServer:
    """The server's side: it never holds a sender's plain vector, only what it receives."""

    params: Params
    dim: int
    received: list[object] = field(default_factory=list)  # every message it got, in order
    keys: dict[str, KeyAd] = field(default_factory=dict)
    masked: dict[str, torch.Tensor] = field(default_factory=dict)
    sharers: set[str] = field(default_factory=set)

    def collect_keys(self, ads: Sequence[KeyAd]) -> dict[str, dict[str, KeyAd]]:
        """Each sender's neighbours' keys, to forward."""
        self.received += ads
        self.keys = {a.src: a for a in ads}
        nb = self.params.neighbours
        return {i: {j: self.keys[j] for j in nb[i] if j in self.keys} for i in self.keys}

    def relay(self, shares: Sequence[EncShare]) -> dict[str, list[EncShare]]:
        """Route the (unreadable) ciphertexts to their holders."""
        self.received += shares
        self.sharers = {m.src for m in shares} | set(self.keys)
        out: dict[str, list[EncShare]] = {i: [] for i in self.keys}
        for m in shares:
            out[m.dst].append(m)
        return out

    def collect_masked(self, inputs: Sequence[Masked]) -> tuple[set[str], set[str]]:
        """Take the masked vectors; returns (survivors, dropped) to announce."""
        self.received += inputs
        self.masked = {m.src: m.y for m in inputs}
        survivors = set(self.masked)
        return survivors, self.sharers - survivors

    def unmask(self, reveals: Sequence[Reveal]) -> torch.Tensor:
        """The sum of the survivors' plain vectors mod ``M``, from the revealed shares."""
        self.received += reveals
        m, t = self.params.modulus, self.params.threshold
        by: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for r in reveals:
            by.setdefault((r.owner, r.kind), []).append(r.share)
        total = torch.zeros(self.dim, dtype=torch.int64)
        for y in self.masked.values():
            total = (total + y) % m
        survivors = set(self.masked)
        for i in sorted(survivors):
            got = by.get((i, "b"), [])
            if len(got) < t:
                raise SecAggFailure(
                    f"{len(got)} shares of {i}'s self mask survived; the threshold is {t}"
                )
            b = shamir.reconstruct(got[:t]).to_bytes(32, "little")
            total = (total - prg(b, self.dim, m)) % m
        for i in sorted(self.sharers - survivors):
            got = by.get((i, "sk"), [])
            if len(got) < t:
                raise SecAggFailure(
                    f"{len(got)} shares of dropout {i}'s key survived; the threshold is {t}"
                )
            sk = X25519PrivateKey.from_private_bytes(
                shamir.reconstruct(got[:t]).to_bytes(32, "little")
            )
            for j in self.params.neighbours[i]:
                if j in survivors:  # j's vector holds -+PRG(s_ij): take it out
                    pair = prg(
                        _agree(sk, self.keys[j].s_pk, f"{self.params.tag}/mask"), self.dim, m
                    )
                    total = (total - pair) % m if j < i else (total + pair) % m
        return total


@dataclass(frozen=True)
class Message:
    """One protocol message for the ledger: stage, sender, receiver, bytes."""

    stage: str  # keys | shares | masked | unmask
    src: str
    dst: str
    nbytes: int


def run_protocol(
    plain: Mapping[str, torch.Tensor],
    *,
    params: Params,
    server_id: str,
    drop: set[str],
    entropy_of: Callable[[str], Entropy],
    modulus_nbytes: int,
) -> tuple[torch.Tensor, list[str], list[Message], SecAggServer]:
    """One SecAgg+ round over ``plain`` (sender -> int64 vector in ``[0, M)``); the senders
    in ``drop`` leave after sharing. Returns the survivors' sum mod M, the survivors, every
    message (for the ledger) and the server (what it saw)."""
    ids = sorted(plain)
    dim = next(iter(plain.values())).numel() if ids else 0
    senders = {i: SecAggSender(i, plain[i], params, entropy_of(i)) for i in ids}
    server = SecAggServer(params, dim)
    log: list[Message] = []
    ads = [senders[i].advertise() for i in ids]
    log += [Message("keys", i, server_id, 2 * KEY_NBYTES) for i in ids]
    fwd = server.collect_keys(ads)
    log += [Message("keys", server_id, i, 2 * KEY_NBYTES * len(fwd[i])) for i in ids]
    shares = [m for i in ids for m in senders[i].share({**fwd[i], i: ads[ids.index(i)]})]
    for i in ids:
        log.append(
            Message("shares", i, server_id, sum(len(m.ciphertext) for m in shares if m.src == i))
        )
    routed = server.relay(shares)
    for i in ids:
        senders[i].receive(routed[i])
        log.append(Message("shares", server_id, i, sum(len(m.ciphertext) for m in routed[i])))
    alive = [i for i in ids if i not in drop]
    inputs = [senders[i].masked() for i in alive]
    log += [Message("masked", m.src, server_id, m.y.numel() * modulus_nbytes) for m in inputs]
    survivors, dropped = server.collect_masked(inputs)
    reveals = []
    for i in alive:
        log.append(Message("unmask", server_id, i, ID_NBYTES * (len(survivors) + len(dropped))))
        mine = senders[i].reveal(survivors, dropped)
        log.append(Message("unmask", i, server_id, REVEAL_NBYTES * len(mine)))
        reveals += mine
    return server.unmask(reveals), alive, log, server
