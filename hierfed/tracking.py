"""Experiment tracking: a run's per-round records as TensorBoard scalars.

``logging.tensorboard: true`` makes ``simulation.run`` write one TensorBoard run into the
run folder (``<run>/tensorboard``, or ``logging.tensorboard_dir``), so pointing TensorBoard
at a folder of run folders (``tensorboard --logdir runs``) shows runs side by side. It
listens on the same ``on_event`` stream the CLI draws from, so tracking never changes a
result. Scalars, at step = round:

==================================  ==============================================
``eval/global/<task>``              held-out metric of the global model (round 0 = untrained)
``train/loss``                      mean local training loss
``clients/<what>``                  participants, rejected, failed, dropped, late
``bytes/<edge>``, ``bytes/total``   bytes moved on each tier edge this round
``time/sim_round_s``, ``time/sim_total_s``, ``time/wall_s``
``privacy/epsilon/<institution>``   largest sample-level epsilon among its DP clients
                                    (the institution: a client path's tier-1 node)
``privacy/max_epsilon``             largest sample-level epsilon of any client
``privacy/client_level/<tier>``     client-level epsilon into that tier (gaussian)
``topology/<key>``                  any other number the topology reports (consensus, ...)
==================================  ==============================================

Example (the tracker is a plain ``on_event`` callback)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp()) / "tensorboard"
    >>> t = TensorBoardTracker(folder)
    >>> t("round", {"round": 1, "train_loss": 0.7, "bytes": {"a->b": 10}})
    >>> t.close()
    >>> len(list(folder.glob("events.out.tfevents.*")))
    1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hierfed.errors import ConfigError

Event = Callable[[str, dict[str, Any]], None]
TB_DIR = "tensorboard"

_CLIENT_COUNTS = ("participants", "rejected", "failed", "dropped", "late")
_KNOWN = {
    "round",
    "global",
    "train_loss",
    "bytes",
    "bytes_total",
    "sim_time_s",
    "sim_time_total_s",
    "wall_s",
    *_CLIENT_COUNTS,
}


def check_logging_config(cfg: Any) -> None:
    """Config-time checks of the ``logging`` section (called by ``validate_config``)."""
    lg = cfg.logging
    if lg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "logging.tensorboard",
                True,
                "needs the tensorboard package (pip install 'hierfed[track]'), or set it false",
            ) from None
    elif lg.tensorboard_dir:
        raise ConfigError(
            "logging.tensorboard_dir",
            lg.tensorboard_dir,
            "is used only with logging.tensorboard=true; set that too, or drop the folder",
        )


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def round_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The scalars of one round's metrics record (``simulation.run``'s ``round`` event)."""
    out: dict[str, float] = {}
    for t, v in (rec.get("global") or {}).items():
        if _number(v) is not None:
            out[f"eval/global/{t}"] = float(v)
    if _number(rec.get("train_loss")) is not None:
        out["train/loss"] = float(rec["train_loss"])
    for k in _CLIENT_COUNTS:
        if _number(rec.get(k)) is not None:
            out[f"clients/{k}"] = float(rec[k])
    if rec.get("round", 0) > 0:
        for edge, n in (rec.get("bytes") or {}).items():
            out[f"bytes/{edge}"] = float(n)
        out["bytes/total"] = float(rec.get("bytes_total", 0))
        for key, tag in (
            ("sim_time_s", "time/sim_round_s"),
            ("sim_time_total_s", "time/sim_total_s"),
            ("wall_s", "time/wall_s"),
        ):
            if _number(rec.get(key)) is not None:
                out[tag] = float(rec[key])
    dp = rec.get("dp_sample") or {}
    for inst, rep in institution_epsilons(dp).items():
        out[f"privacy/epsilon/{inst}"] = rep["epsilon"]
    if _number(dp.get("max_epsilon")) is not None:
        out["privacy/max_epsilon"] = float(dp["max_epsilon"])
    for tier, rep in (rec.get("dp_client") or {}).items():
        if _number(rep.get("epsilon")) is not None:
            out[f"privacy/client_level/{tier}"] = float(rep["epsilon"])
    for k, v in rec.items():
        if k not in _KNOWN and _number(v) is not None:
            out[f"topology/{k}"] = float(v)
    return out


def institution_epsilons(dp_sample: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per institution (the tier-1 node of a client's path, e.g. ``inst-01``): the largest
    sample-level epsilon among its DP clients, its delta and how many there are, from a
    round record's ``dp_sample`` (cumulative reports of every DP client so far)."""
    out: dict[str, dict[str, float]] = {}
    for cid, rep in sorted((dp_sample.get("clients") or {}).items()):
        eps = _number(rep.get("epsilon"))
        if eps is None:
            continue
        parts = cid.split("/")
        inst = parts[1] if len(parts) > 2 else parts[0]
        cur = out.setdefault(inst, {"epsilon": 0.0, "delta": float(rep["delta"]), "clients": 0})
        cur["epsilon"] = max(cur["epsilon"], eps)
        cur["clients"] += 1
    return out


class TensorBoardTracker:
    """An ``on_event`` listener that writes each ``round`` record as scalars and flushes
    after every round (a killed run keeps what it logged). Closed by the ``end`` event.

    A resumed run (the ``resume`` event) appends to the same folder and purges what the
    interrupted run logged after the checkpoint it resumes from, so a re-run round is not
    drawn twice."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Any = None  # opened at the first round, or at a resume (to purge)

    def _open(self, purge_step: int | None = None) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        return self.writer

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "resume":
            self._open(purge_step=int(data["round"]) + 1)
        elif kind == "round":
            writer = self._open()
            step = int(data.get("round", 0))
            for tag, value in sorted(round_scalars(data).items()):
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()
        elif kind == "end":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def with_tracking(cfg: Any, out_dir: Path | None, emit: Event) -> Event:
    """``emit`` plus the trackers ``cfg.logging`` asks for (``out_dir`` None: no run folder
    is written, so nothing is tracked). Called by ``simulation.run``."""
    if not cfg.logging.tensorboard or out_dir is None:
        return emit
    tracker = TensorBoardTracker(
        Path(cfg.logging.tensorboard_dir) if cfg.logging.tensorboard_dir else out_dir / TB_DIR
    )

    def both(kind: str, data: dict[str, Any]) -> None:
        tracker(kind, data)
        emit(kind, data)

    return both
