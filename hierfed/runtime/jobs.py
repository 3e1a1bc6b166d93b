"""The messages between the driver (topology) and workers: plain frozen dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hierfed.postprocess.validate import Expectation
from hierfed.update import State, Update


@dataclass(frozen=True)
class TrainJob:
    """Train one client from its parent's broadcast state and send its update up."""

    client_id: str
    parent_id: str  # whose broadcast state the client starts from
    tier: str  # the receiving (parent's) tier: its postprocess chain applies
    round: int
    key: tuple  # keys every random draw of this job
    trains: tuple[str, ...]  # components the client trains
    sends: tuple[str, ...]  # of those, the ones whose scope reaches the parent
    local: State | None = None  # the client's own components kept from earlier rounds


@dataclass(frozen=True)
class ClientMeta:
    """What the driver learns of a trained client (small; no shared tensors)."""

    client_id: str
    parent_id: str
    num_samples: int
    loss: float
    steps: int
    sizes: dict[str, int]  # bytes per component on the wire, after the chain
    local: State | None = None  # new values of components that never leave the client
    error: str | None = None


@dataclass(frozen=True)
class MergeTask:
    """One node-round at a tier node: validate, aggregate, apply the server step."""

    node_id: str
    tier: str
    round: int
    key: tuple
    expectations: tuple[Expectation, ...]  # one per sampled child, sorted by sender
    state: State  # the node's current state
    agg_state: Any = None
    opt_state: Any = None
    # on the node's last local round: emit its update for the parent
    emit: bool = False
    start: State | None = None  # the state the node started its parent-round from
    sends: tuple[str, ...] = ()  # components whose scope reaches the parent
    emit_weights: dict[str, float] = field(default_factory=dict)  # weights of the emitted update
    parent_id: str = ""
    parent_tier: str = ""


@dataclass(frozen=True)
class MergeResult:
    node_id: str
    state: State
    agg_state: Any
    opt_state: Any
    weights: dict[str, float]  # merged weight per component this node-round
    accepted: tuple[str, ...]
    rejected: tuple[tuple[str, str], ...]  # (sender, reason)
    num_samples: int
    emitted: Update | None = None
    emitted_sizes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalJob:
    """Evaluate ``tasks`` of a state on a data split: the global test set or a client's test rows."""

    name: str  # "global" or a client id
    tasks: tuple[str, ...]
    state_key: str  # key into the states passed alongside
    split: str = "global"  # "global" or "client-test"
