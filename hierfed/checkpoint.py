"""Atomic, checksummed safetensors + JSON files. Never pickle.

``save_state`` writes ``NAME.safetensors`` and ``NAME.json`` (sha256 of the tensor file and
metadata) through temporary files and ``os.replace``, so a crash leaves either the old
pair or the new one, never a torn file. ``load_state`` verifies the checksum first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from hierfed.errors import CheckpointError
from hierfed.update import State, flat_state, unflat_state


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def save_state(path_stem: str | Path, state: State, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` (the JSON last: it commits the pair)."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().clone() for k, v in flat_state(state).items()}
    fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(flat, tmp)
        data = Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)
    tensor_path = stem.with_suffix(".safetensors")
    _atomic_write_bytes(tensor_path, data)
    info = {"sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data), "meta": meta or {}}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(info, indent=1, sort_keys=True))
    return tensor_path


def load_state(path_stem: str | Path) -> tuple[State, dict[str, Any]]:
    """Verify and load a pair written by ``save_state``; refuses anything that does not check out."""
    stem = Path(path_stem)
    tpath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not tpath.is_file() or not jpath.is_file():
        raise CheckpointError(f"checkpoint '{stem}' is incomplete: need {tpath.name} and {jpath.name}")
    try:
        info = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {jpath} is corrupted: {exc}") from None
    data = tpath.read_bytes()
    if len(data) != info.get("nbytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise CheckpointError(f"checkpoint {tpath} is truncated or corrupted (checksum mismatch); delete it or resume from an earlier one")
    return unflat_state(load_file(str(tpath))), info.get("meta", {})
