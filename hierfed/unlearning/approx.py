"""Approximate unlearning (labelled approximate): gradient ascent, then repair rounds.

After the finished run, each removed client's global-scope components are pushed *up* its
own training loss for one local epoch from the original global model (plain SGD at the run's
learning rate, each step's gradient clipped to norm 1 so the ascent cannot run away); their
deltas, weighted by training rows, are added to the global model. Then the federation runs
``repair_rounds`` more rounds with the clients excluded, from the run's final checkpoint.
This follows the "gradient ascent + repair" family (e.g. Halimi et al. 2022, "Federated
Unlearning: How to Efficiently Erase a Client in FL?"); nothing about it is exact, and its
certificate says so and reports its distance to an exact replay when one is given.

Tree topologies only: it patches the root's state in the checkpoint (tier nodes take the
global components from their parent at the start of each round).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hierfed.checkpoint import atomic_write_text, load_state, nulled
from hierfed.client import task_loss
from hierfed.config import RunConfig, load_config
from hierfed.data.federation import Federation
from hierfed.errors import CheckpointError, ConfigError, HierfedError
from hierfed.resume import write_checkpoint
from hierfed.simulation import RunResult, _fingerprint, build_federation, run
from hierfed.unlearning.certificate import CERTIFICATE
from hierfed.unlearning.replay import (
    _checkpoint_rounds,
    _folder_sha256,
    _load_checkpoint,
    exclusion_config,
)
from hierfed.unlearning.verify import file_sha256, l2_per_component, membership_auc
from hierfed.update import State

ROOT_STATES = "engine.states"  # where a tree topology's checkpoint keeps each node's state


@dataclass
class ApproxResult:
    cfg: RunConfig
    removed: tuple[str, ...]
    clients: frozenset[str]
    repair_rounds: int
    result: RunResult
    wall_s: float  # ascent + repair rounds, measured
    ascent_s: float
    checkpoint_sha256: str


def ascend(cfg: RunConfig, federation: Federation, state: State, clients: Sequence[str]) -> State:
    """``state`` plus the row-weighted mean of each client's one-epoch gradient-ascent delta
    on its global-scope components (see the module docstring). ``state`` is not mutated."""
    from hierfed.runtime.worker import WorkerCore, WorkerSetup

    core = WorkerCore(WorkerSetup(cfg, federation))
    model, fed, spec = core.model, core.fed, core.spec
    total: dict[str, dict[str, torch.Tensor]] = {}
    weight = 0.0
    for c in sorted(clients):
        profile = fed.by_id[c]
        comps = [x for x in spec.holds(profile) if spec.scope_level(x) == 0 and x in state]
        data = fed.train[c]
        if not comps or len(data) == 0:
            continue
        model.load_components(state)
        params = model.set_trainable(comps)
        model.train()
        opt = torch.optim.SGD(params, lr=cfg.train.lr)
        for t, idx in core.trainer.schedule(data, profile.tasks, ("unlearn-ascent", c)):
            spec_t = model.tasks[t]
            inputs = {m: torch.from_numpy(data.inputs[m][idx]) for m in spec_t.modalities}
            y = torch.from_numpy(data.labels[t][idx])
            loss = -task_loss(spec_t, model(inputs, t), y)  # ascent: maximise their loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        after = model.component_state(comps)
        w = float(len(data))
        weight += w
        for x in comps:
            acc = total.setdefault(x, {k: torch.zeros_like(v) for k, v in state[x].items()})
            for k, v in after[x].items():
                acc[k] += w * (v.detach() - state[x][k])
    out = {x: dict(v) for x, v in state.items()}
    for x, acc in total.items():
        out[x] = {k: state[x][k] + acc[k] / weight for k in state[x]}
    return out


def unlearn_approximate(
    run_dir: str | Path,
    *,
    out: str | Path,
    clients: Sequence[str] = (),
    nodes: Sequence[str] = (),
    repair_rounds: int = 1,
    overrides: Sequence[str] = (),
) -> ApproxResult:
    """Write ``out``: gradient ascent on the removed clients' rows, then ``repair_rounds``
    rounds without them, continuing ``run_dir`` from its final checkpoint (read only)."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise HierfedError(f"'{run_dir}' is not a run folder: it has no config.yaml")
    if out.resolve() == run_dir.resolve() or (out.exists() and any(out.iterdir())):
        raise ConfigError("--out", str(out), "must be a new (or empty) folder")
    if not isinstance(repair_rounds, int) or repair_rounds < 0:
        raise ConfigError("--approximate", repair_rounds, "give the repair rounds, an integer >= 0")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if cfg.topology.name == "gossip":
        raise ConfigError(
            "--approximate", repair_rounds, "works on tree topologies; unlearn gossip runs exactly"
        )
    fed = build_federation(cfg)
    new, ids, removed = exclusion_config(cfg, fed, clients=clients, nodes=nodes, out=out)
    final = _checkpoint_rounds(run_dir).get(cfg.rounds)
    if final is None:
        raise CheckpointError(
            f"'{run_dir}' has no checkpoint of its last round {cfg.rounds}: the approximate "
            "method continues the finished run"
        )
    t0 = time.perf_counter()
    bundle = _load_checkpoint(final)
    states = bundle["topology"][ROOT_STATES]
    roots = [n for n in states if "/" not in n]
    if len(roots) != 1:
        raise CheckpointError(f"{final}: cannot tell the root among {sorted(states)[:4]}")
    states[roots[0]] = ascend(cfg, fed, states[roots[0]], sorted(removed))
    ascent_s = time.perf_counter() - t0
    for path in ("clients.local", "clients.privacy", "clients.codec"):  # their own state too
        held = bundle["topology"].get(path, {})
        for c in removed & set(held):
            del held[c]
    approx_cfg = replace(new, rounds=cfg.rounds + repair_rounds)
    write_checkpoint(
        out, cfg.rounds, {**bundle, "config": _fingerprint(approx_cfg)}, approx_cfg.checkpoint.keep
    )
    result = run(approx_cfg, resume=True)
    return ApproxResult(
        approx_cfg,
        ids,
        removed,
        repair_rounds,
        result,
        time.perf_counter() - t0,
        ascent_s,
        _folder_sha256(final),
    )


def certify_approximate(
    res: ApproxResult, original: str | Path, *, exact_dir: str | Path | None, mia: bool = True
) -> dict[str, Any]:
    """Write ``unlearning.json`` (``"method": "approximate"``) into the approximate run's
    folder: distances to the original and (given ``exact_dir``) to the exact replay."""
    original, out = Path(original), Path(res.cfg.out or ".")
    orig, _ = load_state(original / "final_state")
    approx, _ = load_state(out / "final_state")
    states = {"original": orig, "approximate": approx}
    dist = {"approximate_vs_original": l2_per_component(orig, approx)}
    if exact_dir is not None:
        exact, _ = load_state(Path(exact_dir) / "final_state")
        states["exact"] = exact
        dist["approximate_vs_exact"] = l2_per_component(exact, approx)
        dist["exact_vs_original"] = l2_per_component(orig, exact)
    cert: dict[str, Any] = {
        "method": "approximate",
        "approximation": "gradient ascent on the removed clients' rows (1 epoch, clip 1), "
        f"then {res.repair_rounds} repair rounds without them; NOT bit-identical to a retrain",
        "removed": list(res.removed),
        "removed_clients": sorted(res.clients),
        "original_run": {
            "dir": str(original),
            "final_state_sha256": file_sha256(original / "final_state.safetensors"),
        },
        "continued_from": {
            "round": res.cfg.rounds - res.repair_rounds,
            "sha256": res.checkpoint_sha256,
        },
        "repair_rounds": res.repair_rounds,
        "config": {"fingerprint": _fingerprint(res.cfg), "exclude": list(res.cfg.exclude)},
        "final_state_sha256": file_sha256(out / "final_state.safetensors"),
        "compute": {"wall_s": res.wall_s, "ascent_s": res.ascent_s},
        "verification": {
            "l2_distance": dist,
            "l2_distance_total": {
                k: math.sqrt(sum(v * v for v in d.values())) for k, d in dist.items()
            },
        },
    }
    if mia:
        cert["verification"]["membership_inference"] = membership_auc(
            load_config(out / "config.yaml"), build_federation(res.cfg), states, res.clients
        )
    cert = nulled(cert)
    atomic_write_text(out / CERTIFICATE, json.dumps(cert, indent=1, sort_keys=True))
    return cert


__all__ = ["ApproxResult", "ascend", "certify_approximate", "unlearn_approximate"]
