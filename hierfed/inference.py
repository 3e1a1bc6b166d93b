"""Use a finished run: load its model, evaluate it, predict on new rows.

A run folder (``simulation.run`` wrote it) holds the config, the final global state and the
last checkpoint. ``load_run`` rebuilds exactly what the run's workers built — the federation
from the config and seed, the model skeleton, the tokenized text — and loads the final state
into it, in this process (no Ray). Evaluation goes through the same ``WorkerCore.evaluate``
the run used, so ``evaluate_run(run_dir)`` on the run's own global test split gives back
``summary.json``'s ``final`` metrics.

Personalized models (components scoped to a tier or ``local``) are not in
``final_state.safetensors``: they come from the last checkpoint's topology state
(``checkpoints/LATEST``), loaded into a topology built from the config, whose
``personalized_state(client)`` gives the client's model.

Example::

    >>> import tempfile
    >>> from hierfed import config, simulation
    >>> small = ["runtime.name=local", "rounds=1", "model.d_model=16", "model.num_layers=1"]
    >>> small += ["model.num_heads=2", "data.num_institutions=2", "data.essay_only_institutions=0"]
    >>> folder = tempfile.mkdtemp() + "/run"
    >>> result = simulation.run(config.load_config(None, small, out=folder))
    >>> loaded = load_run(folder)
    >>> evaluate_run(loaded) == result.final_metrics
    True
    >>> out = predict(loaded, [{"tabular": [0.1] * 12}], tasks=["dropout_risk"])
    >>> out[0]["row"], sorted(out[0]["dropout_risk"])
    (0, ['prediction', 'probs'])

Rows for ``predict`` (``read_rows``): a JSON Lines file, one object per row, a key per
modality the row has. Values: tabular — a list of numbers of the modality's length; image —
nested lists of shape (C, H, W) or a flat list of C·H·W numbers; text — a string (tokenized
with the backbone's tokenizer, or word-hashed for ``tiny``) where the dataset's text is raw
strings (``courses``), else a list of token ids of the dataset's vocabulary (``edu-synth``). An
optional ``"id"`` is copied to the output. A row is predicted for every task whose
modalities it has (or the tasks asked for, which it must have).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierfed.checkpoint import load_state
from hierfed.config import RunConfig, load_config
from hierfed.data.federation import Federation, ModalitySpec
from hierfed.errors import ConfigError, DataError, HierfedError
from hierfed.update import State


@dataclass
class LoadedRun:
    """A finished run rebuilt in this process. ``core`` is the worker that evaluates it."""

    run_dir: Path
    cfg: RunConfig
    federation: Federation  # as the workers saw it (text tokenized)
    state: State  # the final global state
    core: Any  # hierfed.runtime.worker.WorkerCore
    summary: dict[str, Any]

    @property
    def model(self) -> Any:
        """The M3T model (hierfed.model.m3t.M3TModel) the core holds."""
        return self.core.model


@contextlib.contextmanager
def _run_threads() -> Iterator[None]:
    """Torch's intra-op threads as the run's workers had them (``WorkerSetup.threads``, 1:
    sums then add up in the same order as in the run), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_config(run_dir: str | Path, data_overrides: Sequence[str] = ()) -> RunConfig:
    """The config a run folder was written with, plus ``data.*`` overrides (another dataset)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HierfedError(
            f"'{run_dir}' is not a run folder (no config.yaml); give the folder a run wrote"
        )
    for ov in data_overrides:
        if not ov.startswith("data."):
            raise ConfigError(
                ov.split("=", 1)[0], ov, "--data takes data.* overrides only, e.g. data.seed=7"
            )
    return load_config(path, list(data_overrides), out=str(run_dir))


def load_run(run_dir: str | Path, *, data: Sequence[str] = ()) -> LoadedRun:
    """Rebuild a finished run's model with its final global state loaded.

    ``data``: ``key=value`` overrides of the ``data`` section, to evaluate on another
    configured dataset; its modalities and tasks must be the run's."""
    from hierfed import plugins  # noqa: F401  (registers the built-in datasets and backbones)
    from hierfed.runtime.worker import WorkerCore, WorkerSetup
    from hierfed.simulation import build_federation

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, data)
    stem = run_dir / "final_state"
    if not stem.with_suffix(".json").is_file():
        raise HierfedError(
            f"'{run_dir}' has no final_state.json: the run did not finish (resume it with "
            f"python -m hierfed run --resume {run_dir})"
        )
    state, _ = load_state(stem)
    fed = build_federation(cfg)
    if data:
        _check_same_schema(run_dir, cfg, fed)
    with _run_threads():  # the worker sets torch's threads; the caller's are put back
        core = WorkerCore(WorkerSetup(cfg, fed))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    core.model.load_components(state)
    return LoadedRun(run_dir, cfg, core.fed, state, core, summary)


def _check_same_schema(run_dir: Path, cfg: RunConfig, fed: Federation) -> None:
    from hierfed.simulation import build_federation

    orig = build_federation(run_config(run_dir))
    for what, a, b in (
        ("modalities", orig.modalities, fed.modalities),
        ("tasks", orig.tasks, fed.tasks),
    ):
        if {k: dataclasses.astuple(v) for k, v in a.items()} != {
            k: dataclasses.astuple(v) for k, v in b.items()
        }:
            raise ConfigError(
                "--data",
                cfg.data.name,
                f"its {what} {sorted(b)} differ from the run's {sorted(a)}; the model was trained "
                f"for those: evaluate on a dataset with the same {what}",
            )


def personalized_states(run: LoadedRun, clients: Iterable[str]) -> dict[str, State]:
    """Each client's personalized model, from the last checkpoint's topology state."""
    from hierfed.registry import TOPOLOGIES
    from hierfed.resume import read_latest

    ck = read_latest(run.run_dir)
    spec, initial = run.core.model_info()
    topo = TOPOLOGIES.get(run.cfg.topology.name)(cfg=run.cfg, federation=run.federation, spec=spec)
    topo.init(initial)
    topo.load_state_dict(ck["topology"])
    out: dict[str, State] = {}
    known = run.federation.by_id
    for cid in clients:
        if cid not in known:
            raise ConfigError(
                "--client", cid, f"no such client in the run; e.g. {', '.join(sorted(known)[:3])}"
            )
        out[cid] = topo.personalized_state(cid)
    return out


def evaluate_run(
    run: LoadedRun, *, client: str | None = None, tasks: Sequence[str] | None = None
) -> dict[str, float]:
    """Per-task metric (accuracy; negative MSE for regression) of the global model on the
    global test split, or of ``client``'s personalized model on the client's own test rows."""
    from hierfed.runtime.jobs import EvalJob

    fed = run.federation
    if client is None:
        names = sorted(tasks or fed.tasks)
        jobs = [EvalJob("global", (t,), "global") for t in names]
        states = {"global": run.state}
    else:
        states = personalized_states(run, [client])
        names = list(tasks or fed.by_id[client].tasks)
        if fed.by_id[client].num_test == 0:
            raise ConfigError("--client", client, "has no held-out rows to evaluate on")
        jobs = [EvalJob(client, tuple(names), client, split="client-test")]
    for t in names:
        if t not in fed.tasks:
            raise ConfigError("--task", t, f"not a task of this run; known: {sorted(fed.tasks)}")
    out: dict[str, float] = {}
    with _run_threads():
        for _, res in run.core.evaluate(jobs, states):
            for t, (metric, _) in res.items():
                out[t] = metric
    run.model.load_components(run.state)  # leave the global model loaded
    return out


# ---------------------------------------------------------------- predict


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file (blank lines skipped); a bad line is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise HierfedError(f"--input '{path}': no such file; give a JSON Lines file of rows")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path.name} line {i}: not JSON ({exc.msg}); one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path.name} line {i}: a {type(row).__name__}, not an object; write "
                '{"<modality>": value, ...} per line'
            )
        row["__line__"] = i
        rows.append(row)
    return rows


def _tensor_of(
    spec: ModalitySpec, value: Any, where: str, backbone: Any, text_len: int
) -> torch.Tensor:
    """One modality value of one row as the model's input tensor (no batch axis)."""
    from hierfed.model.hf_backbone import text_ids

    if spec.kind == "text":
        if isinstance(value, str):
            if spec.vocab_size:  # the dataset's own token ids (synthetic text): no tokenizer
                raise DataError(
                    f"{where}: this model reads token ids of its dataset's vocabulary "
                    f"[0, {spec.vocab_size}), not strings; give a list of ints"
                )
            return torch.from_numpy(text_ids(backbone, [value], text_len)[0])
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            ids = np.zeros(text_len, dtype=np.int64)
            ids[: min(len(value), text_len)] = value[:text_len]
            vocab = spec.vocab_size or getattr(backbone, "text_vocab_size", None)
            if vocab and (ids.min() < 0 or ids.max() >= vocab):
                raise DataError(f"{where}: token ids must lie in [0, {vocab}); got {value[:8]}")
            return torch.from_numpy(ids)
        raise DataError(f"{where}: give the text as a string or a list of token ids")
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{where}: give numbers (a list, nested for images)") from None
    n = math.prod(spec.shape)
    if arr.size != n or arr.dtype.kind != "f" or arr.ndim == 0:
        raise DataError(
            f"{where}: needs {n} numbers (shape {list(spec.shape)}), got {arr.size} "
            f"(shape {list(arr.shape)})"
        )
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: holds a NaN or infinite value")
    return torch.from_numpy(arr.reshape(spec.shape))


@torch.no_grad()
def predict(
    run: LoadedRun,
    rows: Sequence[Mapping[str, Any]],
    *,
    tasks: Sequence[str] | None = None,
    client: str | None = None,
) -> list[dict[str, Any]]:
    """Predictions of the global (or ``client``'s personalized) model for each row.

    Each output: ``{"row": i, ["id": ...,] task: {"prediction": class or value,
    "probs": [...] (classification)}}``. A task is predicted for a row that holds all its
    modalities; asked-for ``tasks`` must be answerable for every row."""
    fed = run.federation
    model = run.model
    if client is not None:
        model.load_components(personalized_states(run, [client])[client])
    for t in tasks or ():
        if t not in fed.tasks:
            raise ConfigError("--task", t, f"not a task of this run; known: {sorted(fed.tasks)}")
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for i, row in enumerate(rows):
            line = row.get("__line__", i + 1)
            where = f"line {line}" if "__line__" in row else f"row {i}"
            unknown = [k for k in row if k not in fed.modalities and k not in ("id", "__line__")]
            if unknown:
                raise DataError(
                    f"{where}: unknown modality '{unknown[0]}'; this model takes "
                    f"{sorted(fed.modalities)}"
                )
            inputs = {
                m: _tensor_of(
                    fed.modalities[m],
                    row[m],
                    f"{where}, modality '{m}'",
                    model.backbone,
                    run.cfg.model.text_len,
                )
                .unsqueeze(0)
                .to(device)
                for m in fed.modalities
                if m in row
            }
            todo = list(tasks) if tasks else sorted(fed.tasks)
            rec: dict[str, Any] = {"row": i}
            if "id" in row:
                rec["id"] = row["id"]
            for t in todo:
                spec = fed.tasks[t]
                missing = [m for m in spec.modalities if m not in inputs]
                if missing:
                    if tasks:
                        raise DataError(
                            f"{where}: task '{t}' needs modality '{missing[0]}', which the row lacks"
                        )
                    continue
                y = model({m: inputs[m] for m in spec.modalities}, t)[0].float().cpu()
                if spec.kind == "classification":
                    probs = torch.softmax(y, -1)
                    rec[t] = {
                        "prediction": int(probs.argmax()),
                        "probs": [round(float(p), 6) for p in probs],
                    }
                else:
                    rec[t] = {"prediction": float(y)}
            if len(rec) == 1 + ("id" in row):
                raise DataError(
                    f"{where}: holds no modality set of any task; tasks need "
                    + ", ".join(f"{t}: {list(s.modalities)}" for t, s in sorted(fed.tasks.items()))
                )
            out.append(rec)
    finally:
        if client is not None:
            model.load_components(run.state)
    return out
