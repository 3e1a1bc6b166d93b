"""Federation: the population of clients, their tiers, modalities, tasks and local data.

A dataset plug-in (registered in ``hierfed.registry.DATASETS``) is a function
``build(cfg: DataConfig, seed: int) -> Federation``. Data arrays are numpy so that Ray
shares them between workers without copies.

Node ids are tier paths: ``global/inst-03/student-017``. The first element is the root.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from hierfed.errors import DataError

MODALITY_KINDS = ("tabular", "image", "text")


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality. ``shape`` is per sample: tabular (F,), image (C, H, W), text (L,)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    vocab_size: int = 0  # text only: token ids lie in [0, vocab_size); 0 is padding

    def __post_init__(self) -> None:
        if self.kind not in MODALITY_KINDS:
            raise DataError(
                f"modality '{self.name}' has kind {self.kind!r}; known: {MODALITY_KINDS}"
            )


@dataclass(frozen=True)
class TaskSpec:
    """One prediction task on one or more modalities."""

    name: str
    modalities: tuple[str, ...]
    num_classes: int  # 1 for regression
    kind: str = "classification"  # or "regression"
    description: str = ""

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "neg_mse"


@dataclass
class ClientData:
    """A client's local rows: inputs per modality and labels per task, all of length ``n``.

    ``groups``: per-row attributes that are neither input nor label, used only to report
    metrics per group (equity), e.g. ``{"gender": array(["F", "M", ...])}``; never trained on."""

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        for arr in self.labels.values():
            return int(arr.shape[0])
        for arr in self.inputs.values():
            return int(arr.shape[0])
        return 0


@dataclass(frozen=True)
class ClientProfile:
    """What a client is and holds; decides which components it builds and trains."""

    id: str
    modalities: tuple[str, ...]
    tasks: tuple[str, ...]
    num_train: int
    num_test: int
    resource: str = "full"  # "light" clients train heads and prompts only
    privacy: str | None = None  # name of a privacy policy, if any

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.id.split("/"))


@dataclass
class Federation:
    """Everything a run needs to know about the population and its data."""

    name: str
    tier_names: tuple[str, ...]  # root first, e.g. ("global", "institution", "student")
    modalities: dict[str, ModalitySpec]
    tasks: dict[str, TaskSpec]
    clients: list[ClientProfile]
    train: dict[str, ClientData]
    test: dict[str, ClientData]
    global_test: ClientData
    description: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clients = sorted(self.clients, key=lambda c: c.id)
        self.validate()

    def validate(self) -> None:
        depth = len(self.tier_names)
        if not self.clients:
            raise DataError(f"federation '{self.name}' has no clients")
        ids = [c.id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise DataError(f"federation '{self.name}' has duplicate client ids")
        for c in self.clients:
            if len(c.path) != depth or c.path[0] != self.tier_names[0]:
                raise DataError(
                    f"client '{c.id}' has a tier path of depth {len(c.path)}; the federation's tiers "
                    f"are {self.tier_names} (paths must start with '{self.tier_names[0]}')"
                )
            for m in c.modalities:
                if m not in self.modalities:
                    raise DataError(f"client '{c.id}' has unknown modality '{m}'")
            for t in c.tasks:
                spec = self.tasks.get(t)
                if spec is None:
                    raise DataError(f"client '{c.id}' serves unknown task '{t}'")
                missing = set(spec.modalities) - set(c.modalities)
                if missing:
                    raise DataError(
                        f"client '{c.id}' serves task '{t}' but lacks {sorted(missing)}"
                    )
            if c.num_train <= 0:
                raise DataError(f"client '{c.id}' has no training rows")

    @property
    def by_id(self) -> Mapping[str, ClientProfile]:
        return {c.id: c for c in self.clients}

    def summary(self) -> dict[str, object]:
        per_tier = {
            name: len({c.path[: i + 1] for c in self.clients})
            for i, name in enumerate(self.tier_names)
        }
        return {
            "dataset": self.name,
            "tiers": per_tier,
            "train_rows": sum(c.num_train for c in self.clients),
            "tasks": sorted(self.tasks),
            "modalities": sorted(self.modalities),
        }


def subset(
    data: ClientData, idx: np.ndarray, tasks: tuple[str, ...], modalities: tuple[str, ...]
) -> ClientData:
    """Rows ``idx`` of ``data`` restricted to some modalities and tasks."""
    return ClientData(
        {m: np.ascontiguousarray(data.inputs[m][idx]) for m in modalities},
        {t: np.ascontiguousarray(data.labels[t][idx]) for t in tasks},
        {g: np.ascontiguousarray(a[idx]) for g, a in data.groups.items()},
    )
