"""TensorBoard tracking: the event files of a run read back with tensorboard's own reader."""

from __future__ import annotations

import json

import pytest

from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.simulation import run
from hierfed.tracking import institution_epsilons, round_scalars
from tests.conftest import tiny_overrides

pytest.importorskip("tensorboard")


def test_round_scalars_of_a_hand_made_record():
    rec = {
        "round": 2,
        "global": {"digit": 0.5},
        "train_loss": 0.25,
        "participants": 3,
        "rejected": 1,
        "bytes": {"student->institution": 100, "institution->global": 40},
        "bytes_total": 140,
        "sim_time_s": 1.5,
        "sim_time_total_s": 3.0,
        "wall_s": 0.1,
        "consensus_distance": 0.125,
        "node_metric_worst": {"digit": 0.1},  # not a number: not a scalar
        "dp_sample": {
            "clients": {
                "global/inst-00/s-0": {"epsilon": 1.0, "delta": 1e-5},
                "global/inst-00/s-1": {"epsilon": 3.0, "delta": 1e-5},
                "global/inst-02/s-0": {"epsilon": 2.0, "delta": 1e-5},
            },
            "max_epsilon": 3.0,
        },
        "dp_client": {"global": {"epsilon": 0.75}},
    }
    assert round_scalars(rec) == {
        "eval/global/digit": 0.5,
        "train/loss": 0.25,
        "clients/participants": 3.0,
        "clients/rejected": 1.0,
        "bytes/student->institution": 100.0,
        "bytes/institution->global": 40.0,
        "bytes/total": 140.0,
        "time/sim_round_s": 1.5,
        "time/sim_total_s": 3.0,
        "time/wall_s": 0.1,
        "privacy/epsilon/inst-00": 3.0,
        "privacy/epsilon/inst-02": 2.0,
        "privacy/max_epsilon": 3.0,
        "privacy/client_level/global": 0.75,
        "topology/consensus_distance": 0.125,
    }
    assert institution_epsilons(rec["dp_sample"])["inst-00"] == {
        "epsilon": 3.0,
        "delta": 1e-5,
        "clients": 2,
    }


def test_a_two_round_run_writes_the_expected_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "rounds": 2,
                "logging.tensorboard": True,
                "privacy.policies.p.epsilon": 8.0,
                "privacy.assign": "{global/inst-01/*: p}",
            }
        ),
        topology="hierarchical",
        out=str(out),
    )
    res = run(cfg)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()

    def series(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for task in sorted(res.final_metrics):
        assert series(f"eval/global/{task}") == [
            (r["round"], pytest.approx(r["global"][task], abs=1e-6)) for r in metrics
        ]
    for edge, total in res.ledger.by_edge().items():
        per_round = series(f"bytes/{edge}")
        assert [s for s, _ in per_round] == [1, 2]
        assert sum(v for _, v in per_round) == total  # the ledger's bytes, round by round
    assert series("clients/participants") == [(1, 9.0), (2, 9.0)]
    assert series("clients/rejected") == [(1, 0.0), (2, 0.0)]
    assert series("time/sim_total_s") == [
        (r["round"], pytest.approx(r["sim_time_total_s"], rel=1e-6)) for r in metrics[1:]
    ]
    eps = max(r["epsilon"] for r in metrics[2]["dp_sample"]["clients"].values())
    assert series("privacy/epsilon/inst-01")[-1] == (2, pytest.approx(eps, rel=1e-6))
    assert not any(t.startswith("privacy/epsilon/inst-00") for t in acc.Tags()["scalars"])


def test_tensorboard_is_off_by_default_and_its_folder_needs_it_on():
    from dataclasses import replace

    from hierfed.config import LoggingConfig
    from hierfed.simulation import _fingerprint

    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local", "rounds": 1}))
    assert cfg.logging.tensorboard is False
    # tracking changes no result: a run may be resumed with it switched on or off
    on = replace(cfg, logging=LoggingConfig(tensorboard=True))
    assert _fingerprint(on) == _fingerprint(cfg)
    assert _fingerprint(replace(cfg, rounds=2)) != _fingerprint(cfg)
    with pytest.raises(ConfigError, match="logging.tensorboard_dir"):
        load_config(None, ["logging.tensorboard_dir=/tmp/x"])


def test_a_resumed_run_logs_every_round_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Stop(Exception):
        pass

    def stop_in_round_2(kind, data):
        if kind == "round" and data["round"] == 2:  # logged, not yet checkpointed
            raise Stop

    out = tmp_path / "run"
    overrides = tiny_overrides(
        **{"runtime.name": "local", "rounds": 3, "logging.tensorboard": True}
    )
    cfg = load_config(None, overrides, topology="star", out=str(out))
    with pytest.raises(Stop):
        run(cfg, on_event=stop_in_round_2)
    res = run(cfg, resume=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["round"], pytest.approx(r["train_loss"])) for r in res.metrics[1:]]
    assert [s for s, _ in losses] == [1, 2, 3]
