"""Atomic, checksummed safetensors + JSON files. A file is data, never code: no pickle.

``save_state_flat`` writes ``NAME.safetensors`` (the tensors) and ``NAME.json``: a small
envelope ``{"format", "sha256", "nbytes", "body"}`` whose ``body`` is the metadata as JSON
text. One sha256 covers the body *and* the tensor bytes, so an edit to either is refused
before anything is parsed or built (``load_state_flat``). Each file is written to a
temporary name, fsynced and renamed, the JSON last (it commits the pair): a crash leaves the
old pair or the new one, never a torn file.

The checksum detects corruption and careless edits; it is not a signature (someone who can
write the file can recompute it). What keeps a hostile file harmless is the loader: ``unpack``
builds only plain JSON values, tensors from the checksummed safetensors file, and instances
of the dataclasses registered below by name (``register_checkpoint_type``) — it never
imports, looks up or calls anything the file names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import save_file

from hierfed.errors import CheckpointError
from hierfed.update import State, flat_state, unflat_state

FORMAT = 2
_DOMAIN = b"hierfed-checkpoint-2\0"  # what the checksum hashes starts with this

T = TypeVar("T")

# name ("module:qualname") -> class: the only types a checkpoint may build
_TYPES: dict[str, type] = {}


def register_checkpoint_type(cls: type[T]) -> type[T]:
    """Allow instances of the dataclass ``cls`` in checkpoints (usable as a decorator).

    A topology or aggregator whose carried state holds its own dataclass registers it once;
    saving an unregistered dataclass fails loudly, loading one is refused."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"only dataclasses can be checkpointed, not {cls!r}")
    _TYPES[_type_name(cls)] = cls
    return cls


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def checkpoint_types() -> dict[str, type]:
    """The allow-list, with hierfed's own carried dataclasses registered on first use."""
    if not _TYPES:
        from hierfed.privacy.accountant import PrivacyState

        register_checkpoint_type(PrivacyState)  # per-client DP accountants (topology state)
    return _TYPES


# ---------------------------------------------------------------- files


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


def _nonfinite(v: float) -> bool:
    return not math.isfinite(v)


def nulled(obj: Any, *, null: Callable[[float], bool] = _nonfinite) -> Any:
    """``obj`` (nested dicts and lists) with every float for which ``null`` holds (default:
    NaN and +-Inf) replaced by None, so that strict JSON readers accept the file written
    from it; ``obj`` is not mutated."""
    if isinstance(obj, float) and null(obj):
        return None
    if isinstance(obj, dict):
        return {k: nulled(v, null=null) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nulled(v, null=null) for v in obj]
    return obj


def save_state(path_stem: str | Path, state: State, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<stem>.safetensors`` (keys ``component/param``) then ``<stem>.json``."""
    stem = Path(path_stem)
    save_state_flat(stem, flat_state(state), meta or {})
    return stem.with_suffix(".safetensors")


def load_state(path_stem: str | Path) -> tuple[State, dict[str, Any]]:
    """Verify and load a pair written by ``save_state``; refuses anything that does not check out."""
    flat, meta = load_state_flat(Path(path_stem))
    return unflat_state(flat), meta


def _digest(body: bytes, data: bytes) -> str:
    h = hashlib.sha256(_DOMAIN)
    h.update(len(body).to_bytes(8, "little"))
    h.update(body)
    h.update(data)
    return h.hexdigest()


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
    body = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    _atomic_write_bytes(stem.with_suffix(".safetensors"), data)
    envelope = {
        "format": FORMAT,
        "sha256": _digest(body, data),
        "nbytes": len(data),
        "body": body.decode(),
    }
    atomic_write_text(stem.with_suffix(".json"), json.dumps(envelope, sort_keys=True))


def load_state_flat(stem: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors and metadata of a pair, after checking one checksum over both."""
    tpath, jpath = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not tpath.is_file() or not jpath.is_file():
        raise CheckpointError(
            f"checkpoint '{stem}' is incomplete: need {tpath.name} and {jpath.name}"
        )
    try:
        envelope = json.loads(jpath.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint metadata {jpath} is corrupted: {exc}") from None
    if (
        not isinstance(envelope, dict)
        or envelope.get("format") != FORMAT
        or not isinstance(envelope.get("body"), str)
        or not isinstance(envelope.get("sha256"), str)
    ):
        raise CheckpointError(
            f"checkpoint metadata {jpath} is corrupted or from another version "
            f"(expected format {FORMAT} with a checksummed body)"
        )
    data = tpath.read_bytes()
    body = envelope["body"].encode()
    if len(data) != envelope.get("nbytes") or _digest(body, data) != envelope["sha256"]:
        raise CheckpointError(
            f"checkpoint {tpath} is truncated or corrupted (checksum mismatch over "
            f"{jpath.name} and {tpath.name})"
        )
    try:
        meta = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:  # only if the writer was broken
        raise CheckpointError(f"checkpoint metadata {jpath} is corrupted: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {jpath} is not a mapping")
    if not data:
        return {}, meta
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    try:
        return dict(load_bytes(data)), meta
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {tpath} is not a safetensors file: {exc}") from None


# ---------------------------------------------------------------- generic packing (no pickle)


def pack(obj: Any, tensors: dict[str, Any], path: str = "r") -> Any:
    """Turn ``obj`` into JSON-able data, moving every tensor into ``tensors``.

    Handles tensors, numpy arrays, dicts (any hashable JSON-able keys), lists, tuples, sets of
    scalars, floats including NaN/Inf, and the registered dataclasses
    (``register_checkpoint_type``). Anything else is refused (no pickle fallback).
    """
    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, str, int)):
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
        name = _type_name(type(obj))
        if checkpoint_types().get(name) is not type(obj):
            raise CheckpointError(
                f"cannot checkpoint a {name} at {path}: not a registered checkpoint type "
                "(hierfed.checkpoint.register_checkpoint_type)"
            )
        fields = {
            f.name: pack(getattr(obj, f.name), tensors, f"{path}.{f.name}")
            for f in dataclasses.fields(obj)
        }
        return {"__dc__": name, "fields": fields}
    raise CheckpointError(
        f"cannot checkpoint a value of type {type(obj).__name__} at {path}; "
        "keep run state to tensors, numbers, strings, lists, dicts and registered dataclasses"
    )


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def unpack(data: Any, tensors: dict[str, Any]) -> Any:
    """Inverse of ``pack``. Builds only JSON values, the given tensors and registered
    dataclasses (looked up by name, with exactly their fields); anything else is refused."""
    try:
        return _unpack(data, tensors)
    except RecursionError:
        raise CheckpointError("checkpoint data is nested too deeply") from None


def _unpack(data: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(data, list):
        return [_unpack(v, tensors) for v in data]
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if not isinstance(data, dict) or not _known_shape(data):
        raise CheckpointError(f"unrecognised checkpoint entry {str(data)[:60]}")
    tag = min(data)  # "__x__" sorts before "fields" and "frozen"
    body = data[tag]
    if tag in ("__t__", "__np__"):
        if not isinstance(body, str) or body not in tensors:
            raise CheckpointError(f"checkpoint refers to a missing tensor {body!r}")
        return tensors[body] if tag == "__t__" else tensors[body].numpy()
    if tag == "__f__" and body in _FLOATS:
        return _FLOATS[body]
    if tag == "__d__" and isinstance(body, dict):
        return {k: _unpack(v, tensors) for k, v in body.items()}
    if tag == "__dk__" and isinstance(body, list) and all(_is_pair(kv) for kv in body):
        return {_hashable(_unpack(k, tensors)): _unpack(v, tensors) for k, v in body}
    if tag == "__tuple__" and isinstance(body, list):
        return tuple(_unpack(v, tensors) for v in body)
    if tag == "__set__" and isinstance(body, list):
        items = [_hashable(_unpack(v, tensors)) for v in body]
        return frozenset(items) if data.get("frozen") is True else set(items)
    if tag == "__dc__" and isinstance(body, str) and isinstance(data.get("fields"), dict):
        return _build(body, data["fields"], tensors)
    raise CheckpointError(f"unrecognised checkpoint entry with keys {sorted(data)[:4]}")


_SHAPES = (
    *({t} for t in ("__t__", "__np__", "__f__", "__d__", "__dk__", "__tuple__")),
    {"__set__", "frozen"},
    {"__dc__", "fields"},
)


def _known_shape(data: dict[Any, Any]) -> bool:
    return set(data) in _SHAPES


def _is_pair(kv: Any) -> bool:
    return isinstance(kv, list) and len(kv) == 2


def _build(name: str, fields: dict[str, Any], tensors: dict[str, Any]) -> Any:
    cls = checkpoint_types().get(name)
    if cls is None:
        raise CheckpointError(
            f"checkpoint names type {name!r}, which is not an allowed checkpoint type; "
            "the file was not written by hierfed (or by a version with other plug-ins)"
        )
    want = {f.name for f in dataclasses.fields(cls) if f.init}
    if set(fields) != want:
        raise CheckpointError(
            f"checkpoint entry of type {name} has fields {sorted(fields)}, expected {sorted(want)}"
        )
    values = {k: _unpack(v, tensors) for k, v in fields.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint entry of type {name} is invalid: {exc}") from None


def _hashable(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, (dict, set)):
        raise CheckpointError("checkpoint uses an unhashable value as a key")
    return v


def save_bundle(directory: str | Path, name: str, obj: Any) -> None:
    """Pack ``obj`` into ``<dir>/<name>.safetensors`` + ``<dir>/<name>.json`` atomically."""
    tensors: dict[str, Any] = {}
    tree = pack(obj, tensors)
    save_state_flat(Path(directory) / name, tensors, {"tree": tree})


def load_bundle(directory: str | Path, name: str) -> Any:
    """Verify and unpack what ``save_bundle`` wrote (see ``load_state_flat`` and ``unpack``)."""
    tensors, meta = load_state_flat(Path(directory) / name)
    if "tree" not in meta:
        raise CheckpointError(f"checkpoint {Path(directory) / name} holds no packed data")
    return unpack(meta["tree"], tensors)
