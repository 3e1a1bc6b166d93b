"""Config checks of a continual run, before any worker or model starts (one line each:
key, value, fix). Called from ``hierfed.config_checks`` (``validate_config`` and
``check_federation``)."""

from __future__ import annotations

from hierfed.config_schema import RunConfig
from hierfed.continual.schedule import Schedule, check_syntax, continual_on
from hierfed.data.federation import Federation
from hierfed.errors import ConfigError


def check_continual_config(cfg: RunConfig) -> None:
    """What needs no federation: window shapes and rounds, mitigation values, DP-SGD."""
    if not continual_on(cfg):
        return
    check_syntax(cfg)
    c = cfg.continual
    if cfg.privacy.default or cfg.privacy.assign:
        raise ConfigError(
            "continual",
            "schedule with privacy",
            "DP-SGD clients do not follow a continual schedule yet; drop privacy.default/assign "
            "or the continual section",
        )
    closes = any(isinstance(v, (list, tuple)) and len(v) == 2 for v in c.tasks.values()) or any(
        isinstance(v, (list, tuple)) and len(v) == 2
        for over in c.nodes.values()
        for v in dict(over.get("tasks", {})).values()
    )
    for key, on in (("ewc", c.ewc > 0), ("replay", c.replay)):
        if on and not closes:
            raise ConfigError(
                f"continual.{key}",
                getattr(c, key),
                "acts on old tasks, whose data window closed; give a task a window [N, M] "
                "(e.g. continual.tasks={t1: [1, 5], t2: 5})",
            )


def check_continual_federation(cfg: RunConfig, federation: Federation) -> None:
    """Names against the federation, a tree topology, and someone training in every round."""
    if not continual_on(cfg):
        return
    from hierfed.engine.tree import TreeTopology
    from hierfed.registry import TOPOLOGIES

    if not issubclass(TOPOLOGIES.get(cfg.topology.name), TreeTopology):
        raise ConfigError(
            "topology.name",
            cfg.topology.name,
            "continual schedules run on tree topologies (star, hierarchical); drop the "
            "continual section or pick one of them",
        )
    tiers = TOPOLOGIES.get(cfg.topology.name).tree(federation)[1]
    if cfg.continual.old_scope and cfg.continual.old_scope not in tiers[1:]:
        raise ConfigError(
            "continual.old_scope",
            cfg.continual.old_scope,
            f"give a tier of this tree below the root: {list(tiers[1:])} ('' = off)",
        )
    sch = Schedule(cfg, federation)
    ids = [c.id for c in federation.clients]
    for rnd in range(1, cfg.rounds + 1):
        if not any(sch.trains(cid, rnd) for cid in ids):
            raise ConfigError(
                "continual",
                f"round {rnd}",
                "no client is present with a task that has data in this round; shift a "
                "window, join or leave so that every round trains someone",
            )
