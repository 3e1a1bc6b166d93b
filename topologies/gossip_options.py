"""Options of the ``gossip`` topology (``topology.options``), parsed and checked before work.

See ``topologies/gossip.py`` for what each option does.
"""

from __future__ import annotations

from typing import Any

from hierfed import mixing
from hierfed.errors import ConfigError
from hierfed.model.spec import ModelSpec

OPTION_DEFAULTS: dict[str, Any] = {
    "graph": "ring",
    "degree": 3,
    "p": 0.3,
    "k": 4,
    "beta": 0.2,
    "edges": [],
    "weights": "metropolis_hastings",
    "weighting": "samples",
    "steps": 1,
    "time_varying": False,
    "link_failure": 0.0,
    "eval_nodes": 0,
}


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options with defaults filled in; unknown names and bad values raise ConfigError."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"topology.options.{unknown[0]}",
            options[unknown[0]],
            f"gossip takes options {sorted(OPTION_DEFAULTS)}",
        )
    o = {**OPTION_DEFAULTS, **options}
    if not isinstance(o["steps"], int) or o["steps"] < 1:
        raise ConfigError(
            "topology.options.steps", o["steps"], "mixing steps per round: an integer >= 1"
        )
    if not (0 <= float(o["link_failure"]) < 1):
        raise ConfigError("topology.options.link_failure", o["link_failure"], "must lie in [0, 1)")
    if o["weighting"] not in ("samples", "uniform"):
        raise ConfigError("topology.options.weighting", o["weighting"], "known: samples, uniform")
    if o["weights"] not in mixing.RULES:
        raise ConfigError(
            "topology.options.weights", o["weights"], f"known: {', '.join(mixing.RULES)}"
        )
    if not isinstance(o["eval_nodes"], int) or o["eval_nodes"] < 0:
        raise ConfigError(
            "topology.options.eval_nodes", o["eval_nodes"], "an integer >= 0 (0 = every node)"
        )
    return o


def graph_spec(opts: dict[str, Any]) -> mixing.GraphSpec:
    """The graph the parsed options describe."""
    return mixing.GraphSpec(
        kind=str(opts["graph"]),
        degree=int(opts["degree"]),
        p=float(opts["p"]),
        k=int(opts["k"]),
        beta=float(opts["beta"]),
        edges=tuple((str(a), str(b)) for a, b in (tuple(e) for e in opts["edges"])),
    )


def uses(spec: ModelSpec, profile: Any) -> tuple[str, ...]:
    """Every component a client's model needs for its modalities and tasks, whatever it trains."""
    out = []
    for name, comp in spec.components.items():
        if comp.kind == "encoder" and name.split(".", 1)[1] not in profile.modalities:
            continue
        if comp.kind in ("head", "prompt") and name.split(".", 1)[1] not in profile.tasks:
            continue
        out.append(name)
    return tuple(sorted(set(out) | set(spec.holds(profile))))
