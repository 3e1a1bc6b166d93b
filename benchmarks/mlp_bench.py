"""Plug-ins for the engine benchmarks: the ``mlp-bench`` dataset and the ``mlp`` backbone.

Not library plug-ins: they register when this module is imported, and a run that uses them
names the module in its config (``plugins: [benchmarks.mlp_bench]``, part of
``MLP_OVERRIDES``), so the driver and every Ray worker import it; ``python -m hierfed list``
does not show them.

``mlp-bench`` is a synthetic, single-modality tabular federation: ``global -> institution ->
student``, ``num_institutions * students_per_institution`` clients with exactly
``samples_per_student`` training rows each (no size skew, so "N clients of ~100 samples"),
one 4-class task ``label`` drawn from a fixed random two-layer teacher, and per-institution
label skew (Dirichlet ``label_skew`` reweighting of the rows each institution keeps).

``mlp`` is a one-hidden-layer frozen backbone: ``fc1`` (d -> d, LoRA-targetable) then GELU.
With ``prompt_tokens=0`` and the tabular encoder in front, the whole M3T model is a small
MLP: ``Linear(F, 2d) -> fc1 (+LoRA) -> GELU -> mean over 2 tokens -> Linear(d, C)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hierfed.config import DataConfig, ModelConfig
from hierfed.data.federation import ClientData, ClientProfile, Federation, ModalitySpec, TaskSpec
from hierfed.model.backbone import Backbone
from hierfed.model.init import init_module
from hierfed.registry import BACKBONES, DATASETS
from hierfed.seeding import np_rng

N_FEATURES = 16
N_CLASSES = 4
TASK = "label"


def _teacher(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np_rng(seed, "mlp-bench", "teacher")
    return rng.normal(0, 1, (N_FEATURES, 32)).astype(np.float32), rng.normal(
        0, 1, (32, N_CLASSES)
    ).astype(np.float32)


def _rows(
    rng: np.random.Generator, n: int, w1: np.ndarray, w2: np.ndarray, prior: np.ndarray | None
) -> ClientData:
    """``n`` rows; with a class ``prior``, rows are drawn from a larger pool by class weight."""
    pool = n if prior is None else 4 * n
    x = rng.normal(0, 1, (pool, N_FEATURES)).astype(np.float32)
    logits = np.tanh(x @ w1) @ w2 + rng.normal(0, 0.5, (pool, N_CLASSES))
    y = logits.argmax(1)
    if prior is not None:
        p = prior[y] / prior[y].sum()
        keep = rng.choice(pool, size=n, replace=False, p=p)
        x, y = x[keep], y[keep]
    return ClientData({"tabular": np.ascontiguousarray(x)}, {TASK: y.astype(np.int64)})


def build_mlp_bench(cfg: DataConfig, seed: int) -> Federation:
    """The federation; same ``(cfg, seed)`` gives the same arrays, bit for bit."""
    w1, w2 = _teacher(seed)
    n_train = cfg.samples_per_student
    n_test = max(1, int(round(n_train * cfg.test_fraction)))
    clients, train, test = [], {}, {}
    for i in range(cfg.num_institutions):
        inst = f"inst-{i:03d}"
        prior = np_rng(seed, "mlp-bench", inst).dirichlet(np.full(N_CLASSES, cfg.label_skew))
        for s in range(cfg.students_per_institution):
            sid = f"global/{inst}/student-{s:04d}"
            rng = np_rng(seed, "mlp-bench", sid)
            data = _rows(rng, n_train + n_test, w1, w2, prior)
            idx = np.arange(n_train + n_test)
            train[sid] = ClientData(
                {"tabular": data.inputs["tabular"][idx[:n_train]]},
                {TASK: data.labels[TASK][idx[:n_train]]},
            )
            test[sid] = ClientData(
                {"tabular": data.inputs["tabular"][idx[n_train:]]},
                {TASK: data.labels[TASK][idx[n_train:]]},
            )
            clients.append(
                ClientProfile(sid, ("tabular",), (TASK,), num_train=n_train, num_test=n_test)
            )
    global_test = _rows(
        np_rng(seed, "mlp-bench", "global-test"), cfg.global_test_size, w1, w2, None
    )
    return Federation(
        name="mlp-bench",
        tier_names=("global", "institution", "student"),
        modalities={"tabular": ModalitySpec("tabular", "tabular", (N_FEATURES,))},
        tasks={TASK: TaskSpec(TASK, ("tabular",), N_CLASSES, description="teacher-MLP class")},
        clients=clients,
        train=train,
        test=test,
        global_test=global_test,
        description="synthetic tabular federation for engine benchmarks (generated, not real data)",
    )


class MLPBackbone(Backbone):
    """Frozen ``fc1`` + GELU; no attention, no positional table."""

    def __init__(self, d_model: int, max_tokens: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_tokens = max_tokens
        self.fc1 = nn.Linear(d_model, d_model)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc1(tokens))


def build_mlp(cfg: ModelConfig, seed: int) -> Backbone:
    bb = MLPBackbone(cfg.d_model, cfg.max_tokens)
    init_module(bb, seed, "backbone")
    return bb


for _registry, _name, _obj in (
    (DATASETS, "mlp-bench", build_mlp_bench),
    (BACKBONES, "mlp", build_mlp),
):
    _registry.add(_name, _obj)

# overrides that turn a RunConfig into the benchmark's small MLP on mlp-bench
MLP_OVERRIDES = {
    "plugins": "[benchmarks.mlp_bench]",
    "data.name": "mlp-bench",
    "data.samples_per_student": 100,
    "data.test_fraction": 0.1,
    "data.global_test_size": 2000,
    "data.essay_only_institutions": 0,
    "data.label_skew": 1.0,
    "model.backbone": "mlp",
    "model.d_model": 32,
    "model.lora_targets": "[fc1]",
    "model.lora_rank": 4,
    "model.prompt_tokens": 0,
    "train.optimizer": "sgd",
    "train.lr": 0.1,
    "train.local_epochs": 2,
    "train.batch_size": 32,
    "eval.personalized": False,
}
