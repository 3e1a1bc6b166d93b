"""Value checks of a loaded RunConfig: ranges, plug-in names, cross-key rules.

``validate_config`` runs before any work starts (``hierfed.config.load_config`` and
``hierfed.simulation.run`` call it) and needs nothing but the config. ``check_federation``
adds the rules that need the federation's tier names and modalities; it is cheap (no model,
no Ray) and runs right after the federation is built, before any worker starts.

Every refusal is a ``ConfigError``: one line naming the key, the value and the fix.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any

from hierfed.config_schema import RunConfig, TierConfig
from hierfed.continual.checks import check_continual_federation
from hierfed.errors import ConfigError, RegistryError
from hierfed.secagg.checks import check_edges_federation

__all__ = ["check_federation", "check_gossip_options", "check_tier_names", "validate_config"]

PEER_GRAPHS = ("ring", "torus", "complete", "random_regular", "erdos_renyi", "small_world")
# gossip graphs with no randomness: resampling them each round gives the same graph
FIXED_GOSSIP_GRAPHS = ("ring", "torus", "complete", "edges")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _positive_int(key: str, v: object) -> None:
    if not _is_int(v) or v <= 0:  # type: ignore[operator]
        raise ConfigError(key, v, "must be a positive integer")


def _nonneg_int(key: str, v: object, fix: str) -> None:
    if not _is_int(v) or v < 0:  # type: ignore[operator]
        raise ConfigError(key, v, fix)


def _nonneg(key: str, v: object) -> None:
    if not _is_real(v) or v < 0 or math.isinf(v):  # type: ignore[operator,arg-type]
        raise ConfigError(key, v, "must be a finite number >= 0")


def _positive(key: str, v: object) -> None:
    if not _is_real(v) or math.isinf(v) or v <= 0:  # type: ignore[operator,arg-type]
        raise ConfigError(key, v, "must be a finite number > 0")


def _in_range(key: str, v: object, lo: float, hi: float, *, closed_hi: bool, fix: str) -> None:
    """``lo <= v < hi`` (``<= hi`` when ``closed_hi``)."""
    ok = _is_real(v) and lo <= v and (v <= hi if closed_hi else v < hi)  # type: ignore[operator]
    if not ok:
        raise ConfigError(key, v, fix)


def _mapping(key: str, v: object, example: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise ConfigError(key, v, f"must be a mapping, e.g. {example}")
    return v


def _registered(key: str, registry: Any, name: str) -> None:
    try:
        registry.get(name)
    except RegistryError as exc:
        raise ConfigError(key, name, str(exc)) from None


# checks that live beside their features ("module:function", each raises ConfigError); a new
# feature adds its line here rather than its rules to this module
FEATURE_CHECKS = (
    "hierfed.attacks:check_attack_config",
    "hierfed.privacy.policy:check_privacy_config",
    "hierfed.batched.support:check_batched_config",
    "hierfed.tracking:check_logging_config",
    "hierfed.continual.checks:check_continual_config",
    "hierfed.faults:check_faults_config",
    "hierfed.secagg.checks:check_edges",  # codecs and secure aggregation on tier edges
    "hierfed.runtime.gpus:check_gpu_config",  # a GPU share Ray can place
)


def validate_config(cfg: RunConfig) -> None:
    """Check ranges and plug-in names; raises ConfigError before any work starts."""
    from hierfed import plugins  # registers the built-in plug-ins

    plugins.import_modules(cfg.plugins)  # workloads registered outside the library
    _positive_int("rounds", cfg.rounds)
    _nonneg_int("seed", cfg.seed, "must be an integer >= 0")
    _check_data(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_topology(cfg)
    _check_runtime(cfg)
    _check_rest(cfg)
    _mapping("attack.options", cfg.attack.options, "{scale: 10}")
    for name, pol in cfg.privacy.policies.items():
        _mapping(f"privacy.policies.{name}.modalities", pol.modalities, "{image: 2.0}")
    for path in FEATURE_CHECKS:  # each feature checks its own section, in this order
        module, func = path.split(":")
        getattr(importlib.import_module(module), func)(cfg)


def _check_data(cfg: RunConfig) -> None:
    from hierfed.registry import DATASETS

    d = cfg.data
    _registered("data.name", DATASETS, d.name)
    for k in ("num_institutions", "students_per_institution", "samples_per_student"):
        _positive_int(f"data.{k}", getattr(d, k))
    _positive_int("data.global_test_size", d.global_test_size)
    if not _is_real(d.test_fraction) or not (0 < d.test_fraction < 1):
        raise ConfigError(
            "data.test_fraction", d.test_fraction, "must lie strictly between 0 and 1"
        )
    _positive("data.label_skew", d.label_skew)
    _nonneg("data.size_skew", d.size_skew)
    _in_range(
        "data.missing_modality", d.missing_modality, 0, 1, closed_hi=False, fix="must lie in [0, 1)"
    )
    if d.name == "edu-synth" and (
        d.essay_only_institutions < 0 or d.essay_only_institutions >= d.num_institutions
    ):
        raise ConfigError(
            "data.essay_only_institutions",
            d.essay_only_institutions,
            f"must lie in [0, data.num_institutions={d.num_institutions})",
        )
    _nonneg_int("data.max_clients", d.max_clients, "must be >= 0 (0 keeps all clients)")
    _mapping("data.options", d.options, "{root: data/}")


def _check_model(cfg: RunConfig) -> None:
    from hierfed.registry import BACKBONES

    m = cfg.model
    if not m.backbone:
        raise ConfigError(
            "model.backbone", m.backbone, f"give one of {BACKBONES.names()} or a model path"
        )
    for k in ("d_model", "num_layers", "num_heads", "max_tokens", "text_len"):
        _positive_int(f"model.{k}", getattr(m, k))
    _nonneg_int(
        "model.lora_rank", m.lora_rank, "must be an integer >= 0 (0 builds no LoRA adapter)"
    )
    if m.d_model % m.num_heads:
        raise ConfigError("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")
    _positive("model.lora_alpha", m.lora_alpha)
    _in_range("model.lora_dropout", m.lora_dropout, 0, 1, closed_hi=False, fix="must lie in [0, 1)")
    _nonneg_int("model.prompt_tokens", m.prompt_tokens, "must be >= 0 (0 disables prompts)")
    if m.backbone == "tiny" and m.prompt_tokens >= m.max_tokens:
        raise ConfigError(
            "model.prompt_tokens",
            m.prompt_tokens,
            f"the prompt alone fills model.max_tokens={m.max_tokens}; lower it or raise "
            "model.max_tokens (prompts and every modality's tokens share that budget)",
        )
    if m.lora_rank > 0 and not m.lora_targets:
        raise ConfigError(
            "model.lora_targets",
            m.lora_targets,
            "name at least one module, e.g. [q_proj, v_proj] (or set model.lora_rank=0 for no adapter)",
        )
    _mapping("model.resources", m.resources, "{full: ['*'], light: ['head.*']}")
    for cls_name, rank in _mapping("model.resource_ranks", m.resource_ranks, "{light: 2}").items():
        if cls_name not in m.resources:
            raise ConfigError(
                f"model.resource_ranks.{cls_name}",
                rank,
                f"not a resource class; known: {sorted(m.resources)} (add it to model.resources)",
            )
        if not _is_int(rank) or not (0 <= rank <= m.lora_rank):
            raise ConfigError(
                f"model.resource_ranks.{cls_name}",
                rank,
                f"must be an integer in [0, model.lora_rank={m.lora_rank}]; raise model.lora_rank "
                "to the largest rank (it sizes the shared adapter)",
            )
    for pat, scope in _mapping("model.scopes", m.scopes, "{'head.*': local}").items():
        if not scope or not isinstance(scope, str):
            raise ConfigError(f"model.scopes.{pat}", scope, "give 'global', 'local' or a tier name")


def _check_train(cfg: RunConfig) -> None:
    t = cfg.train
    _positive_int("train.local_epochs", t.local_epochs)
    _positive_int("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    if t.optimizer not in ("adam", "sgd"):
        raise ConfigError("train.optimizer", t.optimizer, "known: adam, sgd")
    for k in ("momentum", "weight_decay", "fedprox_mu", "max_grad_norm"):
        _nonneg(f"train.{k}", getattr(t, k))


def _check_topology(cfg: RunConfig) -> None:
    from hierfed.registry import TOPOLOGIES

    _registered("topology.name", TOPOLOGIES, cfg.topology.name)
    _mapping("topology.options", cfg.topology.options, "{graph: ring}")
    tiers = dict(_mapping("topology.tiers", cfg.topology.tiers, "{institution: {quorum: 0.5}}"))
    tiers["default"] = cfg.topology.default
    for tname, tier in tiers.items():
        key = "topology.default" if tname == "default" else f"topology.tiers.{tname}"
        _check_tier_plugins(key, tier)
        _check_tier_values(key, tier)
    check_gossip_options(cfg)


def _check_tier_plugins(key: str, tier: TierConfig) -> None:
    """Aggregator, server optimizer and postprocessor names and options of one tier."""
    from hierfed.registry import AGGREGATORS, POSTPROCESSORS, SERVER_OPTIMIZERS

    _registered(f"{key}.aggregator", AGGREGATORS, tier.aggregator)
    _registered(f"{key}.server_optimizer", SERVER_OPTIMIZERS, tier.server_optimizer)
    pp_opts = _mapping(f"{key}.postprocess_options", tier.postprocess_options, "{clip: {...}}")
    for pp in tier.postprocess:
        _registered(f"{key}.postprocess", POSTPROCESSORS, pp)
        opts = _mapping(f"{key}.postprocess_options.{pp}", pp_opts.get(pp, {}), "{max_norm: 1}")
        POSTPROCESSORS.get(pp).check_options(dict(opts), key=f"{key}.postprocess_options.{pp}")
    for pp in pp_opts:
        if pp not in tier.postprocess:
            raise ConfigError(
                f"{key}.postprocess_options.{pp}",
                pp_opts[pp],
                f"'{pp}' is not in {key}.postprocess {list(tier.postprocess)}; add it there or drop its options",
            )
    opts = _mapping(f"{key}.options", tier.options, "{trim: 0.2}")
    AGGREGATORS.get(tier.aggregator).check_options(dict(opts), key=f"{key}.options")


def _check_tier_values(key: str, tier: TierConfig) -> None:
    """Ranges of one tier's numeric and enumerated settings."""
    if not _is_real(tier.participation) or not (0 < tier.participation <= 1):
        raise ConfigError(
            f"{key}.participation", tier.participation, "must be a fraction in (0, 1]"
        )
    _in_range(
        f"{key}.quorum", tier.quorum, 0, 1, closed_hi=True, fix="must be a fraction in [0, 1]"
    )
    _in_range(
        f"{key}.dropout",
        tier.dropout,
        0,
        1,
        closed_hi=False,
        fix="a probability in [0, 1) (0 = nobody drops out)",
    )
    _nonneg(f"{key}.deadline_s", tier.deadline_s)
    if tier.sampling not in ("uniform", "by_resource"):
        raise ConfigError(f"{key}.sampling", tier.sampling, "known: uniform, by_resource")
    if tier.straggler not in ("discard", "drop"):
        raise ConfigError(f"{key}.straggler", tier.straggler, "known: discard, drop")
    _nonneg_int(f"{key}.peer_steps", tier.peer_steps, "an integer >= 0 (0 = no peer mixing)")
    if tier.peer_graph not in PEER_GRAPHS:
        raise ConfigError(f"{key}.peer_graph", tier.peer_graph, f"known: {', '.join(PEER_GRAPHS)}")
    _positive_int(f"{key}.local_rounds", tier.local_rounds)
    _positive(f"{key}.server_lr", tier.server_lr)
    for k in ("server_momentum", "beta1", "beta2"):
        _in_range(f"{key}.{k}", getattr(tier, k), 0, 1, closed_hi=False, fix="must lie in [0, 1)")
    _positive(f"{key}.tau", tier.tau)


def check_gossip_options(cfg: RunConfig) -> None:
    """Gossip options that would silently do nothing: ``time_varying`` on a graph without
    randomness (ring, torus, complete, a fixed edge list) resamples the same graph."""
    if cfg.topology.name != "gossip":
        return
    opts = cfg.topology.options
    graph = opts.get("graph", "ring")
    if opts.get("time_varying", False) is True and graph in FIXED_GOSSIP_GRAPHS:
        raise ConfigError(
            "topology.options.time_varying",
            True,
            f"graph '{graph}' is fixed, so resampling it each round changes nothing; use a random "
            "graph (random_regular, erdos_renyi, small_world) or drop time_varying",
        )


def _check_runtime(cfg: RunConfig) -> None:
    r = cfg.runtime
    if r.name not in ("ray", "local"):
        raise ConfigError("runtime.name", r.name, "known: ray, local")
    _nonneg_int("runtime.num_workers", r.num_workers, "must be >= 0 (0 = one per CPU)")
    _nonneg_int("runtime.num_cpus", r.num_cpus, "must be >= 0 (0 = all)")
    _nonneg("runtime.gpus_per_worker", r.gpus_per_worker)
    _positive("runtime.round_timeout_s", r.round_timeout_s)
    if not _is_int(r.chunks_per_worker) or r.chunks_per_worker < 1:
        raise ConfigError(
            "runtime.chunks_per_worker",
            r.chunks_per_worker,
            "an integer >= 1 (1 = one contiguous slice per worker, no load balancing)",
        )
    if r.on_worker_failure not in ("retry", "drop"):
        raise ConfigError("runtime.on_worker_failure", r.on_worker_failure, "known: retry, drop")
    if r.on_client_failure not in ("fail", "drop"):
        raise ConfigError("runtime.on_client_failure", r.on_client_failure, "known: fail, drop")
    if r.address is not None and (not isinstance(r.address, str) or not r.address.strip()):
        raise ConfigError(
            "runtime.address", r.address, "give 'auto' or host:port, or leave it unset"
        )


def _check_rest(cfg: RunConfig) -> None:
    """Checkpoint, evaluation and clock sections."""
    _nonneg_int(
        "checkpoint.every", cfg.checkpoint.every, "must be >= 0 (0 = only after the last round)"
    )
    _positive_int("checkpoint.keep", cfg.checkpoint.keep)
    _positive_int("eval.every", cfg.eval.every)
    _positive_int("eval.batch_size", cfg.eval.batch_size)
    ck = cfg.clock
    for k in ("rows_per_s", "bandwidth_mbps", "latency_s"):
        _positive(f"clock.{k}", getattr(ck, k))
    for k in ("compute_sigma", "group_sigma", "bandwidth_sigma", "latency_sigma", "round_jitter"):
        _nonneg(f"clock.{k}", getattr(ck, k))
    for k in ("resource_speed", "resource_bandwidth"):
        for name, factor in getattr(ck, k).items():
            if name not in cfg.model.resources:
                raise ConfigError(
                    f"clock.{k}.{name}",
                    factor,
                    f"not a resource class; known: {sorted(cfg.model.resources)}",
                )
            _positive(f"clock.{k}.{name}", factor)


# ---------------------------------------------------------------- rules that need the federation


def check_tier_names(cfg: RunConfig, tier_names: tuple[str, ...]) -> None:
    """Every ``topology.tiers.<name>`` must be a tier of the topology: a typo (``instituion``)
    or a tier the topology does not have (``institution`` under ``star``) would otherwise
    leave the real tiers on their defaults, silently. ``tier_names``: the built topology's
    (``Topology.tier_names``; a plug-in may name its own, e.g. ``hub``)."""
    for name in cfg.topology.tiers:
        if name not in tier_names:
            raise ConfigError(
                f"topology.tiers.{name}",
                name,
                f"not a tier of the {cfg.topology.name} topology here; its tiers are "
                f"{list(tier_names)} (use topology.default for every aggregating tier)",
            )


def _check_attack_tier(cfg: RunConfig, tier_names: tuple[str, ...]) -> None:
    tier = cfg.attack.tier
    if cfg.attack.name != "none" and tier and tier not in tier_names:
        raise ConfigError(
            "attack.tier",
            tier,
            f"give a tier of this federation: {list(tier_names)} ('' = the leaf tier)",
        )


def _task_widths(cfg: RunConfig, federation: Any) -> dict[str, int]:
    """Tokens the tiny backbone sees per task: prompt + each modality's tokens (hierfed.model.m3t:
    text ``text_len``, tabular 2, image one per 2x2 patch, or per pixel for odd sizes)."""
    out: dict[str, int] = {}
    for name, task in federation.tasks.items():
        width = cfg.model.prompt_tokens
        for m in task.modalities:
            spec = federation.modalities[m]
            if spec.kind == "text":
                width += cfg.model.text_len
            elif spec.kind == "tabular":
                width += 2
            elif spec.kind == "image" and len(spec.shape) == 3:
                _, h, w = spec.shape
                p = 1 if h % 2 or w % 2 else 2
                width += (h // p) * (w // p)
        out[name] = width
    return out


def check_federation(cfg: RunConfig, federation: Any) -> None:
    """Config rules that need the built federation (tier names, modalities); no model, no Ray.

    Call it after the federation is built and before any worker starts. (``topology.tiers``
    names need the built topology: ``check_tier_names``.)"""
    _check_attack_tier(cfg, tuple(federation.tier_names))
    check_continual_federation(cfg, federation)
    check_edges_federation(cfg, tuple(federation.tier_names))
    if cfg.model.backbone != "tiny":
        return  # a pretrained backbone's budget is its own max_position_embeddings
    for task, width in sorted(_task_widths(cfg, federation).items()):
        if width > cfg.model.max_tokens:
            raise ConfigError(
                "model.prompt_tokens" if cfg.model.prompt_tokens else "model.max_tokens",
                cfg.model.prompt_tokens if cfg.model.prompt_tokens else cfg.model.max_tokens,
                f"task '{task}' needs {width} tokens (prompt + its modalities) but "
                f"model.max_tokens={cfg.model.max_tokens}; raise model.max_tokens to >= {width} "
                "or lower model.prompt_tokens / model.text_len",
            )
