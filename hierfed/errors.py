"""Exception hierarchy: every error hierfed raises on purpose is a HierfedError.

Messages name what is wrong, the offending value, and how to fix it.
"""

from __future__ import annotations


class HierfedError(Exception):
    """Base class of all hierfed errors."""


class ConfigError(HierfedError, ValueError):
    """A configuration key has a wrong type, value or name; raised before any work starts."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"config key '{key}' = {value!r}: {fix}")

    def __reduce__(self) -> tuple:  # crosses processes (a Ray worker's skeleton build) intact
        return (type(self), (self.key, self.value, self.fix))


class RegistryError(HierfedError, KeyError):
    """An unknown plug-in name was requested from a Registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(HierfedError, ValueError):
    """A dataset or federation cannot be built as asked (empty tier, missing package, ...)."""


class UpdateRejected(HierfedError):
    """An Update failed validation at a tier; carries the sender and the reason."""

    def __init__(self, sender: str, reason: str) -> None:
        self.sender, self.reason = sender, reason
        super().__init__(f"update from '{sender}' rejected: {reason}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.sender, self.reason))


class NodeFailure(HierfedError):
    """A node (client, worker, aggregator) failed during a round.

    Carries the node id, the round and the original cause, never a raw Ray trace.
    """

    def __init__(self, node_id: str, round: int, cause: str) -> None:
        self.node_id, self.round, self.cause = node_id, round, cause
        super().__init__(f"node '{node_id}' failed in round {round}: {cause}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.node_id, self.round, self.cause))


class CheckpointError(HierfedError):
    """A checkpoint is missing, truncated, corrupted or from an incompatible run."""


class RunCollapsed(HierfedError):
    """A run cannot go on: its global model went non-finite, or every update was rejected.

    Raised by the driver after the round that collapsed, before that round is checkpointed;
    the CLI exits non-zero with this one-line message."""

    def __init__(self, round: int, why: str) -> None:
        self.round, self.why = round, why
        super().__init__(f"run stopped after round {round}: {why}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.round, self.why))
