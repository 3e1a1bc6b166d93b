"""Rebuild a trained model on the driver, from a run folder or from live objects.

``load_run(run_dir)`` reads ``config.yaml`` and ``final_state.safetensors`` (checksummed,
``hierfed.checkpoint.load_state``), rebuilds the federation and the model skeleton from the
config and seed exactly as the workers did, and loads the final components. Anything that
does not fit (no such folder, a config that no longer loads, a state whose components or
shapes differ from the model the config builds) is one ``ExplainError`` line saying what
and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hierfed.config import RunConfig, load_config
from hierfed.data.federation import Federation
from hierfed.errors import HierfedError
from hierfed.model.m3t import M3TModel, build_model
from hierfed.update import State


class ExplainError(HierfedError):
    """A run folder cannot be explained as asked (missing files, a model that cannot be rebuilt,
    an unknown group column)."""


@dataclass
class Rebuilt:
    """A trained model on the driver: ``model`` holds ``final``; ``initial`` is every
    component as the seed built it (the "untrained" value component ablation restores)."""

    cfg: RunConfig
    federation: Federation  # text already turned into ids when the backbone needs it
    model: M3TModel
    initial: State
    final: State


def rebuild(cfg: RunConfig, federation: Federation, final: State) -> Rebuilt:
    """Build the skeleton for ``cfg`` and load ``final`` into it; ``final`` is not mutated."""
    from hierfed.model.hf_backbone import tokenize_federation

    model = build_model(cfg.model, federation, cfg.seed)
    fed = tokenize_federation(federation, model.backbone, cfg.model.text_len)
    initial = model.component_state()
    missing = sorted(set(initial) - set(final))
    extra = sorted(set(final) - set(initial))
    if missing or extra:
        raise ExplainError(
            f"the final state does not fit the model this config builds (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); explain the run with the config.yaml it was trained with"
        )
    for c, params in initial.items():
        for p in sorted(set(params) | set(final[c])):
            got = tuple(final[c][p].shape) if p in final[c] else None
            want = tuple(params[p].shape) if p in params else None
            if got != want:
                raise ExplainError(
                    f"'{c}/{p}' has shape {got} in the final state but {want} in the model the "
                    "config builds; explain the run with the config.yaml it was trained with"
                )
    model.load_components(final)
    model.eval()
    return Rebuilt(cfg, fed, model, initial, final)


def load_run(run_dir: str | Path) -> Rebuilt:
    """The trained model of a finished run folder (see the module docstring)."""
    from hierfed.checkpoint import load_state
    from hierfed.simulation import build_federation

    root = Path(run_dir)
    cfg_path, stem = root / "config.yaml", root / "final_state"
    if not cfg_path.is_file():
        raise ExplainError(
            f"'{root}' is not a run folder (no config.yaml); give the folder a run wrote"
        )
    if not stem.with_suffix(".safetensors").is_file():
        raise ExplainError(
            f"'{root}' has no final_state.safetensors: the run did not finish; "
            "resume it (python -m hierfed run --resume RUN_DIR) or explain a finished run"
        )
    try:
        cfg = load_config(cfg_path, out=str(root))
    except HierfedError as exc:
        raise ExplainError(
            f"cannot rebuild the model of '{root}': its config.yaml does not load ({exc})"
        ) from None
    final, _ = load_state(stem)
    try:
        fed = build_federation(cfg)
        return rebuild(cfg, fed, final)
    except ExplainError:
        raise
    except (HierfedError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ExplainError(
            f"cannot rebuild the model of '{root}' from its config.yaml: "
            f"{type(exc).__name__}: {exc}"
        ) from None
