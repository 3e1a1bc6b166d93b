"""Registry[T]: plug-ins (topologies, aggregators, postprocessors, datasets, backbones) by name.

Simulated attacks have their registry beside their contract, ``hierfed.attacks.ATTACKS``
(group ``hierfed.attacks``); ``python -m hierfed list`` shows every registry.

A plug-in registers with a decorator, or from another package through the entry point group
``hierfed.<kind>`` (e.g. ``hierfed.topologies``); entry points are loaded lazily, the first
time a registry is asked for a name or its list.

Example::

    >>> from hierfed.registry import Registry
    >>> shapes: Registry[type] = Registry("shape")
    >>> @shapes.register("square")
    ... class Square: ...
    >>> shapes.get("square") is Square
    True
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from hierfed.errors import RegistryError

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """A name -> plug-in table for one kind of plug-in."""

    def __init__(self, kind: str, *, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._loaded_entry_points = entry_point_group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name``; a name may be taken once."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        existing = self._items.get(name)
        if existing is not None and existing is not obj:
            raise RegistryError(
                f"{self.kind} '{name}' is already registered ({existing!r}); pick another name"
            )
        self._items[name] = obj

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in entry_points(group=self.entry_point_group or ""):
            if ep.name in self._items:
                continue
            try:
                self._items[ep.name] = ep.load()
            except Exception as exc:  # a broken third-party plug-in must not hide the others
                log.warning(
                    "could not load %s plug-in '%s' (%s): %s", self.kind, ep.name, ep.value, exc
                )

    def get(self, name: str) -> T:
        """The plug-in called ``name``; an unknown name lists the known ones."""
        self._load_entry_points()
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RegistryError(
                f"unknown {self.kind} '{name}'{hint}; known: {', '.join(known) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


TOPOLOGIES: Registry = Registry("topology", entry_point_group="hierfed.topologies")
AGGREGATORS: Registry = Registry("aggregator", entry_point_group="hierfed.aggregators")
SERVER_OPTIMIZERS: Registry = Registry(
    "server optimizer", entry_point_group="hierfed.server_optimizers"
)
POSTPROCESSORS: Registry = Registry("postprocessor", entry_point_group="hierfed.postprocessors")
DATASETS: Registry = Registry("dataset", entry_point_group="hierfed.datasets")
BACKBONES: Registry = Registry("backbone", entry_point_group="hierfed.backbones")
