"""Interpretability and equity (hierfed/explain/): known answers on tiny models and updates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hierfed.clock import Clock
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.explain.attribution import component_ablation, modality_attribution
from hierfed.explain.contribution import (
    leave_one_out,
    loo_influence,
    loo_values,
    shapley_exact,
    shapley_permutations,
)
from hierfed.explain.equity import equity_metrics, gap, light_share
from hierfed.explain.rebuild import ExplainError, rebuild
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model
from hierfed.simulation import build_federation
from hierfed.update import Update
from tests.conftest import tiny_overrides

# ---------------------------------------------------------------- attribution


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local"}))
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    client = next(c for c in fed.clients if "essay_grade" in c.tasks)
    return cfg, fed, model, fed.test[client.id]


def test_a_modality_the_model_ignores_gets_zero_attribution(tiny):
    cfg, fed, model, data = tiny
    state = model.component_state()
    try:
        with torch.no_grad():  # the tabular tokens no longer depend on the features
            model.encoders["tabular"].proj.weight.zero_()
        attrs, delta = modality_attribution(model, data, "essay_grade", n_steps=16)
        assert np.abs(attrs["tabular"]).max() == 0.0
        assert np.abs(attrs["text"]).max() > 1e-4  # the other modality still carries the answer
        assert np.abs(delta).max() < 1e-3
    finally:
        model.load_components(state)


def test_attributions_sum_to_the_output_change(tiny):
    """Completeness: per row, the modalities' attributions add up to F(x) minus F with every
    encoder at its baseline output (the error is the integral's, small at 64 steps)."""
    cfg, fed, model, data = tiny
    attrs, delta = modality_attribution(model, data, "essay_grade", n_steps=64)
    total = attrs["text"] + attrs["tabular"]
    assert np.abs(total).max() > 1e-3  # not a trivially zero explanation
    assert np.abs(delta).max() < 1e-3 * max(1.0, np.abs(total).max())


def test_component_ablation_drops_only_what_a_component_carries(tiny):
    cfg, fed, model, data = tiny
    initial = model.component_state()
    final = {c: {p: t.clone() for p, t in ps.items()} for c, ps in initial.items()}
    # a trained dropout_risk head that always answers class 1
    final["head.dropout_risk"]["bias"] = torch.tensor([-50.0, 50.0])
    cid = next(c.id for c in fed.clients if "dropout_risk" in c.tasks)
    rows = {cid: fed.test[cid]}
    drops = component_ablation(
        model, final, initial, rows, {cid: fed.by_id[cid].tasks}, components=None
    )
    try:
        share_one = float((fed.test[cid].labels["dropout_risk"] == 1).mean())
        model.load_components(initial)
        from hierfed.explain.scoring import row_scores

        untrained = row_scores(model, fed.test[cid], "dropout_risk").mean()
    finally:
        model.load_components(initial)
    head = drops["head.dropout_risk"][cid]
    assert set(head) == {"dropout_risk"}  # no other task reads that head
    assert head["dropout_risk"].mean() == pytest.approx(share_one - untrained)
    # components left at their initial value cost nothing when "ablated"
    assert all(np.all(v == 0) for v in drops["head.digit"].get(cid, {}).values())
    assert np.all(drops["encoder.text"][cid]["essay_topic"] == 0)


def test_a_state_that_does_not_fit_the_config_is_a_clear_error(tiny):
    cfg, fed, model, data = tiny
    state = model.component_state()
    state.pop("head.digit")
    with pytest.raises(ExplainError, match="missing \\['head.digit'\\]"):
        rebuild(cfg, fed, state)
    state = model.component_state()
    state["head.digit"]["bias"] = torch.zeros(3)
    with pytest.raises(ExplainError, match="'head.digit/bias' has shape \\(3,\\)"):
        rebuild(cfg, fed, state)


# ---------------------------------------------------------------- contribution


def _upd(sender, comps, w):
    return Update.from_delta(
        {c: {"w": torch.tensor(v, dtype=torch.float64)} for c, v in comps.items()},
        w,
        sender=sender,
        round=1,
        num_samples=int(w),
    )


def test_leave_one_out_equals_the_merge_without_the_sender():
    ups = [
        _upd("a", {"head.t": [1.0, 2.0], "enc.x": [5.0]}, 2.0),
        _upd("b", {"head.t": [4.0, -1.0]}, 3.0),
        _upd("c", {"head.t": [0.5, 0.5], "enc.y": [7.0]}, 1.0),
    ]
    merged = Update.sum(ups)
    for k, share in enumerate(ups):
        rest = Update.sum([u for i, u in enumerate(ups) if i != k])
        loo = leave_one_out(merged, share)
        assert set(loo.tensors) == set(rest.tensors)  # a sole holder's component leaves too
        assert loo.weights == pytest.approx(rest.weights)
        for c, ps in rest.mean().items():
            assert torch.allclose(loo.mean()[c]["w"], ps["w"], atol=1e-12)
        assert loo.meta.senders == rest.meta.senders
    # at a higher tier: an institution's share of the global merge
    inst1, inst2 = Update.sum(ups[:2]), ups[2]
    top = Update.sum([inst1, inst2])
    assert torch.allclose(
        leave_one_out(top, inst1).mean()["head.t"]["w"], inst2.mean()["head.t"]["w"]
    )
    # by hand: without b, head.t = (2*[1,2] + 1*[0.5,0.5]) / 3
    infl = loo_influence(merged, ups)
    full = torch.tensor([(2 + 12 + 0.5) / 6, (4 - 3 + 0.5) / 6], dtype=torch.float64)
    no_b = torch.tensor([2.5 / 3, 4.5 / 3], dtype=torch.float64)
    assert infl["b"] == pytest.approx(float((full - no_b).norm()))


def _sum_utility(merged):
    """Additive game: the pre-weighted sum of every tensor (a coalition's value is the sum
    of its members' values)."""
    if merged is None:
        return 0.0
    return float(sum(t.sum() for ps in merged.tensors.values() for t in ps.values()))


def test_shapley_of_an_additive_game_is_each_senders_own_value():
    ups = [
        _upd("a", {"h": [1.0]}, 1.0),
        _upd("b", {"h": [2.0]}, 2.0),
        _upd("c", {"h": [-1.0]}, 3.0),
    ]
    exact = shapley_exact(ups, _sum_utility)
    assert exact.values == pytest.approx({"a": 1.0, "b": 4.0, "c": -3.0})
    mc = shapley_permutations(ups, _sum_utility, permutations=5, seed=0)
    assert mc.values == pytest.approx({"a": 1.0, "b": 4.0, "c": -3.0})
    assert max(mc.stderr.values()) < 1e-12
    assert loo_values(Update.sum(ups), ups, _sum_utility) == pytest.approx(exact.values)


def test_sampled_shapley_lies_within_its_stated_error_of_the_exact_values():
    # a non-additive game: utility of the merged mean (diminishing returns)
    ups = [
        _upd(s, {"h": [x]}, w)
        for s, x, w in [("a", 1.0, 1.0), ("b", 3.0, 2.0), ("c", -2.0, 1.0), ("d", 0.5, 4.0)]
    ]

    def util(m):
        return 0.0 if m is None else -float((m.mean()["h"]["w"] - 1.0).pow(2).sum())

    exact = shapley_exact(ups, util)
    # efficiency: the values add up to U(all) - U(nobody)
    assert sum(exact.values.values()) == pytest.approx(util(Update.sum(ups)) - util(None))
    mc = shapley_permutations(ups, util, permutations=400, seed=1)
    for s in exact.values:
        assert mc.stderr[s] > 0
        assert abs(mc.values[s] - exact.values[s]) < 4 * mc.stderr[s]
    again = shapley_permutations(ups, util, permutations=400, seed=1)
    assert again.values == mc.values  # keyed: same seed, same estimate


# ---------------------------------------------------------------- equity


def test_gap_by_hand():
    g = gap({"u1": 0.5, "u2": 0.9, "u3": 0.7})
    assert g["max_minus_min"] == pytest.approx(0.4)
    assert (g["worst"], g["worst_value"], g["best"]) == ("u1", 0.5, "u2")
    assert g["std"] == pytest.approx(math.sqrt(((0.2) ** 2 + 0.2**2 + 0) / 3))


def test_equity_pools_rows_per_unit_and_group_by_hand(tiny):
    cfg, fed, model, data = tiny
    # hand-made scores: every row of inst-00 right, every row of inst-01 wrong on dropout_risk
    scores = {}
    for c in fed.clients:
        if "dropout_risk" not in c.tasks:
            continue
        n = len(fed.test[c.id])
        hit = 1.0 if "/inst-00/" in c.id else 0.0
        scores[c.id] = {"dropout_risk": np.full(n, hit)}
    eq = equity_metrics(fed, scores)
    assert eq["unit_tier"] == "institution"
    assert eq["by_unit"]["dropout_risk"] == {"global/inst-00": 1.0, "global/inst-01": 0.0}
    assert eq["gaps"]["unit"]["dropout_risk"]["max_minus_min"] == 1.0
    # per group: the pooled hit rate of the rows in each access group
    rows = {"scanner": [0, 0], "no_scanner": [0, 0]}
    for cid, s in scores.items():
        for v, hit in zip(fed.test[cid].groups["access"], s["dropout_risk"]):
            rows[str(v)][0] += hit
            rows[str(v)][1] += 1
    want = {k: a / n for k, (a, n) in rows.items() if n}
    assert eq["by_group"]["access"]["dropout_risk"] == pytest.approx(want)
    with pytest.raises(ExplainError, match="unknown group column 'gender'.*known: access"):
        equity_metrics(fed, scores, columns=["gender"])


def test_light_share_by_hand(tiny):
    cfg, fed, model, data = tiny
    a, b = fed.clients[0], fed.clients[1]
    from dataclasses import replace

    fed2 = replace(fed, clients=[replace(a, resource="light"), *fed.clients[1:]])
    led = CommLedger()
    for rnd, src in [(1, a.id), (1, b.id), (2, b.id)]:
        led.record(
            round=rnd,
            src=src,
            dst="global/inst-00",
            edge="student->institution",
            direction="up",
            sizes={"head.x": 10},
        )
    led.record(
        round=1,
        src="global/inst-00",
        dst="global",
        edge="institution->global",
        direction="up",
        sizes={"head.x": 10},
    )  # not a client: not counted
    share = light_share(fed2, led)
    want = a.num_train / (a.num_train + 2 * b.num_train)
    assert share["light_training_share"] == pytest.approx(want)
    assert share["light_clients"] == 1


# ---------------------------------------------------------------- clock


def test_resource_classes_slow_the_clock_only_when_asked():
    over = tiny_overrides(
        **{"data.options.resource_mix.light": 0.5, "data.options.resource_mix.full": 0.5}
    )
    base = load_config(None, over)
    slow = load_config(
        None, [*over, "clock.resource_speed.light=0.25", "clock.resource_bandwidth.light=0.5"]
    )
    fed = build_federation(base)
    c0, c1 = Clock(base, fed), Clock(slow, fed)
    light = next(c.id for c in fed.clients if c.resource == "light")
    full = next(c.id for c in fed.clients if c.resource == "full")
    assert c1.speed(light) == pytest.approx(0.25 * c0.speed(light))
    assert c1.speed(full) == c0.speed(full)
    assert c1.link(light)[0] == pytest.approx(0.5 * c0.link(light)[0])
    assert c1.link(light)[1] == c0.link(light)[1]  # latency untouched
    with pytest.raises(ConfigError, match="clock.resource_speed.tiny"):
        load_config(None, [*over, "clock.resource_speed.tiny=0.5"])


# ---------------------------------------------------------------- run folder and CLI


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hierfed.simulation import run

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        tiny_overrides(**{"runtime.name": "local", "rounds": 1, "eval.personalized": True}),
        out=str(out),
    )
    run(cfg)
    return out


def test_summary_and_report_show_equity(finished_run, capsys):
    from hierfed.cli import main

    s = json.loads((finished_run / "summary.json").read_text())
    eq = s["equity"]
    assert eq["unit_tier"] == "institution"
    assert set(eq["by_group"]) == {"access"}
    assert eq["gaps"]["unit"]["essay_topic"]["count"] == 3
    assert 0.0 <= eq["light"]["light_training_share"] <= 1.0
    assert set(eq["personalized"]["by_unit"]) == set(s["personalized_mean"])
    assert main(["report", str(finished_run)]) == 0
    assert "equity: final global model per institution" in capsys.readouterr().out


def test_explain_writes_tables_and_plots(finished_run, tmp_path):
    from hierfed.cli import main

    dest = tmp_path / "ex"
    assert (
        main(["explain", str(finished_run), "--out", str(dest), "--max-rows", "4", "--steps", "8"])
        == 0
    )
    for name in ("attribution", "ablation", "equity"):
        assert (dest / f"{name}.json").is_file() and (dest / f"{name}.csv").is_file()
        assert (dest / f"{name}.png").stat().st_size > 1000
    attr = json.loads((dest / "attribution.json").read_text())
    shares = attr["essay_grade"]["by_scope"]["all"]
    assert set(shares) == {"tabular", "text"}
    assert sum(v["share"] for v in shares.values()) == pytest.approx(1.0)
    abl = json.loads((dest / "ablation.json").read_text())
    assert set(abl["head.digit"]) == {"digit"}  # only the task that reads it


def test_explain_bad_input_is_one_clear_line(finished_run, tmp_path, capsys):
    from hierfed.cli import main

    assert main(["explain", str(finished_run), "--group", "gender", "--no-plots"]) == 2
    assert (
        "unknown group column 'gender' for dataset 'edu-synth'; known: access"
        in capsys.readouterr().out
    )
    assert main(["explain", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in finished_run.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    text = (bad / "config.yaml").read_text().replace("d_model: 16", "d_model: 32")
    (bad / "config.yaml").write_text(text)
    assert main(["explain", str(bad), "--no-plots"]) == 2
    out = capsys.readouterr().out
    assert "in the model the config builds" in out and len(out.strip().splitlines()) <= 2


def test_equity_scores_agree_with_the_trainers_own_evaluation(tiny):
    """The batched per-row scores, averaged per client, are ClientTrainer.evaluate's metrics."""
    from hierfed.client import ClientTrainer
    from hierfed.explain.equity import client_scores

    cfg, fed, model, data = tiny
    scores = client_scores(model, fed, batch_size=7)  # batches that straddle clients
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    for c in fed.clients[:4]:
        res = trainer.evaluate(data=fed.test[c.id], tasks=c.tasks, state=None)
        for t, (metric, rows) in res.items():
            assert len(scores[c.id][t]) == rows
            assert scores[c.id][t].mean() == pytest.approx(metric, abs=1e-5)


def test_rows_whose_integral_has_not_converged_are_integrated_again(tiny):
    cfg, fed, model, data = tiny
    _, coarse = modality_attribution(model, data, "essay_grade", n_steps=2, max_steps=2)
    _, refined = modality_attribution(model, data, "essay_grade", n_steps=2, tol=1e-4)
    assert np.abs(coarse).max() > 1e-3  # two steps do not converge here ...
    assert np.abs(refined).max() < np.abs(coarse).max() / 10  # ... more steps, where needed
