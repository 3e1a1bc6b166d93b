"""Config checks for the edge options of codecs and secure aggregation (before any work).

``check_edges`` needs only the config; ``check_edges_federation`` also the tier names (the
leaf tier's chain runs between peers, where no merge delivers a stateful codec).
"""

from __future__ import annotations

from hierfed.config_schema import RunConfig, TierConfig
from hierfed.errors import ConfigError


def _tiers(cfg: RunConfig) -> list[tuple[str, TierConfig]]:
    return [("topology.default", cfg.topology.default)] + [
        (f"topology.tiers.{n}", t) for n, t in cfg.topology.tiers.items()
    ]


def check_edges(cfg: RunConfig) -> None:
    """Broadcast codec names, stateful codecs last in their chain and only where a merge
    delivers them, and secure aggregation only with rules that merge by summing."""
    from hierfed.postprocess.broadcast import BROADCAST_CODECS
    from hierfed.postprocess.wire import Codec
    from hierfed.registry import AGGREGATORS, POSTPROCESSORS
    from hierfed.secagg.edge import MODES, check_options

    for key, tier in _tiers(cfg):
        if tier.broadcast_codec not in BROADCAST_CODECS:
            raise ConfigError(
                f"{key}.broadcast_codec",
                tier.broadcast_codec,
                f"known: {', '.join(BROADCAST_CODECS)} (top-k has no broadcast form: a sparse "
                "state is not a model; use it in postprocess, for uploads)",
            )
        if tier.broadcast_codec != "none" and cfg.topology.name == "gossip":
            raise ConfigError(
                f"{key}.broadcast_codec", tier.broadcast_codec, "gossip has no broadcast; use none"
            )
        chain = [POSTPROCESSORS.get(n) for n in tier.postprocess]
        for i, cls in enumerate(chain):
            if getattr(cls, "stateful", False) and i != len(chain) - 1:
                raise ConfigError(
                    f"{key}.postprocess",
                    list(tier.postprocess),
                    f"'{tier.postprocess[i]}' keeps state on the sender and must come last",
                )
            if getattr(cls, "stateful", False) and cfg.topology.name == "gossip":
                raise ConfigError(
                    f"{key}.postprocess",
                    list(tier.postprocess),
                    f"'{tier.postprocess[i]}' needs a parent that merges (error feedback); "
                    "gossip has none: use fp16 or int8",
                )
        if tier.secure_aggregation not in MODES:
            raise ConfigError(
                f"{key}.secure_aggregation", tier.secure_aggregation, f"known: {', '.join(MODES)}"
            )
        if not isinstance(tier.secure_aggregation_options, dict):
            raise ConfigError(
                f"{key}.secure_aggregation_options",
                tier.secure_aggregation_options,
                "a mapping, e.g. {clipping_range: 8}",
            )
        if tier.secure_aggregation == "none":
            if tier.secure_aggregation_options:
                raise ConfigError(
                    f"{key}.secure_aggregation_options",
                    dict(tier.secure_aggregation_options),
                    f"set {key}.secure_aggregation: secagg+ or drop these options",
                )
            continue
        check_options(dict(tier.secure_aggregation_options), f"{key}.secure_aggregation_options")
        if cfg.topology.name == "gossip":
            raise ConfigError(
                f"{key}.secure_aggregation",
                tier.secure_aggregation,
                "gossip has no server to aggregate securely",
            )
        if not AGGREGATORS.get(tier.aggregator).associative:
            raise ConfigError(
                f"{key}.aggregator",
                tier.aggregator,
                "needs each member's update, which secure aggregation hides (the server sees only "
                "the sum): use weighted_mean or lora_naive, or drop secure_aggregation",
            )
        codecs = [n for n, cls in zip(tier.postprocess, chain) if issubclass(cls, Codec)]
        if codecs:
            raise ConfigError(
                f"{key}.postprocess",
                list(tier.postprocess),
                f"codec {codecs[0]} with secure_aggregation: the masked integers are the "
                "encoding (quantization_range); drop the codec",
            )
        clip_side = tier.postprocess_options.get("clip", {}).get("side", "sender")
        if "clip" in tier.postprocess and clip_side != "sender":
            raise ConfigError(
                f"{key}.postprocess_options.clip.side",
                clip_side,
                "receiver-side clipping needs each update in the clear; use side: sender",
            )
        if cfg.eval.contributions:
            raise ConfigError(
                "eval.contributions",
                True,
                f"leave-one-out influence needs each member's update, hidden by {key}.secure_aggregation",
            )


def check_edges_federation(cfg: RunConfig, tier_names: tuple[str, ...]) -> None:
    """A stateful codec (top-k) cannot go on the leaf tier's chain (it runs between peers)."""
    from hierfed.registry import POSTPROCESSORS

    leaf = cfg.topology.tiers.get(tier_names[-1])
    if leaf is None:
        return
    for name in leaf.postprocess:
        if getattr(POSTPROCESSORS.get(name), "stateful", False):
            raise ConfigError(
                f"topology.tiers.{tier_names[-1]}.postprocess",
                list(leaf.postprocess),
                f"'{name}' needs a parent that merges (error feedback); between peers use fp16 or int8",
            )
