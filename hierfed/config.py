"""The run configuration: a structured omegaconf schema, loading and validation.

This is the only module that imports omegaconf. Everything past ``load_config`` receives the
typed, frozen ``RunConfig`` dataclasses below — never a DictConfig.

Precedence: schema defaults < ``--config FILE`` < ``--topology`` < ``key=value`` overrides.
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hierfed.errors import ConfigError, RegistryError

__all__ = ["MISSING", "RunConfig", "load_config", "to_yaml"]


@dataclass
class DataConfig:
    name: str = "edu-synth"  # a registered dataset; `python -m hierfed list`
    num_institutions: int = 4
    students_per_institution: int = 6
    samples_per_student: int = 80  # mean; institutions skew it (size skew)
    test_fraction: float = 0.25  # of each client's rows held out for personalized eval
    global_test_size: int = 600  # rows in the global held-out set
    label_skew: float = 1.0  # Dirichlet alpha over classes per institution; small = more skew
    size_skew: float = 0.5  # lognormal sigma of per-student sample counts
    missing_modality: float = 0.25  # probability that a student lacks the image modality
    essay_only_institutions: int = 1  # institutions whose students only have text (essays)
    max_clients: int = 0  # 0 = all; otherwise keep the first N clients (by id) of a real dataset
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific extras


@dataclass
class ModelConfig:
    backbone: str = "tiny"  # a registered backbone: tiny | minilm | <hf id or local path>
    d_model: int = 64  # tiny backbone width (ignored for pretrained backbones)
    num_layers: int = 2
    num_heads: int = 4
    max_tokens: int = 48  # longest token sequence the backbone sees (prompts + all modalities)
    text_len: int = 16  # text tokens kept per sample
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0  # >0 draws from torch's RNG under a keyed fork
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    prompt_tokens: int = 4  # soft-prompt tokens per task; 0 disables prompt components
    head_hidden: int = 0  # 0 = linear heads
    # component scope overrides: glob pattern -> "global" | tier name | "local"
    scopes: dict[str, str] = field(default_factory=dict)
    # components trained per resource class (glob patterns)
    resources: dict[str, list[str]] = field(
        default_factory=lambda: {"full": ["*"], "light": ["head.*", "prompt.*"]}
    )
    # LoRA rank per resource class (heterogeneous ranks); a class not listed uses lora_rank,
    # which is also the skeleton's (largest) rank; 0 = the class trains no adapter
    resource_ranks: dict[str, int] = field(default_factory=dict)


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.01
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    fedprox_mu: float = 0.0  # proximal term towards the round's starting state; 0 = off
    max_grad_norm: float = 0.0  # plain (non-DP) gradient clipping; 0 = off


@dataclass
class TierConfig:
    aggregator: str = "weighted_mean"  # `python -m hierfed list` for the others
    participation: float = 1.0  # fraction of this node's children sampled per round, (0, 1]
    local_rounds: int = 1  # rounds this tier runs with its children per round of its parent
    server_optimizer: str = "sgd"  # sgd (plain apply) | fedavgm | fedadam | fedyogi
    server_lr: float = 1.0
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam / fedyogi
    beta2: float = 0.99
    tau: float = 1e-3
    postprocess: list[str] = field(
        default_factory=list
    )  # applied by senders into this tier, in order
    postprocess_options: dict[str, Any] = field(
        default_factory=dict
    )  # postprocessor name -> options
    options: dict[str, Any] = field(default_factory=dict)  # aggregator-specific options
    # stragglers and dropouts (hierfed/clock.py gives every node a simulated speed and link)
    dropout: float = (
        0.0  # probability that a sampled child of this node drops out of the round, [0, 1)
    )
    deadline_s: float = (
        0.0  # simulated seconds this node waits for its children per node-round; 0 = all
    )
    straggler: str = "discard"  # past the deadline: discard (sent late, bytes counted, not merged) | drop (told to stop, sends nothing)
    # semi-decentralized: after each of its node-rounds, this tier's nodes mix what their parent
    # aggregates with their siblings (device to device), peer_steps times on peer_graph; 0 = off.
    # On the leaf tier (e.g. topology.tiers.student, listed explicitly: `default` never applies
    # to leaves) the students of one parent train, then mix, local_rounds times per round of
    # their parent before they report (docs/topologies.md)
    peer_steps: int = 0
    peer_graph: str = "ring"  # ring | torus | complete | random_regular | erdos_renyi | small_world
    quorum: float = (
        0.0  # fraction of the sampled children whose updates must arrive and pass, [0, 1]
    )


@dataclass
class ClockConfig:
    """The simulated wall-clock cost model (hierfed/clock.py); lognormal around the medians."""

    rows_per_s: float = 400.0  # median client training speed (rows per second, per task pass)
    compute_sigma: float = 0.5  # spread of client speeds within a group (log scale)
    group_sigma: float = 0.5  # spread between groups (the tier below the root, e.g. institutions)
    bandwidth_mbps: float = 20.0  # median link bandwidth (megabits per second)
    bandwidth_sigma: float = 0.5
    latency_s: float = 0.05  # median one-way link latency
    latency_sigma: float = 0.3
    round_jitter: float = 0.1  # per-round noise on every compute and transfer time (log scale)


@dataclass
class TopologyConfig:
    name: str = "hierarchical"  # a registered topology
    # per aggregating tier, by tier name (e.g. "institution", "global"); missing tiers use `default`.
    # The leaf tier (e.g. "student") may be listed for device-to-device gossip only (leaf_peers)
    tiers: dict[str, TierConfig] = field(default_factory=dict)
    default: TierConfig = field(default_factory=TierConfig)
    options: dict[str, Any] = field(default_factory=dict)  # topology-specific options

    def leaf_peers(self, leaf: str) -> TierConfig | None:
        """The leaf tier's device-to-device gossip settings, or None when it is off.

        On only where ``tiers.<leaf>`` is listed with ``peer_steps > 0``: ``default`` configures
        aggregating tiers and never the leaves, so a config that sets ``default.peer_steps`` or
        ``default.local_rounds`` keeps its meaning."""
        tier = self.tiers.get(leaf)
        return tier if tier is not None and tier.peer_steps > 0 else None

    def leaf_passes(self, leaf: str) -> int:
        """Training passes a leaf makes per round of its parent: the leaf tier's
        ``local_rounds`` with leaf gossip on, else 1."""
        tier = self.leaf_peers(leaf)
        return tier.local_rounds if tier is not None else 1


@dataclass
class RuntimeConfig:
    name: str = "ray"  # ray | local
    num_workers: int = 0  # 0 = one per CPU Ray sees
    num_cpus: int = 0  # CPUs given to a local Ray instance; 0 = all
    address: str | None = (
        None  # an existing Ray cluster ("auto" or host:port); None = start locally
    )
    gpus_per_worker: float = 0.0
    round_timeout_s: float = 600.0  # bound on every wait inside a round
    # the Ray runtime cuts a round's clients into this many chunks per worker and hands them
    # out as workers free up (load balance); results never depend on it
    chunks_per_worker: int = 4
    # a worker actor that dies mid-round: "retry" its clients on a fresh worker (same result as
    # if nothing happened) or "drop" them (counted as failed); the pool is restored either way
    on_worker_failure: str = "retry"
    # an exception in a client's code: "fail" the run with NodeFailure, or "drop" the client
    # (the round completes if every node's quorum is met)
    on_client_failure: str = "fail"
    # fault injection, for tests and drills: "raise:<client id>", "sleep:<client id>:<seconds>",
    # "kill-worker:<round>:<client id>" (the worker training that client exits; first attempt only),
    # "crash-worker:<round>:<client id>" (the same on every attempt)
    faults: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global model every N rounds (and after the last)
    personalized: bool = True  # also evaluate each client's personalized model at the end
    batch_size: int = 256


@dataclass
class AttackConfig:
    """Simulated attackers (hierfed/attacks.py); ``name: none`` disables them."""

    name: str = "none"  # none | sign_flip | scaling | gaussian | label_flip | alie
    fraction: float = 0.0  # of the nodes of `tier` that attack, picked by a keyed draw, in [0, 1)
    tier: str = ""  # the sending tier whose nodes attack; "" = the leaf tier (e.g. student)
    options: dict[str, Any] = field(default_factory=dict)  # attack-specific (e.g. scale, std, z)


@dataclass
class PrivacyPolicy:
    """A sample-level DP-SGD budget for the whole run (hierfed/privacy/)."""

    epsilon: float = 8.0  # total budget per privacy unit (a client's rows) over the run
    delta: float = 1e-5
    clip_norm: float = 1.0  # per-sample gradient L2 bound
    noise_multiplier: float = (
        0.0  # 0 = derived with Opacus from epsilon, delta and the planned steps
    )
    rounds: int = 0  # planned participations the budget is spread over; 0 = every round of the run
    # stricter budgets for clients holding a modality (e.g. image: 2.0); the smallest applies
    modalities: dict[str, float] = field(default_factory=dict)


@dataclass
class PrivacyConfig:
    """Which clients train with DP-SGD, under which policy."""

    policies: dict[str, PrivacyPolicy] = field(default_factory=dict)
    # client-id glob -> policy name, first match wins (e.g. "global/inst-00/*": strict)
    assign: dict[str, str] = field(default_factory=dict)
    default: str = (
        ""  # policy of clients no glob matches (and without a profile policy); "" = no DP
    )


@dataclass
class CheckpointConfig:
    every: int = (
        1  # write a checkpoint every N rounds (and after the last); 0 = only after the last
    )
    keep: int = 2  # how many checkpoints to keep in <run>/checkpoints


@dataclass
class RunConfig:
    seed: int = 0
    rounds: int = 5  # rounds of the root tier
    out: str | None = None  # run folder; None = runs/<timestamp>-<topology>
    # modules imported in the driver and every worker before plug-ins are looked up: where a
    # workload outside the library registers (e.g. [benchmarks.mlp_bench])
    plugins: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    clock: ClockConfig = field(default_factory=ClockConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # client or tier-node ids taken out of training (unlearning; hierfed/unlearning/exclusion.py)
    exclude: list[str] = field(default_factory=list)

    def tier(self, name: str) -> TierConfig:
        """The configuration of the aggregating tier ``name`` (the default if not listed)."""
        return self.topology.tiers.get(name, self.topology.default)


def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


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
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(
                    "--config", str(path), "no such file; give the path of a YAML config"
                )
            loaded = OmegaConf.load(p)
            cfg = OmegaConf.merge(cfg, loaded)  # type: ignore[assignment]  # a merged struct stays a DictConfig
        if topology is not None:
            cfg.topology.name = topology
        if out is not None:
            cfg.out = out
        for ov in overrides or []:
            if "=" not in ov:
                raise ConfigError(ov, None, "overrides are written key=value, e.g. rounds=3")
            key = ov.split("=", 1)[0].strip()
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))  # type: ignore[assignment]
            except OmegaConfBaseException as exc:
                raise ConfigError(key, ov.split("=", 1)[1], _fix_of(exc)) from None
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", "?") or "?"), None, _fix_of(exc)) from None
    assert isinstance(obj, RunConfig)
    if validate:
        validate_config(obj)
    return obj


def _fix_of(exc: OmegaConfBaseException) -> str:
    msg = str(exc).splitlines()[0]
    if (
        "not in" in msg
        or "ConfigKeyError" in type(exc).__name__
        or "ConfigAttributeError" in type(exc).__name__
    ):
        return f"{msg}; unknown key — `python -m hierfed show-config` lists the valid keys"
    return f"{msg}; check the type the schema expects (`python -m hierfed show-config`)"


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- validation


def _positive_int(key: str, v: int) -> None:
    if not isinstance(v, int) or v <= 0:
        raise ConfigError(key, v, "must be a positive integer")


def _nonneg(key: str, v: float) -> None:
    if not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or math.isinf(v):
        raise ConfigError(key, v, "must be a finite number >= 0")


def _fraction(key: str, v: float) -> None:
    if not isinstance(v, (int, float)) or math.isnan(v) or not (0 < v <= 1):
        raise ConfigError(key, v, "must be a fraction in (0, 1]")


def _positive(key: str, v: float) -> None:
    if not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v) or v <= 0:
        raise ConfigError(key, v, "must be a finite number > 0")


def _registered(key: str, registry: Any, name: str) -> None:
    try:
        registry.get(name)
    except RegistryError as exc:
        raise ConfigError(key, name, str(exc)) from None


def validate_config(cfg: RunConfig) -> None:
    """Check ranges and plug-in names; raises ConfigError before any work starts."""
    from hierfed import plugins  # registers the built-in plug-ins
    from hierfed.registry import (
        AGGREGATORS,
        BACKBONES,
        DATASETS,
        POSTPROCESSORS,
        SERVER_OPTIMIZERS,
        TOPOLOGIES,
    )

    plugins.import_modules(cfg.plugins)  # workloads registered outside the library
    _positive_int("rounds", cfg.rounds)
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", cfg.seed, "must be an integer >= 0")
    d = cfg.data
    _registered("data.name", DATASETS, d.name)
    for k in (
        "num_institutions",
        "students_per_institution",
        "samples_per_student",
        "global_test_size",
    ):
        _positive_int(f"data.{k}", getattr(d, k))
    if not (0 < d.test_fraction < 1) or math.isnan(d.test_fraction):
        raise ConfigError(
            "data.test_fraction", d.test_fraction, "must lie strictly between 0 and 1"
        )
    _positive("data.label_skew", d.label_skew)
    _nonneg("data.size_skew", d.size_skew)
    if not (0 <= d.missing_modality < 1) or math.isnan(d.missing_modality):
        raise ConfigError("data.missing_modality", d.missing_modality, "must lie in [0, 1)")
    if d.name == "edu-synth" and (
        d.essay_only_institutions < 0 or d.essay_only_institutions >= d.num_institutions
    ):
        raise ConfigError(
            "data.essay_only_institutions",
            d.essay_only_institutions,
            f"must lie in [0, data.num_institutions={d.num_institutions})",
        )
    if d.max_clients < 0:
        raise ConfigError("data.max_clients", d.max_clients, "must be >= 0 (0 keeps all clients)")

    m = cfg.model
    if m.backbone in ("tiny", "minilm") or m.backbone in BACKBONES:
        pass
    elif not m.backbone:
        raise ConfigError(
            "model.backbone", m.backbone, f"give one of {BACKBONES.names()} or a model path"
        )
    for k in ("d_model", "num_layers", "num_heads", "max_tokens", "text_len"):
        _positive_int(f"model.{k}", getattr(m, k))
    if not isinstance(m.lora_rank, int) or isinstance(m.lora_rank, bool) or m.lora_rank < 0:
        raise ConfigError(
            "model.lora_rank", m.lora_rank, "must be an integer >= 0 (0 builds no LoRA adapter)"
        )
    if m.d_model % m.num_heads:
        raise ConfigError("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")
    _positive("model.lora_alpha", m.lora_alpha)
    if not (0 <= m.lora_dropout < 1) or math.isnan(m.lora_dropout):
        raise ConfigError("model.lora_dropout", m.lora_dropout, "must lie in [0, 1)")
    if m.prompt_tokens < 0:
        raise ConfigError(
            "model.prompt_tokens", m.prompt_tokens, "must be >= 0 (0 disables prompts)"
        )
    if m.lora_rank > 0 and not m.lora_targets:
        raise ConfigError(
            "model.lora_targets",
            m.lora_targets,
            "name at least one module, e.g. [q_proj, v_proj] (or set model.lora_rank=0 for no adapter)",
        )
    for cls_name, rank in m.resource_ranks.items():
        if cls_name not in m.resources:
            raise ConfigError(
                f"model.resource_ranks.{cls_name}",
                rank,
                f"not a resource class; known: {sorted(m.resources)} (add it to model.resources)",
            )
        if not isinstance(rank, int) or not (0 <= rank <= m.lora_rank):
            raise ConfigError(
                f"model.resource_ranks.{cls_name}",
                rank,
                f"must be an integer in [0, model.lora_rank={m.lora_rank}]; raise model.lora_rank "
                "to the largest rank (it sizes the shared adapter)",
            )
    for pat, scope in m.scopes.items():
        if not scope:
            raise ConfigError(f"model.scopes.{pat}", scope, "give 'global', 'local' or a tier name")

    t = cfg.train
    _positive_int("train.local_epochs", t.local_epochs)
    _positive_int("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    if t.optimizer not in ("adam", "sgd"):
        raise ConfigError("train.optimizer", t.optimizer, "known: adam, sgd")
    for k in ("momentum", "weight_decay", "fedprox_mu", "max_grad_norm"):
        _nonneg(f"train.{k}", getattr(t, k))

    _registered("topology.name", TOPOLOGIES, cfg.topology.name)
    tiers = dict(cfg.topology.tiers)
    tiers["default"] = cfg.topology.default
    for tname, tier in tiers.items():
        key = "topology.default" if tname == "default" else f"topology.tiers.{tname}"
        _registered(f"{key}.aggregator", AGGREGATORS, tier.aggregator)
        _registered(f"{key}.server_optimizer", SERVER_OPTIMIZERS, tier.server_optimizer)
        for pp in tier.postprocess:
            _registered(f"{key}.postprocess", POSTPROCESSORS, pp)
            POSTPROCESSORS.get(pp).check_options(
                dict(tier.postprocess_options.get(pp, {})), key=f"{key}.postprocess_options.{pp}"
            )
        for pp in tier.postprocess_options:
            if pp not in tier.postprocess:
                raise ConfigError(
                    f"{key}.postprocess_options.{pp}",
                    dict(tier.postprocess_options[pp]),
                    f"'{pp}' is not in {key}.postprocess {list(tier.postprocess)}; add it there or drop its options",
                )
        _fraction(f"{key}.participation", tier.participation)
        if not isinstance(tier.quorum, (int, float)) or not (0 <= tier.quorum <= 1):
            raise ConfigError(f"{key}.quorum", tier.quorum, "must be a fraction in [0, 1]")
        if not isinstance(tier.dropout, (int, float)) or not (0 <= tier.dropout < 1):
            raise ConfigError(
                f"{key}.dropout", tier.dropout, "a probability in [0, 1) (0 = nobody drops out)"
            )
        _nonneg(f"{key}.deadline_s", tier.deadline_s)
        if tier.straggler not in ("discard", "drop"):
            raise ConfigError(f"{key}.straggler", tier.straggler, "known: discard, drop")
        if not isinstance(tier.peer_steps, int) or tier.peer_steps < 0:
            raise ConfigError(
                f"{key}.peer_steps", tier.peer_steps, "an integer >= 0 (0 = no peer mixing)"
            )
        peer_graphs = ("ring", "torus", "complete", "random_regular", "erdos_renyi", "small_world")
        if tier.peer_graph not in peer_graphs:
            raise ConfigError(
                f"{key}.peer_graph", tier.peer_graph, f"known: {', '.join(peer_graphs)}"
            )
        _positive_int(f"{key}.local_rounds", tier.local_rounds)
        _positive(f"{key}.server_lr", tier.server_lr)
        for k in ("server_momentum", "beta1", "beta2"):
            v = getattr(tier, k)
            if not (0 <= v < 1) or math.isnan(v):
                raise ConfigError(f"{key}.{k}", v, "must lie in [0, 1)")
        _positive(f"{key}.tau", tier.tau)
        AGGREGATORS.get(tier.aggregator).check_options(dict(tier.options), key=f"{key}.options")

    r = cfg.runtime
    if r.name not in ("ray", "local"):
        raise ConfigError("runtime.name", r.name, "known: ray, local")
    if r.num_workers < 0:
        raise ConfigError("runtime.num_workers", r.num_workers, "must be >= 0 (0 = one per CPU)")
    if r.num_cpus < 0:
        raise ConfigError("runtime.num_cpus", r.num_cpus, "must be >= 0 (0 = all)")
    _nonneg("runtime.gpus_per_worker", r.gpus_per_worker)
    _positive("runtime.round_timeout_s", r.round_timeout_s)
    if not isinstance(r.chunks_per_worker, int) or r.chunks_per_worker < 1:
        raise ConfigError(
            "runtime.chunks_per_worker",
            r.chunks_per_worker,
            "an integer >= 1 (1 = one contiguous slice per worker, no load balancing)",
        )
    if r.on_worker_failure not in ("retry", "drop"):
        raise ConfigError("runtime.on_worker_failure", r.on_worker_failure, "known: retry, drop")
    if r.on_client_failure not in ("fail", "drop"):
        raise ConfigError("runtime.on_client_failure", r.on_client_failure, "known: fail, drop")
    for f in r.faults:
        kind = f.split(":", 1)[0]
        parts = f.split(":")
        ok = (
            (kind == "raise" and len(parts) == 2)
            or (kind == "sleep" and len(parts) == 3)
            or (kind in ("kill-worker", "crash-worker") and len(parts) == 3)
        )
        if not ok:
            raise ConfigError(
                "runtime.faults",
                f,
                "use raise:<client>, sleep:<client>:<seconds>, kill-worker:<round>:<client> or "
                "crash-worker:<round>:<client>",
            )
    if cfg.checkpoint.every < 0:
        raise ConfigError(
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
    from hierfed.attacks import check_attack_config
    from hierfed.privacy.policy import check_privacy_config

    check_attack_config(cfg)
    check_privacy_config(cfg)
