"""``train.batched``: when a worker trains its clients batched, and what it refuses.

* ``off`` — one client at a time (``ClientTrainer.fit``), as always.
* ``on`` — batched (``hierfed.batched.CohortTrainer``) for every client it supports; a config
  using a feature the batched path does not support is refused before anything starts.
* ``auto`` (default) — batched where it was measured faster: on a GPU, and on the CPU for
  single-task federations on a small frozen backbone (at most ``AUTO_CPU_MAX_BACKBONE``
  parameters); one at a time otherwise, and for any client the batched path does not support.

Supported by the batched path (each client's result equals its one-at-a-time result, bit for
bit on the CPU; ``docs/batched.md``): plain SGD, SGD with momentum / weight decay, Adam,
FedProx, gradient clipping, LoRA adapters at any (lower) client rank, personalization (local
components), simulated attackers (poisoned data), postprocess chains (run per client after
training, as before), multi-task clients and missing modalities (clients are grouped by trained
components and tasks). Not supported (``unsupported`` names them): DP-SGD, LoRA dropout,
continual schedules and mitigations (``hierfed.continual``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hierfed.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from hierfed.model.spec import ModelSpec

MODES = ("auto", "on", "off")
# ``auto`` on the CPU: batched up to this many frozen backbone parameters, single-task only.
# The benchmark MLP (1 k parameters, one task) trains about 5x faster batched. LoRA on
# MiniLM-L6 (22 M) is compute-bound on the CPU and gains nothing (issue 14's measurement).
# The tiny M3T on edu-synth (4 tasks) trains 0.5-0.93x as fast batched: each step splits its
# clients by task, and Adam's per-client step counts of the task heads split the steps again
# (docs/batched.md).
AUTO_CPU_MAX_BACKBONE = 1_000_000


def mode_of(value: object) -> str:
    """``train.batched`` as one of ``MODES``; YAML reads a bare on / off as a boolean."""
    text = str(value).lower()
    return {"true": "on", "false": "off"}.get(text, text)


def unsupported(cfg: Any) -> list[tuple[str, object, str]]:
    """The features of ``cfg`` the batched path does not support: (key, value, why)."""
    out: list[tuple[str, object, str]] = []
    if cfg.privacy.policies:
        out.append(
            (
                "privacy.policies",
                sorted(cfg.privacy.policies),
                "DP-SGD clients train one at a time (batched DP-SGD is not implemented)",
            )
        )
    from hierfed.continual import continual_on

    if continual_on(cfg):
        out.append(
            (
                "continual",
                "a schedule or mitigation",
                "a continual round's tasks, replay rows and EWC term are the one-at-a-time "
                "trainer's (hierfed/continual/fit.py)",
            )
        )
    if cfg.model.lora_dropout > 0:
        out.append(
            (
                "model.lora_dropout",
                cfg.model.lora_dropout,
                "dropout's keyed per-client draws cannot be reproduced batched",
            )
        )
    return out


def check_batched_config(cfg: Any) -> None:
    """Config-time checks of ``train.batched`` (called by ``validate_config``)."""
    mode = mode_of(cfg.train.batched)
    if mode not in MODES:
        raise ConfigError("train.batched", mode, "must be one of auto, on, off")
    size = cfg.train.batched_max_clients
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError("train.batched_max_clients", size, "must be a positive integer")
    if mode == "on":
        for key, value, why in unsupported(cfg):
            raise ConfigError(
                key,
                value,
                f"not supported with train.batched=on ({why}); "
                "set train.batched=auto (those clients then train one at a time) or off",
            )


def use_batched(cfg: Any, device: torch.device, spec: ModelSpec, num_tasks: int) -> bool:
    """Whether a worker on ``device`` trains batched (DP clients always go one at a time);
    ``num_tasks``: the federation's task count."""
    mode = mode_of(cfg.train.batched)
    if mode == "off":
        return False
    if mode == "on":
        return True
    if cfg.model.lora_dropout > 0:
        return False
    if device.type == "cuda":
        return True
    return num_tasks == 1 and spec.backbone_numel <= AUTO_CPU_MAX_BACKBONE
