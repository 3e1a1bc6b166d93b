"""The engine rebuild changes no result: final states, ledgers and clocks pinned.

Each case runs a small federation on the local runtime with a fixed seed and hashes what a
run produces that a refactor must not move: the final global state (every tensor's bytes),
the ledger (every record), the simulated time of every round and the privacy reports. The
expected digests were recorded on e6e945c, the commit before the Channel and round-context
rebuild (issue 12); a change to any of them is a change of result and needs its own reason.
Regenerate only for an intended change of result:

    .venv/bin/python -m tests.test_engine_pinned
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "configs"

# name -> (config file or None, topology or None, overrides beyond the tiny federation)
CASES: dict[str, tuple[str | None, str | None, dict[str, object]]] = {
    "star": (None, "star", {}),
    "hierarchical": (None, "hierarchical", {"rounds": 3}),
    "four-tier": (
        "four-tier.yaml",
        None,
        {"data.name": "edu-synth", "data.num_institutions": 4, "rounds": 2},
    ),
    "leaf-gossip": ("leaf-gossip.yaml", None, {"rounds": 2}),
    "gossip-ring": (None, "gossip", {"topology.options.graph": "ring", "rounds": 2}),
    "stragglers": ("stragglers.yaml", None, {}),
    "stragglers-late": ("stragglers.yaml", None, {"topology.tiers.institution.deadline_s": 0.25}),
    "inner-peers": (
        None,
        "hierarchical",
        {
            "topology.tiers.institution.peer_steps": 1,
            "topology.tiers.institution.peer_graph": "complete",
        },
    ),
    "robust-median": (
        None,
        "hierarchical",
        {
            "attack.name": "sign_flip",
            "attack.fraction": 0.3,
            "topology.tiers.institution.aggregator": "median",
        },
    ),
    "gossip-late": (
        None,
        "gossip",
        {
            "topology.tiers.global.dropout": 0.2,
            "topology.tiers.global.deadline_s": 0.15,
            "topology.options.steps": 2,
        },
    ),
    "star-dpsgd": (
        None,
        "star",
        {"privacy.policies.p.epsilon": 8.0, "privacy.default": "p", "rounds": 3},
    ),
}

PINNED: dict[str, str] = {
    "four-tier": "55e4b5da05d01f00d73e07aa4b2e23f05ae0d86e39fbcb290f663d2a2d6bef78",
    "gossip-late": "20299ff1cd03edc809bdffa28d1bd660b85109950bee5da00654b4e7a6b38bbe",
    "gossip-ring": "636843065b5be7b2f7ab189063bbc76e3f6be190882ad7b5ca1fd7ad53d3633f",
    "hierarchical": "d13ddf1583006c9989fee2279a227a1a561563bba7d71df04d798781e409ca40",
    "inner-peers": "7e54dd264f6c9d5b7866a1d92afedafd0d7f0d1017732a6f7f9f5cee2491794d",
    "leaf-gossip": "5c41d38cb2c6d1704e7d99649d58de0ac19ed7d4809832a510965d727d81e8fd",
    "robust-median": "77b45ffe13ad362a92774b850bfba805565370f10320592a44f895ec1616f319",
    "star": "4fc27aa2dfaca88246f91d79d59ba8b0d01cd2693dd8b1c72a7bf7ff0a55a6ea",
    "star-dpsgd": "fe63d1a17215a8019c895abb543a4ae284ac784fa2356d56e0d24748bb4255b7",
    "stragglers": "bc31ca7f269a48ac9fc2963959bb70eed8250c0469096a515d158bb799dad57f",
    "stragglers-late": "702ce454cbc91073a85d0f2773bdd66a5b628c05b43e7e48b9c1143c448622e6",
}


def _overrides(name: str) -> tuple[str | None, str | None, list[str]]:
    path, topology, extra = CASES[name]
    return (
        str(EXAMPLES / path) if path else None,
        topology,
        tiny_overrides(**{"runtime.name": "local", **extra}),
    )


def digest(name: str) -> str:
    """sha256 over the final state, the ledger, the clock and the privacy reports of one case."""
    from hierfed.config import load_config
    from hierfed.simulation import run

    path, topology, overrides = _overrides(name)
    cfg = load_config(path, overrides, topology=topology)
    result = run(cfg, write=False)
    h = hashlib.sha256()
    for comp in sorted(result.final_state):
        for param in sorted(result.final_state[comp]):
            t = result.final_state[comp][param].detach().contiguous().cpu()
            h.update(f"{comp}/{param}/{t.dtype}".encode())
            h.update(np.ascontiguousarray(t.numpy()).tobytes())
    for r in result.ledger.records:
        h.update(repr(tuple(r.__dict__.values())).encode())
    for rec in result.metrics:
        kept = {
            k: v
            for k, v in rec.items()
            if k in ("round", "sim_time_s", "participants", "dropped", "late", "rejected")
            or k.startswith("dp_")
            or k == "global"
        }
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_engine_rebuild_changes_no_result(name):
    assert name in PINNED, f"no pinned digest for {name}; regenerate (module docstring)"
    assert digest(name) == PINNED[name]


if __name__ == "__main__":  # print the table to paste into PINNED
    for case in sorted(CASES) if len(sys.argv) < 2 else sys.argv[1:]:
        print(f'    "{case}": "{digest(case)}",', flush=True)
