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
    privacy: Any = (
        None  # the client's DP accountant state (privacy.PrivacyState) from earlier rounds
    )
    continual: Any = (
        None  # hierfed.continual.fit.ContinualFit: a continual run's tasks, mitigations
    )


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
    privacy: Any = None  # the client's DP accountant state after this round (privacy.PrivacyState)
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
    emit_samples: int = 0  # training rows behind the emitted update (metadata, never math)
    # the emit folded into the last node-round's merge (one trip to a worker, not two): the
    # merged weights of the earlier node-rounds per component; the worker adds this merge's and
    # emits with their mean over ``local_rounds`` (``emit_weights`` and ``emit_samples`` then
    # count only the earlier node-rounds)
    emit_prior: dict[str, tuple[float, ...]] | None = None
    local_rounds: int = 1
    # (samples, merged sender statistics) of the node's node-rounds behind the emit, in order
    # (a folded emit: the earlier ones; the worker adds this merge's); the emitted update
    # carries their sample-weighted mean as ``meta.stats`` (e.g. the loss q-FFL reads above)
    emit_stats: tuple[tuple[int, dict[str, float]], ...] = ()
    # sender -> its codec memory from its last send (top-k's error-feedback residual,
    # ``Postprocessor.deliver``); only for tiers whose chain has a stateful step
    memory: dict[str, State] = field(default_factory=dict)

    @classmethod
    def emitting(
        cls, node_id: str, *, tier: str, round: int, key: tuple, **fields: Any
    ) -> MergeTask:
        """A task that merges nothing and only emits ``node_id``'s update for its parent
        (``fields``: ``state``, ``start``, ``sends``, the emit's weights and parent)."""
        return cls(
            node_id=node_id, tier=tier, round=round, key=key, expectations=(), emit=True, **fields
        )


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
    stats: dict[str, float] = field(default_factory=dict)  # merge_stats of the accepted updates
    # sender -> leave-one-out influence on this merge (only with ``eval.contributions``)
    contributions: dict[str, float] = field(default_factory=dict)
    # sender -> its codec memory after this send (only for tiers with a stateful step)
    memory: dict[str, State] = field(default_factory=dict)
    # under secure aggregation: what the protocol sent (hierfed.secagg.edge.SecAggReport)
    secagg: Any = None


@dataclass(frozen=True)
class EvalJob:
    """Evaluate ``tasks`` of a state on a data split: the global test set or a client's test rows."""

    name: str  # "global" or a client id
    tasks: tuple[str, ...]
    state_key: str  # key into the states passed alongside
    split: str = "global"  # "global" or "client-test"


@dataclass(frozen=True)
class MixTask:
    """Gossip mixing for one node: new values of its shared components, each a convex
    combination of the half-step values (start + own update) of the node and its neighbours.

    ``groups``: per group of components that mix alike, ``(components, ((source, coef), ...))``
    with sources sorted by node id and coefficients summing to 1 (hierfed.mixing.coefficients).
    """

    node_id: str
    round: int
    groups: tuple[tuple[tuple[str, ...], tuple[tuple[str, float], ...]], ...]


@dataclass(frozen=True)
class MixResult:
    node_id: str
    state: State  # the mixed components only
    rejected: tuple[tuple[str, str], ...] = ()  # (source, reason): its update was not used


@dataclass(frozen=True)
class AverageTask:
    """Consensus statistics of node states: the distance and the weighted mean model.

    ``labels[c][node]``: who shares component ``c`` with whom (for the distance);
    ``weights[c][node]``: the node's weight in the mean of ``c`` (absent = not counted).
    """

    labels: dict[str, dict[str, Any]]
    weights: dict[str, dict[str, float]]
