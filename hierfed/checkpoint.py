"""Atomic, checksummed safetensors + JSON files. Never pickle.

``save_state`` writes ``NAME.safetensors`` and ``NAME.json`` (sha256 of the tensor file and
metadata) through temporary files and ``os.replace``, so a crash leaves either the old
pair or the new one, never a torn file. ``load_state`` verifies the checksum first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

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
    """Write ``<stem>.safetensors`` (keys ``component/param``) then ``<stem>.json`` (the JSON
    last: it commits the pair)."""
    stem = Path(path_stem)
    save_state_flat(stem, flat_state(state), meta or {})
    return stem.with_suffix(".safetensors")


def load_state(path_stem: str | Path) -> tuple[State, dict[str, Any]]:
    """Verify and load a pair written by ``save_state``; refuses anything that does not check out."""
    flat, meta = load_state_flat(Path(path_stem))
    return unflat_state(flat), meta


# ---------------------------------------------------------------- generic packing (no pickle)

_SAFE_PREFIXES = ("hierfed.", "topologies.")


def pack(obj: Any, tensors: dict[str, Any], path: str = "r") -> Any:
    """Turn ``obj`` into JSON-able data, moving every tensor into ``tensors``.

    Handles tensors, numpy arrays, dicts (any hashable JSON-able keys), lists, tuples, sets of
    scalars, floats including NaN/Inf, and frozen dataclasses defined in hierfed or topologies.
    Anything else is refused (no pickle fallback).
    """
    import dataclasses

    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__f__": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"{path}#{len(tensors)}"
        tensors[key] = obj.detach().contiguous().clone()
        return {"__t__": key}
    if isinstance(obj, np.ndarray):
        key = f"{path}#{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__np__": key}
    if isinstance(obj, (np.integer, np.floating)):
        return pack(obj.item(), tensors, path)
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__d__": {k: pack(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {
            "__dk__": [
                [pack(k, tensors, path), pack(v, tensors, f"{path}.{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, list):
        return [pack(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, (set, frozenset)):
        return {
            "__set__": sorted(pack(v, tensors, path) for v in obj),
            "frozen": isinstance(obj, frozenset),
        }
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        if not cls.__module__.startswith(_SAFE_PREFIXES):
            raise CheckpointError(
                f"cannot checkpoint a {cls.__module__}.{cls.__qualname__} at {path}"
            )
        fields = {
            f.name: pack(getattr(obj, f.name), tensors, f"{path}.{f.name}")
            for f in dataclasses.fields(obj)
        }
        return {"__dc__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise CheckpointError(
        f"cannot checkpoint a value of type {type(obj).__name__} at {path}; "
        "keep run state to tensors, numbers, strings, lists, dicts and hierfed dataclasses"
    )


def unpack(data: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of ``pack``; dataclasses are rebuilt only from hierfed/topologies modules."""
    import importlib

    import numpy as np

    if isinstance(data, list):
        return [unpack(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "__t__" in data:
        return tensors[data["__t__"]]
    if "__np__" in data:
        return np.asarray(tensors[data["__np__"]].numpy())
    if "__f__" in data:
        return float(data["__f__"])
    if "__d__" in data:
        return {k: unpack(v, tensors) for k, v in data["__d__"].items()}
    if "__dk__" in data:
        return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in data["__dk__"]}
    if "__tuple__" in data:
        return tuple(unpack(v, tensors) for v in data["__tuple__"])
    if "__set__" in data:
        items = [_hashable(unpack(v, tensors)) for v in data["__set__"]]
        return frozenset(items) if data.get("frozen") else set(items)
    if "__dc__" in data:
        module, _, qual = data["__dc__"].partition(":")
        if not module.startswith(_SAFE_PREFIXES):
            raise CheckpointError(f"checkpoint names a class outside hierfed: {data['__dc__']}")
        cls: Any = importlib.import_module(module)
        for part in qual.split("."):
            cls = getattr(cls, part)
        return cls(**{k: unpack(v, tensors) for k, v in data["fields"].items()})
    raise CheckpointError(f"unrecognised checkpoint entry with keys {sorted(data)[:4]}")


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def save_bundle(directory: str | Path, name: str, obj: Any) -> None:
    """Pack ``obj`` into ``<dir>/<name>.safetensors`` + ``<dir>/<name>.json`` atomically."""
    tensors: dict[str, Any] = {}
    tree = pack(obj, tensors)
    save_state_flat(Path(directory) / name, tensors, {"tree": tree})


def load_bundle(directory: str | Path, name: str) -> Any:
    tensors, meta = load_state_flat(Path(directory) / name)
    return unpack(meta["tree"], tensors)


def save_state_flat(stem: Path, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write a flat name -> tensor dict and its checksummed JSON, each file atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=stem.parent, prefix=f".{stem.name}.", suffix=".safetensors")
    os.close(fd)
    try:
        if flat:
            save_file(flat, tmp)
            data = Path(tmp).read_bytes()
        else:
            data = b""
    finally:
        os.unlink(tmp)
    _atomic_write_bytes(stem.with_suffix(".safetensors"), data)
    info = {"sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data), "meta": meta}
    atomic_write_text(stem.with_suffix(".json"), json.dumps(info, sort_keys=True))


def load_state_flat(stem: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tpath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not tpath.is_file() or not jpath.is_file():
        raise CheckpointError(
            f"checkpoint '{stem}' is incomplete: need {tpath.name} and {jpath.name}"
        )
    try:
        info = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {jpath} is corrupted: {exc}") from None
    data = tpath.read_bytes()
    if len(data) != info.get("nbytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise CheckpointError(f"checkpoint {tpath} is truncated or corrupted (checksum mismatch)")
    if not data:
        return {}, info.get("meta", {})
    from safetensors.torch import load as load_bytes

    return dict(load_bytes(data)), info.get("meta", {})
