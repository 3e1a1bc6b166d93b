"""The run configuration's schema: plain dataclasses, one per config section.

``hierfed.config`` turns YAML and ``key=value`` overrides into these (it is the only module
that touches omegaconf); ``hierfed.config_checks`` checks their values. Every name here is
also importable from ``hierfed.config`` (its ``__all__`` lists them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # many clients per vectorized pass (hierfed/batched, docs/batched.md): auto | on | off
    batched: str = "auto"
    batched_max_clients: int = 256  # clients stacked in one batched pass at most


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
    # uniform | by_resource: a tier whose members are clients samples them stratified by
    # resource class, every class kept represented (hierfed/engine/sampling.py); from
    # topology.default it applies to those tiers only
    sampling: str = "uniform"
    # codec on this tier's broadcasts to its members: none | fp16 | int8 (the state, encoded
    # once per node-round; docs/codecs-secagg.md). Upload codecs go in `postprocess`
    broadcast_codec: str = "none"
    # secure aggregation of the members' updates into this tier: none | secagg+ (SecAgg+'s
    # arithmetic in simulation: masked, quantized; hierfed/secagg/, docs/codecs-secagg.md)
    secure_aggregation: str = "none"
    secure_aggregation_options: dict[str, Any] = field(default_factory=dict)


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
    # resource classes on the clock (opt-in; {} = every class alike): class -> factor on a
    # client's compute speed and on its link bandwidth, e.g. {light: 0.25} = 4x slower
    resource_speed: dict[str, float] = field(default_factory=dict)
    resource_bandwidth: dict[str, float] = field(default_factory=dict)


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
    num_cpus: int = 0  # CPUs given to a local Ray instance; 0 = all (ignored with address)
    # join a running Ray cluster: "auto" (the driver runs on one of its nodes) or
    # "<head-ip>:<port>"; None = start a session on this machine (docs/cluster.md)
    address: str | None = None
    # GPUs each worker asks Ray for: a fraction shares one GPU, above 1 whole GPUs; checked
    # against the cluster's nodes before any worker starts
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
    # equity metrics in summary.json (hierfed/explain/equity.py): the final global model per
    # institution and per group on the clients' test rows; rebuilds the model on the driver
    equity: bool = True
    # per round, each accepted sender's leave-one-out influence on its parent's merge
    # (hierfed/explain/contribution.py, loo_influence) as ``contributions`` in metrics.jsonl
    contributions: bool = False


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
class LoggingConfig:  # experiment tracking (hierfed/tracking.py); never changes a result
    tensorboard: bool = False  # per-round scalars into <run>/tensorboard (needs tensorboard)
    tensorboard_dir: str = ""  # another folder for the event files; "" = <run>/tensorboard


@dataclass
class ContinualConfig:
    """Tasks, modalities and institutions that arrive over time (hierfed/continual,
    docs/continual.md). Everything empty and off (the default): the run is not continual."""

    # task -> its data window: N (from round N on) or [N, M] (from round N until before M);
    # a task not listed has data from round 1 to the end
    tasks: dict[str, Any] = field(default_factory=dict)
    modalities: dict[str, Any] = field(default_factory=dict)  # modality -> window, as tasks
    # tier-node or client id -> {tasks: {...}, modalities: {...}}: windows for the clients below
    # it (the most specific id wins, task by task)
    nodes: dict[str, Any] = field(default_factory=dict)
    join: dict[str, int] = field(default_factory=dict)  # node or client id -> first round in
    leave: dict[str, int] = field(default_factory=dict)  # node or client id -> first round out
    # mitigations (default off): old tasks' heads and prompts frozen once a newer task arrived;
    # EWC pull (lambda) toward the global state at the end of a client's old tasks; replay of
    # ``memory`` kept rows per old task (the memory never leaves the client)
    freeze_old: bool = False
    # a tier name: from then on each of its nodes keeps its own copy of the old tasks' heads and
    # prompts (merged no higher than that tier); "" = off
    old_scope: str = ""
    ewc: float = 0.0
    replay: bool = False
    memory: int = 32  # rows per old task a client keeps for replay and the EWC Fisher
    levels: bool = True  # tier/client accuracy matrices and the aggregation probe at stage ends


@dataclass
class DeploymentConfig:
    """The top edge over Flower (``python -m hierfed deploy``, docs/deployment.md); a simulated
    ``run`` ignores it. Secure by default: TLS and SuperNode authentication are on."""

    superlink: str = "127.0.0.1:9093"  # the SuperLink's address (host:port) as nodes reach it
    root_certificates: str = ""  # CA certificate (PEM) that signed the SuperLink's certificate
    ssl_certfile: str = ""  # the SuperLink's TLS certificate (server side)
    ssl_keyfile: str = ""  # ... and its private key
    insecure: bool = False  # no TLS at all: local trials only (warns)
    supernode_auth: bool = True  # only SuperNodes whose public key is registered may connect
    # institution id -> its SuperNode's public key (OpenSSH format) to register at the SuperLink
    node_keys: dict[str, str] = field(default_factory=dict)
    # Flower SecAgg+ on the top edge: the server learns only the sum of the institutions' updates
    secagg: bool = False
    secagg_shares: int = 0  # secret shares per institution; 0 = every other institution
    secagg_threshold: int = 0  # shares needed to unmask; 0 = all but one institution (min 2)
    secagg_clip: float = 8.0  # |value| bound before quantization (values beyond are clipped)
    secagg_bits: int = 22  # quantization levels 2**bits over [-clip, clip]
    connect_timeout_s: float = 120.0  # how long the server waits for every SuperNode
    round_timeout_s: float = 600.0  # how long it waits for the institutions' replies per round


@dataclass
class RunConfig:
    seed: int = 0
    rounds: int = 5  # rounds of the root tier
    out: str | None = None  # run folder; None = runs/<timestamp>-<topology>
    # modules imported in the driver and every worker before plug-ins are looked up: where a
    # workload outside the library registers (e.g. [benchmarks.mlp_bench])
    plugins: list[str] = field(default_factory=list)
    # client or tier-node ids taken out of training (unlearning; hierfed/unlearning/exclusion.py)
    exclude: list[str] = field(default_factory=list)
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)

    def tier(self, name: str) -> TierConfig:
        """The configuration of the aggregating tier ``name`` (the default if not listed)."""
        return self.topology.tiers.get(name, self.topology.default)
