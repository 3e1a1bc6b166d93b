"""``gossip``: decentralized training without a server (D-PSGD style consensus).

Nodes are the federation's **clients** (students). Each round:

1. online nodes are sampled to train (``participation`` of the root tier's TierConfig, as in
   ``star``), dropouts are drawn (``dropout``), and sampled nodes train locally on the workers
   (``runtime.train``, exactly as a star client would, same keyed batches);
2. every online node mixes its *shared* components with its neighbours ``steps`` times through
   a doubly-stochastic matrix (Metropolis–Hastings by default; hierfed.mixing). All new values
   are computed from the same half-step values (start + own update) before any node commits.
   The matrices are composed on the driver (``n x n`` numpy); the tensor combination runs on the
   workers (``runtime.mix``);
3. the round reports the consensus distance (mean ``||x_i - xbar||``), and — on evaluation
   rounds — every node's model on the global held-out set for the tasks that node serves:
   the mean over nodes and the worst node, per task.

A component is shared only among the nodes that hold it; a ``tier``-scoped component (e.g.
``model.scopes.head.*=institution``) is mixed only between neighbours of the same institution;
``local`` components never leave a node. Dropped nodes and failed links are removed from the
step's matrix with their mass folded onto the diagonal (still doubly stochastic).

Weighting (``weighting``): ``samples`` (default) mixes ``(n_i x_i, n_i)`` and divides (the
push-sum ratio form), so on the complete graph with one step every node holds exactly the
sample-weighted FedAvg model; ``uniform`` mixes ``x_i`` plainly and preserves the plain mean.

"The global model" (``global_state``, evaluated as ``global`` in metrics) is the weighted mean
of the node models (by training rows), which is what consensus converges to.

Options (``topology.options``): ``graph`` ring | torus | complete | random_regular |
erdos_renyi | small_world | edges; ``degree`` (random_regular), ``p`` (erdos_renyi), ``k`` and
``beta`` (small_world), ``edges`` (a list of ``[client_id, client_id]``); ``weights``
metropolis_hastings | max_degree; ``weighting`` samples | uniform; ``steps`` mixing steps per
round; ``time_varying`` (resample the graph each round, keyed by seed and round);
``link_failure`` (probability that a link is down in a mixing step); ``eval_nodes`` (evaluate a
keyed subset of this many nodes; 0 = all).

Every neighbour exchange is one ledger record per direction (``direction="peer"``, edge
``student<->student``); bytes are the post-postprocessor wire size of a trained node's first
payload, and the raw size otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Any

import numpy as np

from hierfed import mixing
from hierfed.config import RunConfig, check_tier_names
from hierfed.data.federation import Federation
from hierfed.engine.channel import Message
from hierfed.engine.context import RoundContext
from hierfed.engine.sampling import dropouts, sample
from hierfed.engine.stats import RoundStats
from hierfed.errors import ConfigError, DataError
from hierfed.model.spec import ModelSpec
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.base import Runtime
from hierfed.runtime.jobs import AverageTask, EvalJob, MixTask, TrainJob
from hierfed.seeding import np_rng
from hierfed.topology import Topology
from hierfed.unlearning.exclusion import excluded_clients
from hierfed.update import State, state_nbytes
from topologies.gossip_options import graph_spec, parse_options, uses


class GossipTopology(Topology):
    """Serverless consensus over a graph of clients; see the module docstring."""

    name = "gossip"
    carried = ("states", "mean")  # what a checkpoint saves between rounds (and self.clients)

    @classmethod
    def check(cls, cfg: RunConfig, federation: Federation) -> None:
        opts = parse_options(dict(cfg.topology.options))
        check_tier_names(cfg, (federation.tier_names[0], federation.tier_names[-1]))
        nodes = [c.id for c in federation.clients]
        if len(nodes) < 2:
            raise DataError(f"gossip needs at least 2 clients, the federation has {len(nodes)}")
        leaf = federation.tier_names[-1]
        if cfg.topology.leaf_peers(leaf) is not None:
            raise ConfigError(
                f"topology.tiers.{leaf}.peer_steps",
                cfg.topology.tiers[leaf].peer_steps,
                "device-to-device gossip between aggregations is an option of tree topologies "
                "(hierarchical, star); under gossip every node already mixes with its "
                "neighbours: set topology.options.steps and topology.options.graph instead",
            )
        # built (and checked: connected, no self-loops) before any work starts
        mixing.build_graph(graph_spec(opts), nodes, np_rng(cfg.seed, "gossip-graph"))
        excluded_clients(cfg, federation)

    def __init__(self, *, cfg: RunConfig, federation: Federation, spec: ModelSpec) -> None:
        super().__init__(cfg=cfg, federation=federation, spec=spec)
        self.check(cfg, federation)
        self.opts = parse_options(dict(cfg.topology.options))
        self.nodes: list[str] = [c.id for c in federation.clients]  # sorted by id
        # ``exclude`` (unlearning): offline for good: neither train nor mix nor count in the mean
        self.excluded = excluded_clients(cfg, federation)
        self.root_tier = federation.tier_names[0]
        self.node_tier = federation.tier_names[-1]
        self.tier_cfg = cfg.tier(self.root_tier)
        profiles = federation.by_id
        self.num_train = {n: profiles[n].num_train for n in self.nodes}
        self.resource = {n: profiles[n].resource for n in self.nodes}
        self.tasks = {n: profiles[n].tasks for n in self.nodes}
        self.holds = {n: spec.holds(profiles[n]) for n in self.nodes}  # what a node trains
        # what its model needs (a copy of each)
        self.uses = {n: uses(spec, profiles[n]) for n in self.nodes}
        leaf = len(federation.tier_names) - 1
        # a component's sharing label at a node: the ancestor at its scope's tier (absent: not shared)
        self.shared: dict[str, tuple[str, ...]] = {}
        self.labels: dict[str, dict[str, Hashable]] = defaultdict(dict)
        for n in self.nodes:
            path = profiles[n].path
            for c in self.uses[n]:
                lvl = spec.scope_level(c)
                if lvl < leaf:
                    self.labels[c][n] = "/".join(path[: lvl + 1])
            self.shared[n] = tuple(c for c in self.holds[n] if n in self.labels.get(c, {}))
        self.graph_spec = graph_spec(self.opts)
        self.graph = mixing.build_graph(
            self.graph_spec, self.nodes, np_rng(cfg.seed, "gossip-graph")
        )
        self.states: dict[str, State] = {}
        self.mean: State = {}
        self._metrics: dict[str, Any] = {}

    # ---------------------------------------------------------------- contract

    def init(self, initial: State) -> None:
        self.initial = initial
        self.states = {n: {c: initial[c] for c in self.uses[n]} for n in self.nodes}
        self.mean = {}

    def global_state(self) -> State:
        return {**self.initial, **self.mean}

    def personalized_state(self, client_id: str) -> State:
        return {**self.global_state(), **self.states[client_id]}

    def round_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)

    @property
    def tier_names(self) -> tuple[str, ...]:
        return (self.root_tier, self.node_tier)

    # ---------------------------------------------------------------- the round

    def graph_of_round(self, rnd: int) -> frozenset[mixing.Edge]:
        if not self.opts["time_varying"]:
            return self.graph
        return mixing.build_graph(
            self.graph_spec, self.nodes, np_rng(self.cfg.seed, "gossip-graph", rnd)
        )

    def _draw(self, rnd: int) -> tuple[list[str], list[str]]:
        """(online nodes, nodes that train): dropouts and participation, keyed by seed and
        round, by the same rules as a tree's root (hierfed.engine.sampling)."""
        seed, root, tier = self.cfg.seed, self.root_tier, self.tier_cfg
        gone = dropouts(seed=seed, node=root, members=self.nodes, p=tier.dropout, rnd=rnd, key=())
        online = [n for n in self.nodes if n not in gone and n not in self.excluded]
        classes = self.resource if tier.sampling == "by_resource" else None
        chosen = set(
            sample(
                seed=seed,
                node=root,
                members=self.nodes,
                p=tier.participation,
                rnd=rnd,
                key=(0,),
                classes=classes,
            )
        )
        return online, [n for n in online if n in chosen]

    def run_round(self, ctx: RoundContext) -> RoundStats:
        stats, rnd = ctx.stats, ctx.round
        online, trainers = self._draw(rnd)
        starts = ctx.runtime.put(self.states)
        jobs = [
            TrainJob(
                client_id=n,
                parent_id=n,
                tier=self.root_tier,
                round=rnd,
                key=(rnd, 0, n),
                trains=self.holds[n],
                sends=self.shared[n],
                privacy=ctx.clients.privacy.get(n),
            )
            for n in trainers
        ]
        metas, updates = ctx.runtime.train(jobs, starts)
        sizes: dict[str, dict[str, int]] = {}
        compute: dict[str, float] = {}
        for m in metas:
            if stats.failed(m) or not stats.absorb(m, ctx.clients):
                continue
            stats.participants += 1
            sizes[m.client_id] = m.sizes
            compute[m.client_id] = ctx.channels.training_s(m.client_id, rnd=rnd, key=("gossip",))
        # a straggler past the deadline: its update is discarded (it mixes its old state)
        deadline = self.tier_cfg.deadline_s
        late = {n for n, t in compute.items() if deadline > 0 and t > deadline}
        stats.late += sorted(late)
        expectations = {
            n: Expectation(
                n, frozenset(self.shared[n]), exact=True, max_weight=float(self.num_train[n])
            )
            for n in sizes
            if n not in late
        }
        tasks, step_edges = self._mix_tasks(rnd, online)
        # only expected updates are mixed: a late node's update is ignored by the workers
        results = ctx.runtime.mix(tasks, starts, expectations, [updates])
        new_states = {n: dict(s) for n, s in self.states.items()}
        seen_rejections: set[tuple[str, str]] = set()
        for res in results:
            new_states[res.node_id].update(res.state)
            seen_rejections.update(res.rejected)
        for n, loc in ctx.clients.local.items():
            new_states[n].update(loc)
        stats.rejections += sorted(seen_rejections)
        self.states = new_states  # every node commits only now
        # training until the slowest on-time node (the deadline if someone was late), then
        # each mixing step as the peer channel clocks it
        train = max((t for n, t in compute.items() if n not in late), default=0.0)
        stats.sim_time_s = deadline if late and deadline > 0 else train
        exchanges = 0
        for s, edges in enumerate(step_edges):
            messages = self._messages(edges, sizes if s == 0 else {}, late)
            exchanges += len(messages)
            stats.sim_time_s += ctx.channels.peers(self.node_tier).exchange(
                messages, rnd=rnd, key=("peer", s)
            )
        dist, mean = ctx.runtime.average(
            AverageTask(
                labels={
                    c: {n: lab for n, lab in v.items() if n not in self.excluded}
                    for c, v in self.labels.items()
                },
                weights={
                    c: {
                        n: self._weight(n, c)
                        for n in v
                        if self._weight(n, c) > 0 and n not in self.excluded
                    }
                    for c, v in self.labels.items()
                },
            ),
            ctx.runtime.put(self.states),
        )
        self.mean = mean
        self._metrics = {
            "consensus_distance": dist,
            "gossip_exchanges": exchanges,
            "online_nodes": len(online),
        }
        if rnd % self.cfg.eval.every == 0 or rnd == self.cfg.rounds:
            self._metrics.update(self._evaluate_nodes(rnd, ctx.runtime))
        return stats

    def _weight(self, n: str, c: str) -> float:
        """A node's mixing weight for ``c``: its training rows if it trains ``c`` (0 if it only
        keeps a copy, e.g. a light client's encoders), or 1 under uniform weighting."""
        if self.opts["weighting"] == "uniform":
            return 1.0
        return float(self.num_train[n]) if c in self.holds[n] else 0.0

    def _mix_tasks(
        self, rnd: int, online: list[str]
    ) -> tuple[list[MixTask], list[frozenset[mixing.Edge]]]:
        n = len(self.nodes)
        graph = self.graph_of_round(rnd)
        on = set(online)
        step_edges = []
        for s in range(int(self.opts["steps"])):
            edges = mixing.drop_links(
                graph,
                float(self.opts["link_failure"]),
                np_rng(self.cfg.seed, "gossip-links", rnd, s),
            )
            edges = frozenset(
                (i, j) for i, j in edges if self.nodes[i] in on and self.nodes[j] in on
            )
            step_edges.append(edges)
        # components that mix alike (same labels and weights at every node) share one matrix
        by_labels: dict[tuple, list[str]] = defaultdict(list)
        for c, lab in sorted(self.labels.items()):
            labels = tuple(lab.get(x) if x in on else None for x in self.nodes)
            by_labels[(labels, tuple(self._weight(x, c) for x in self.nodes))].append(c)
        rows: dict[str, list[tuple[tuple[str, ...], tuple[tuple[str, float], ...]]]] = defaultdict(
            list
        )
        for (labels, weights), comps in sorted(by_labels.items(), key=lambda kv: kv[1]):
            # weights from the degrees in the subgraph of live links between nodes sharing these components
            rule = str(self.opts["weights"])
            M = mixing.compose(
                [mixing.mixing_matrix(n, mixing.induced(e, labels), rule) for e in step_edges]
            )
            A = mixing.coefficients(M, list(weights))
            for i, nid in enumerate(self.nodes):
                if labels[i] is None:
                    continue
                row = tuple((self.nodes[j], float(A[i, j])) for j in np.flatnonzero(A[i]))
                rows[nid].append((tuple(comps), row))
        tasks = [
            MixTask(node_id=nid, round=rnd, groups=tuple(rows[nid]))
            for nid in self.nodes
            if rows.get(nid)
        ]
        return tasks, step_edges

    def _messages(
        self, edges: frozenset[mixing.Edge], wire: dict[str, dict[str, int]], late: set[str]
    ) -> list[Message]:
        """One step's transfers: per direction of every live link, the components both ends
        share. Bytes are a trained node's encoded update (``wire``, first step, not late) and
        the raw size otherwise."""
        out = []
        for i, j in sorted(edges):
            a, b = self.nodes[i], self.nodes[j]
            for src, dst in ((a, b), (b, a)):
                comps = [
                    c
                    for c in self.uses[src]
                    if src in self.labels.get(c, {})
                    and self.labels[c].get(dst) == self.labels[c][src]
                ]
                if not comps:
                    continue
                sent = wire.get(src, {}) if src not in late else {}
                out.append(
                    Message(
                        src,
                        dst,
                        {c: int(sent.get(c, state_nbytes(self.states[src][c]))) for c in comps},
                    )
                )
        return out

    def _evaluate_nodes(self, rnd: int, runtime: Runtime) -> dict[str, Any]:
        """Every (or a keyed subset of) node's model on the global held-out set, for its tasks."""
        nodes = list(self.nodes)
        k = int(self.opts["eval_nodes"])
        if 0 < k < len(nodes):
            rng = np_rng(self.cfg.seed, "gossip-eval", rnd)
            nodes = sorted(nodes[i] for i in rng.choice(len(nodes), size=k, replace=False))
        nodes = [n for n in nodes if n not in self.excluded]  # their models never trained
        states = {n: self.personalized_state(n) for n in nodes}
        jobs = [EvalJob(n, tuple(sorted(self.tasks[n])), n, split="global") for n in nodes]
        per_task: dict[str, list[float]] = defaultdict(list)
        for _, res in runtime.evaluate(jobs, states):
            for t, (metric, _) in res.items():
                per_task[t].append(metric)
        return {
            "node_metric_mean": {t: float(np.mean(v)) for t, v in sorted(per_task.items())},
            "node_metric_worst": {t: float(np.min(v)) for t, v in sorted(per_task.items())},
            "nodes_evaluated": len(nodes),
        }
