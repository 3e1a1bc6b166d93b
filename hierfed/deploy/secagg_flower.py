"""Flower's side of SecAgg+ on the top edge: one round of the institutions through
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (each SuperNode's ClientApp).

The server's code only ever holds masked vectors (inside the workflow) and their unmasked
sum (``_Collect.aggregate_fit``); each institution's own Update never leaves its SuperNode in
the clear. ``_Counting`` wraps the Grid to measure what the protocol's four stages move per
institution (its ConfigRecord: keys, shares, masked vectors), which goes into the ledger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from hierfed.deploy.secagg import MAX_WEIGHT, Layout, sum_update, workflow_params
from hierfed.deploy.wire import reply_stats, stats_head
from hierfed.engine.subtree import SubtreeReply

log = logging.getLogger(__name__)


def _nbytes(v: Any) -> int:
    if isinstance(v, (bytes, bytearray)):
        return len(v)
    if isinstance(v, str):
        return len(v.encode())
    if isinstance(v, list):
        return sum(_nbytes(x) for x in v)
    return 8  # a number or a bool on the wire


def record_nbytes(rec: ConfigRecord | None) -> int:
    """Bytes of a ConfigRecord's values (keys and framing not counted)."""
    return 0 if rec is None else sum(_nbytes(v) for v in rec.values())


class _Counting:
    """The workflow's Grid, measuring the SecAgg+ record of every message per node and stage."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.up: dict[int, dict[str, int]] = {}
        self.down: dict[int, dict[str, int]] = {}
        self.stage: dict[int, str] = {}

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        msgs = list(messages)
        for m in msgs:
            rec = m.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = str(rec[Key.STAGE]) if rec is not None else "?"
            node = m.metadata.dst_node_id
            self.stage[node] = stage
            d = self.down.setdefault(node, {})
            d[f"secagg.{stage}"] = d.get(f"secagg.{stage}", 0) + record_nbytes(rec)
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            if r.has_error():
                continue
            node = r.metadata.src_node_id
            key = f"secagg.{self.stage.get(node, '?')}"
            u = self.up.setdefault(node, {})
            u[key] = u.get(key, 0) + record_nbytes(r.content.config_records.get(RECORD_KEY_CONFIGS))
        return replies


class _Collect(Strategy):
    """Hands the workflow each institution's instructions; keeps the unmasked sum."""

    def __init__(self, proxies: dict[str, GridClientProxy], fitins: dict[str, FitIns]) -> None:
        self.proxies, self.fitins = proxies, fitins
        self.results: list[tuple[Any, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return [(self.proxies[i], self.fitins[i]) for i in sorted(self.fitins)]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.results = list(results)
        return (self.results[0][1].parameters if self.results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return None


def secagg_round(
    *,
    grid: Any,
    context: Context,
    cfg: Any,
    nodes: Mapping[str, int],
    messages: Mapping[str, dict[str, Any]],
    layout: Layout,
    rnd: int,
) -> tuple[dict[str, SubtreeReply | str], dict[str, int]]:
    """One round of the institutions under SecAgg+ (``messages``: each one's instructions,
    the same fields as a plain round's): replies as ``FlowerSites`` returns them, and the
    bytes the institutions' inner edges moved."""
    counting = _Counting(grid)
    run_id = context.run_id
    proxies = {i: GridClientProxy(nodes[i], grid, run_id) for i in messages}
    fitins = {
        i: FitIns(Parameters([], ""), {**m, "layout": layout.to_json()})
        for i, m in messages.items()
    }
    strategy = _Collect(proxies, fitins)
    lc = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    lc.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    from flwr.app import ArrayRecord

    lc.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    # the workflow calls only send_and_receive: the counting wrapper stands in for the Grid
    SecAggPlusWorkflow(**workflow_params(cfg, len(messages)))(counting, lc)  # type: ignore[arg-type]
    if not strategy.results:
        why = "SecAgg+ halted: fewer institutions than its threshold stayed in the round"
        return dict.fromkeys(messages, why), {}
    by_node = {nid: i for i, nid in nodes.items()}
    heads: dict[str, dict[str, Any]] = {}
    for proxy, res in strategy.results:
        heads[by_node[proxy.node_id]] = json.loads(str(res.metrics["head"]))
    arrays = parameters_to_ndarrays(strategy.results[0][1].parameters)
    total = sum_update(layout, arrays, {i: h["meta"] for i, h in heads.items()}, rnd)
    out: dict[str, SubtreeReply | str] = dict.fromkeys(
        messages, "dropped out of the SecAgg+ round (masked vector never arrived)"
    )
    inner: dict[str, int] = {}
    for k, inst in enumerate(sorted(heads)):
        h = heads[inst]
        for edge, n in h["inner"].items():
            inner[edge] = inner.get(edge, 0) + int(n)
        node = nodes[inst]
        out[inst] = SubtreeReply(
            node_id=inst,
            update=total if k == 0 else None,  # the sum travels once, with the first sender
            sizes=counting.up.get(node, {}),
            down_sizes=counting.down.get(node, {}),
            **reply_stats(h),
        )
    return out, inner


def client_fit(msg: Message, run: Any) -> Message:
    """The SecAgg+ ClientApp handler behind ``secaggplus_mod``: ``run(config)`` runs the
    subtree round and returns ``(SubtreeReply, inner bytes)``; the reply's update leaves as
    the flat vector the mod masks."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    conf = dict(fitins.config)
    layout = Layout.from_json(str(conf["layout"]))
    reply, inner = run(conf)
    arrays: list[np.ndarray] = layout.flatten(reply.update)
    head = {
        "meta": {
            "num_samples": reply.update.meta.num_samples if reply.update else 0,
            "stats": dict(reply.update.meta.stats) if reply.update else {},
        },
        "inner": inner,
        **stats_head(reply),
    }
    res = FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(arrays),
        int(MAX_WEIGHT),
        {"head": json.dumps(head)},
    )
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
