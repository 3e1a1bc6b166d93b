"""ModelSpec / ComponentSpec: what the trainable components are, their shapes and scopes.

Component names: ``encoder.<modality>``, ``adapter.<where>`` (peft LoRA), ``prompt.<task>``,
``head.<task>``. The frozen backbone is not a component: it is never trained or sent.

A component's *scope* says how far up the tree it is merged: ``global`` (to the root),
a tier name such as ``institution`` (merged among that institution's members, no higher),
or ``local`` (never leaves the client).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from hierfed.data.federation import ClientProfile, Federation
from hierfed.errors import ConfigError


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    kind: str  # encoder | adapter | prompt | head
    scope: str  # global | <tier name> | local
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (param name, shape), sorted by name

    @property
    def numel(self) -> int:
        n = 0
        for _, shape in self.shapes:
            k = 1
            for s in shape:
                k *= s
            n += k
        return n


@dataclass(frozen=True)
class ModelSpec:
    """All components of a model, and the rules that pick a client's subset."""

    components: Mapping[str, ComponentSpec]
    tier_names: tuple[str, ...]  # root first
    resources: Mapping[str, tuple[str, ...]]  # resource class -> glob patterns of components
    backbone_numel: int = 0
    lora_rank: int = 0  # the skeleton's (largest) adapter rank
    resource_ranks: Mapping[str, int] = field(
        default_factory=dict
    )  # class -> rank (missing: lora_rank)

    def rank_of(self, profile: ClientProfile) -> int:
        """The LoRA rank a client trains: its resource class's, else the skeleton's."""
        return int(self.resource_ranks.get(profile.resource, self.lora_rank))

    def scope_level(self, component: str) -> int:
        """The deepest tier index at which ``component`` is merged (0 = root).

        A node at tier index ``l`` takes ``component`` from its parent when
        ``scope_level < l`` and sends it up only then; otherwise it keeps its own value.
        """
        scope = self.components[component].scope
        if scope == "global":
            return 0
        if scope == "local":
            return len(self.tier_names) - 1
        return self.tier_names.index(scope)

    def holds(
        self, profile: ClientProfile, tasks: Mapping[str, object] | None = None
    ) -> tuple[str, ...]:
        """The components a client builds and trains: its modalities' encoders, its tasks'
        prompts and heads, the adapters — filtered by its resource class."""
        if profile.resource not in self.resources:
            raise ConfigError(
                "model.resources",
                profile.resource,
                f"client '{profile.id}' has resource class '{profile.resource}'; "
                f"known: {sorted(self.resources)} (add it to model.resources)",
            )
        patterns = self.resources[profile.resource]
        out = []
        for name, spec in self.components.items():
            if spec.kind == "encoder" and name.split(".", 1)[1] not in profile.modalities:
                continue
            if spec.kind in ("head", "prompt") and name.split(".", 1)[1] not in profile.tasks:
                continue
            if spec.kind == "adapter" and self.resource_ranks and self.rank_of(profile) == 0:
                continue  # a rank-0 class trains no adapter
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                out.append(name)
        return tuple(sorted(out))

    def trainable_numel(self) -> int:
        return sum(c.numel for c in self.components.values())


def resolve_scope(name: str, scopes: Mapping[str, str], federation: Federation) -> str:
    """The scope of component ``name`` from the ``model.scopes`` glob table (first match wins)."""
    for pattern, scope in scopes.items():
        if fnmatch.fnmatchcase(name, pattern):
            if scope not in ("global", "local") and scope not in federation.tier_names:
                raise ConfigError(
                    f"model.scopes.{pattern}",
                    scope,
                    f"use 'global', 'local' or a tier name of this federation: {list(federation.tier_names)}",
                )
            if scope == federation.tier_names[0]:
                return "global"
            if scope == federation.tier_names[-1]:
                return "local"
            return scope
    return "global"
