"""Hostile configs end in one line naming the key and the fix, never a traceback, and
defences that would be silently off are refused (issue 13, items 6 and 7)."""

from __future__ import annotations

import pytest

from hierfed.cli import main
from hierfed.config import load_config
from hierfed.errors import ConfigError
from tests.conftest import tiny_overrides


def _one_error_line(capsys) -> str:
    out = capsys.readouterr().out.strip().splitlines()
    errors = [x for x in out if x.startswith("error:")]
    assert len(errors) == 1 and out[-1] == errors[0], out
    assert "'?'" not in errors[0] and "Traceback" not in "\n".join(out)
    return errors[0]


FILES = {
    "unparsable": (b"rounds: [\n", "not valid YAML"),
    "a list": (b"[1, 2]\n", "must hold a YAML mapping"),
    "a scalar": (b"5\n", "must hold a YAML mapping"),
    "not utf-8": (b"rounds: 3\n\xff\xfe\n", "not UTF-8"),
    "a list for a section": (b"data: [1]\n", "DataConfig"),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_hostile_config_file_is_one_line(tmp_path, capsys, case):
    content, needle = FILES[case]
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert main(["show-config", "--config", str(path)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: config key '--config'") and needle in line


OVERRIDES = [
    (["rounds=[1,2"], "rounds", "not valid YAML"),
    (["data.name={a"], "data.name", "not valid YAML"),
    (["topology.tiers=[1,2]"], "topology.tiers", "incompatible"),
    (["topology.tiers.institution=5"], "topology.tiers.institution", "TierConfig"),
    (["data.options=[1]"], "data.options", "incompatible"),
    (
        [
            "topology.tiers.institution.postprocess=[clip]",
            "topology.tiers.institution.postprocess_options.clip=[1]",
        ],
        "topology.tiers.institution.postprocess_options.clip",
        "must be a mapping",
    ),
    (["runtime.faults=[sleep:c:abc]"], "runtime.faults", "sleep:<client>:<seconds>"),
    (["runtime.faults=[kill-worker:x:c]"], "runtime.faults", "kill-worker:<round>"),
    (["runtime.faults=['raise:']"], "runtime.faults", "raise:<client>"),
    (["runtime.faults=[raise:]"], "runtime.faults", "not valid YAML"),
    (["runtime.faults=5"], "runtime.faults", "Invalid"),
    (["model.prompt_tokens=60"], "model.prompt_tokens", "model.max_tokens=48"),
    (["rounds=1e999"], "rounds", "Integer"),
    (["=3"], "=3", "key=value"),
    (["data.name=x[/]"], "data.name", "unknown dataset 'x[/]'"),  # rich markup, printed as is
    (["data.name=[bold]x"], "data.name", "[bold]x"),
    (
        ["topology.name=gossip", "topology.options.time_varying=true"],
        "topology.options.time_varying",
        "graph 'ring' is fixed",
    ),
    (
        [
            "topology.name=gossip",
            "topology.options.graph=edges",
            "topology.options.time_varying=true",
        ],
        "topology.options.time_varying",
        "graph 'edges' is fixed",
    ),
]


@pytest.mark.parametrize(("overrides", "key", "needle"), OVERRIDES)
def test_a_hostile_override_is_one_line_naming_the_key(capsys, overrides, key, needle):
    assert main(["show-config", *overrides]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: config key '{key}'"), line
    assert needle in line


def test_gossip_time_varying_on_a_random_graph_is_accepted():
    cfg = load_config(
        None,
        ["topology.options.graph=erdos_renyi", "topology.options.time_varying=true"],
        topology="gossip",
    )
    assert cfg.topology.options["time_varying"] is True


RUN_REFUSALS = [
    # a typo in a tier name used to leave the real tier on weighted_mean, silently
    ({"topology.tiers.instituion.aggregator": "median"}, "topology.tiers.instituion", "instituion"),
    ({"topology.tiers.course.quorum": 0.5}, "topology.tiers.course", "its tiers are"),
    # a tier the topology does not have: star has no institution tier
    (
        {"topology.name": "star", "topology.tiers.institution.aggregator": "median"},
        "topology.tiers.institution",
        "its tiers are ['global', 'student']",
    ),
    ({"attack.name": "sign_flip", "attack.tier": "school"}, "attack.tier", "school"),
    # the prompt plus the essay's 16 text tokens do not fit 48 tokens: used to fail in forward
    ({"model.prompt_tokens": 40}, "model.prompt_tokens", "needs 56 tokens"),
    # 3 students per institution: floor(0.2 x 3) = 0, a plain mean under a robust name
    (
        {"topology.tiers.institution.aggregator": "trimmed_mean"},
        "topology.tiers.institution.options.trim",
        "trims floor(trim x n) = 0",
    ),
]


@pytest.mark.parametrize(("over", "key", "needle"), RUN_REFUSALS)
def test_silently_off_settings_are_refused_before_training(tmp_path, capsys, over, key, needle):
    args = tiny_overrides(**{"runtime.name": "local", **over})
    assert main(["run", "--quiet", "--out", str(tmp_path / "r"), *args]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: config key '{key}'"), line
    assert needle in line
    assert not (tmp_path / "r" / "checkpoints").exists()  # no round ran


def test_trimmed_mean_that_trims_is_accepted(tiny_cfg):
    from hierfed.aggregators.robust import TrimmedMean

    TrimmedMean.check_fanout({"trim": 0.34}, 3, "k")  # floor(0.34 x 3) = 1 per end
    TrimmedMean.check_fanout({"trim": 0.0}, 3, "k")  # asked for a plain mean explicitly
    with pytest.raises(ConfigError, match=r"raise trim to >= 0\.333"):
        TrimmedMean.check_fanout({"trim": 0.2}, 3, "k")
