"""Benchmark suites: a YAML file listing configurations to compare on the same seeds.

Format::

    name: topologies
    description: star vs hierarchical vs gossip on the default data
    seeds: [0, 1, 2]
    target: {metric: mean, value: 0.7}   # held-out metric to reach: "mean" over tasks or a task name
    runtime: ray                           # ray (one Ray session for the whole suite) | local
    base:                                  # overrides applied to every configuration
      rounds: 8
    configurations:
      - name: star
        topology: star
      - name: hier-k2
        topology: hierarchical
        overrides: {topology.tiers.institution.local_rounds: 2}

Every configuration runs through ``hierfed.config.load_config`` + ``hierfed.simulation.run``,
exactly as ``python -m hierfed run --topology T key=value ...`` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hierfed.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    topology: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    seeds: tuple[int, ...]
    target_metric: str
    target_value: float
    runtime: str
    base: dict[str, Any]
    entries: tuple[Entry, ...]

    def overrides(self, entry: Entry, seed: int) -> list[str]:
        """``key=value`` strings for one run: base, then the entry's, then the seed and runtime."""
        merged = {**self.base, **entry.overrides, "seed": seed, "runtime.name": self.runtime}
        return [f"{k}={_fmt(v)}" for k, v in merged.items()]


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys (``{train: {lr: 0.1}}`` -> ``{"train.lr": 0.1}``)."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def load_suite(path: str | Path) -> Suite:
    """Parse and check a suite file; raises ConfigError naming the key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            "suite",
            str(path),
            "no such file; give a YAML suite such as benchmarks/suites/smoke.yaml",
        )
    raw = yaml.safe_load(p.read_text()) or {}
    known = {"name", "description", "seeds", "target", "runtime", "base", "configurations"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"suite.{unknown[0]}", raw[unknown[0]], f"known keys: {sorted(known)}")
    seeds = raw.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and s >= 0 for s in seeds)
    ):
        raise ConfigError("suite.seeds", seeds, "a non-empty list of integers >= 0, e.g. [0, 1, 2]")
    target = raw.get("target", {}) or {}
    if not isinstance(target.get("value", 0.0), (int, float)):
        raise ConfigError("suite.target.value", target.get("value"), "a number, e.g. 0.7")
    runtime = raw.get("runtime", "ray")
    if runtime not in ("ray", "local"):
        raise ConfigError("suite.runtime", runtime, "known: ray, local")
    entries = []
    names = set()
    for i, e in enumerate(raw.get("configurations") or []):
        if not isinstance(e, dict) or "name" not in e or "topology" not in e:
            raise ConfigError(
                f"suite.configurations[{i}]", e, "each configuration needs `name` and `topology`"
            )
        if e["name"] in names:
            raise ConfigError(
                f"suite.configurations[{i}].name", e["name"], "configuration names must be unique"
            )
        names.add(e["name"])
        extra = sorted(set(e) - {"name", "topology", "overrides"})
        if extra:
            raise ConfigError(
                f"suite.configurations[{i}].{extra[0]}",
                e[extra[0]],
                "known keys: name, topology, overrides",
            )
        entries.append(Entry(str(e["name"]), str(e["topology"]), _flat(e.get("overrides") or {})))
    if not entries:
        raise ConfigError("suite.configurations", None, "list at least one configuration")
    return Suite(
        name=str(raw.get("name", p.stem)),
        description=str(raw.get("description", "")),
        seeds=tuple(seeds),
        target_metric=str(target.get("metric", "mean")),
        target_value=float(target.get("value", 0.5)),
        runtime=runtime,
        base=_flat(raw.get("base") or {}),
        entries=tuple(entries),
    )
