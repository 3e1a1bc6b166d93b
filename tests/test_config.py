"""Bad configuration fails before any work starts, naming the key, the value and the fix."""

from __future__ import annotations

import pytest

from hierfed.config import RunConfig, load_config, to_yaml
from hierfed.errors import ConfigError


def test_defaults_load_and_roundtrip_through_yaml(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.topology.name == "hierarchical"
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 7\ntopology:\n  tiers:\n    institution:\n      local_rounds: 3\n")
    cfg = load_config(path, ["rounds=2"], topology="star")
    assert cfg.rounds == 2
    assert cfg.topology.name == "star"
    assert cfg.tier("institution").local_rounds == 3
    assert cfg.tier("global").local_rounds == 1  # unlisted tiers take topology.default


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rounds=-1"], "rounds"),
        (["rounds=0"], "rounds"),
        (["topology.default.participation=0"], "participation"),
        (["topology.default.participation=1.5"], "participation"),
        (["topology.tiers.institution.participation=nan"], "participation"),
        (["train.lr=nan"], "train.lr"),
        (["train.lr=-0.1"], "train.lr"),
        (["topology.name=nosuch"], "topology.name"),
        (["topology.tiers.global.aggregator=medain"], "aggregator"),
        (["data.name=nosuch"], "data.name"),
        (["runtime.name=spark"], "runtime.name"),
        (["runtime.chunks_per_worker=0"], "runtime.chunks_per_worker"),
        (["model.num_heads=3"], "model.num_heads"),
        (["train.optimizer=lbfgs"], "train.optimizer"),
    ],
)
def test_out_of_range_and_unknown_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert key in str(info.value)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="roundz"):
        load_config(None, ["roundz=3"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="rounds"):
        load_config(None, ["rounds=many"])


def test_override_without_equals_sign_explains_the_form():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])


def test_unknown_aggregator_message_lists_known_names():
    with pytest.raises(ConfigError, match="known: .*weighted_mean"):
        load_config(None, ["topology.default.aggregator=medain"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/nonexistent/x.yaml")


def test_errors_survive_pickling_with_their_fields():
    """Errors cross process boundaries (a Ray worker builds the model): they must come back
    as the same class with the same fields and message."""
    import pickle

    from hierfed.errors import NodeFailure, UpdateRejected

    for err in (
        ConfigError("model.lora_targets", ["x"], "name a linear layer"),
        UpdateRejected("global/a/s-1", "shape (2,) != expected (3,)"),
        NodeFailure("worker", 3, "it died"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
        assert vars(back) == vars(err)
