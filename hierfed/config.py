"""The run configuration: loading YAML and ``key=value`` overrides into a typed RunConfig.

This is the only module that imports omegaconf. Everything past ``load_config`` receives the
typed ``RunConfig`` dataclasses (``hierfed.config_schema``, re-exported here) — never a
DictConfig. Value checks live in ``hierfed.config_checks`` (``validate_config``, re-exported).

Precedence: schema defaults < ``--config FILE`` < ``--topology`` < ``key=value`` overrides.
Unknown keys, wrong types, out-of-range values, unreadable files and malformed YAML all raise
``ConfigError`` naming the key (or ``--config``), the value and the fix — never a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hierfed.config_checks import (
    check_federation,
    check_gossip_options,
    check_tier_names,
    validate_config,
)
from hierfed.config_schema import (
    AttackConfig,
    CheckpointConfig,
    ClockConfig,
    ContinualConfig,
    DataConfig,
    DeploymentConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    PrivacyConfig,
    PrivacyPolicy,
    RunConfig,
    RuntimeConfig,
    TierConfig,
    TopologyConfig,
    TrainConfig,
)
from hierfed.errors import ConfigError

__all__ = [
    "MISSING",
    "AttackConfig",
    "CheckpointConfig",
    "ClockConfig",
    "ContinualConfig",
    "DataConfig",
    "DeploymentConfig",
    "EvalConfig",
    "LoggingConfig",
    "ModelConfig",
    "PrivacyConfig",
    "PrivacyPolicy",
    "RunConfig",
    "RuntimeConfig",
    "TierConfig",
    "TopologyConfig",
    "TrainConfig",
    "check_federation",
    "check_gossip_options",
    "check_tier_names",
    "load_config",
    "to_dict",
    "to_yaml",
    "validate_config",
]

# what parsing a YAML file or an override value can raise besides omegaconf's own errors
_PARSE_ERRORS = (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, AttributeError)


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def _read_yaml(path: str | Path) -> DictConfig:
    """The mapping in a YAML config file; ConfigError('--config', ...) for anything else."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", str(path), "no such file; give the path of a YAML config")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError("--config", str(path), f"cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", str(path), "not UTF-8 text; save the YAML as UTF-8") from None
    try:
        loaded = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except AssertionError:  # omegaconf asserts on a top-level scalar
        loaded = None
    except _PARSE_ERRORS as exc:
        raise ConfigError("--config", str(path), f"not valid YAML ({_first_line(exc)})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            "--config",
            str(path),
            "the file must hold a YAML mapping of config sections, e.g. 'rounds: 3'",
        )
    return loaded


def _first_line(exc: BaseException) -> str:
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    return lines[0] if lines else type(exc).__name__


def _full_key(exc: BaseException, fallback: str) -> str:
    key = getattr(exc, "full_key", None)
    return str(key) if key else fallback


def _merge_override(cfg: DictConfig, ov: str) -> DictConfig:
    if "=" not in ov:
        raise ConfigError(ov, None, "overrides are written key=value, e.g. rounds=3")
    key, value = (x.strip() for x in ov.split("=", 1))
    if not key:
        raise ConfigError(ov, None, "overrides are written key=value, e.g. rounds=3")
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
    except _PARSE_ERRORS as exc:
        raise ConfigError(_full_key(exc, key), value, _fix_of(exc)) from None
    assert isinstance(merged, DictConfig)  # a merge into a structured mapping stays one
    return merged


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    topology: str | None = None,
    out: str | None = None,
    validate: bool = True,
) -> RunConfig:
    """Merge defaults, an optional YAML file and ``key=value`` overrides into a RunConfig."""
    cfg = _schema()
    if path is not None:
        loaded = _read_yaml(path)
        try:
            cfg = OmegaConf.merge(cfg, loaded)  # type: ignore[assignment]  # stays a DictConfig
        except _PARSE_ERRORS as exc:
            raise ConfigError(_full_key(exc, "--config"), str(path), _fix_of(exc)) from None
    try:
        if topology is not None:
            cfg.topology.name = topology
        if out is not None:
            cfg.out = out
    except _PARSE_ERRORS as exc:
        raise ConfigError(_full_key(exc, "--topology"), topology, _fix_of(exc)) from None
    for ov in overrides or []:
        cfg = _merge_override(cfg, ov)
    try:
        obj = OmegaConf.to_object(cfg)
    except _PARSE_ERRORS as exc:
        raise ConfigError(_full_key(exc, "config"), None, _fix_of(exc)) from None
    if not isinstance(obj, RunConfig):
        raise ConfigError("config", None, "the config did not resolve to a run configuration")
    if validate:
        validate_config(obj)
    return obj


def _fix_of(exc: BaseException) -> str:
    msg = _first_line(exc)
    name = type(exc).__name__
    if "not in" in msg or "ConfigKeyError" in name or "ConfigAttributeError" in name:
        return f"{msg}; unknown key — `python -m hierfed show-config` lists the valid keys"
    if isinstance(exc, yaml.YAMLError):
        return f"the value is not valid YAML ({msg}); quote it, e.g. key='value'"
    return f"{msg}; check the type the schema expects (`python -m hierfed show-config`)"


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
