"""WorkerCore: the plain object every runtime drives — one model skeleton, many clients.

A Ray actor (runtime/ray.py) is a thin shell around it; the local runtime calls it
directly. Everything a worker computes is a pure function of its inputs and the run seed.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

import hierfed.runtime.jobs as msg  # the messages between driver and workers
from hierfed.aggregators.lora import mask_rank, truncate_rank
from hierfed.attacks import attack_pool, build_attack, poisoned
from hierfed.batched.support import use_batched
from hierfed.client import ClientTrainer, FitResult, to_cpu
from hierfed.config import RunConfig
from hierfed.data.federation import ClientData, Federation
from hierfed.errors import UpdateRejected
from hierfed.faults import Faults
from hierfed.mixing import combine, consensus_distance, weighted_average
from hierfed.model.hf_backbone import tokenize_federation
from hierfed.model.m3t import M3TModel, build_model, model_spec
from hierfed.model.spec import ModelSpec
from hierfed.postprocess.base import PostContext, apply_chain, build_chain
from hierfed.postprocess.validate import Expectation, validate_update
from hierfed.privacy.dpsgd import train_client
from hierfed.privacy.policy import DPPlan, plan_for
from hierfed.runtime.merge import merge_node_round
from hierfed.update import State, Update, first_nonfinite, state_add, state_sub

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A client's training inputs on this worker (``WorkerCore.prepare``)."""

    data: ClientData
    tasks: tuple[str, ...]
    start: State  # the parent's state with the client's own components
    begin: State  # what training starts from (a lower-rank client's rank-r view of ``start``)
    rank: int
    rows: int
    plan: DPPlan | None


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs once: config and federation (shared via the object store)."""

    cfg: RunConfig
    federation: Federation
    threads: int = 1  # torch intra-op threads; 1 keeps results identical across worker counts


def select_device(gpus_per_worker: float, *, cuda_available: bool | None = None) -> torch.device:
    """The device a worker trains on: ``cuda`` when the config gives workers a GPU share
    (``runtime.gpus_per_worker > 0``, fractional allowed) and CUDA is usable, else the CPU.

    Under Ray the actor sees only the GPU Ray assigned it (CUDA_VISIBLE_DEVICES), so it is
    always ``cuda:0`` from inside; the local runtime uses the first visible GPU. Asking for a
    GPU where there is none falls back to the CPU (results are then the CPU's, bit for bit).
    """
    if gpus_per_worker <= 0:
        return torch.device("cpu")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        log.warning(
            "runtime.gpus_per_worker=%s but CUDA is not available here; training on the CPU",
            gpus_per_worker,
        )
        return torch.device("cpu")
    return torch.device("cuda", 0)


class WorkerCore:
    """Builds the skeleton once; trains slices of clients, merges tier nodes, evaluates."""

    def __init__(self, setup: WorkerSetup) -> None:
        from hierfed import plugins  # registers built-ins inside Ray workers

        plugins.import_modules(setup.cfg.plugins)

        torch.set_num_threads(setup.threads)
        self.cfg = setup.cfg
        self.fed = setup.federation
        self.model: M3TModel = build_model(self.cfg.model, self.fed, self.cfg.seed)
        # raw text -> ids with this worker's backbone tokenizer, once (hierfed/model/hf_backbone.py)
        self.fed = tokenize_federation(self.fed, self.model.backbone, self.cfg.model.text_len)
        self.spec: ModelSpec = model_spec(self.model, self.fed, self.cfg.model)
        self.device = select_device(self.cfg.runtime.gpus_per_worker)
        if (
            self.device.type != "cpu"
        ):  # states come and go on the CPU; the skeleton and batches live here
            self.model.to(self.device)
        self.trainer = ClientTrainer(self.model, self.cfg.train, self.cfg.seed, self.device)
        self.batched = use_batched(self.cfg, self.device, self.spec, len(self.fed.tasks))
        self.profiles = self.fed.by_id
        self.attack = build_attack(self.cfg, self.fed)  # None unless the config simulates attackers
        self.faults = Faults(self.cfg.runtime.faults)
        self._initial = to_cpu(self.model.component_state())  # as built, before any training

    def initial_state(self) -> State:
        """Every component's starting value, as the seed built them (training never changes it)."""
        return {c: {k: t.clone() for k, t in p.items()} for c, p in self._initial.items()}

    def model_info(self) -> tuple[ModelSpec, State]:
        """What the driver needs of the model (spec and initial state) without building it."""
        return self.spec, self.initial_state()

    # ---------------------------------------------------------------- training

    def train(
        self, jobs: Sequence[msg.TrainJob], states: Mapping[str, State], attempt: int = 0
    ) -> tuple[list[msg.ClientMeta], dict[str, Update]]:
        """Train each job's client in turn; returns metas and the updates by client id.

        ``attempt`` > 0 when a runtime re-runs a slice whose worker died."""
        metas: list[msg.ClientMeta] = []
        updates: dict[str, Update] = {}
        if self.faults and jobs:
            self.faults.before_slice(jobs[0].round, [j.client_id for j in jobs], attempt)
        # train.batched (hierfed/batched): many at once; a continual job's per-round tasks,
        # replay and EWC terms are the one-at-a-time trainer's (hierfed/continual/fit.py)
        if self.batched and len(jobs) > 1 and not any(j.continual for j in jobs):
            from hierfed.batched.cohort import train_cohort

            return train_cohort(self, jobs, states)
        for job in jobs:
            try:
                if self.faults:
                    self.faults.in_client(job.client_id)
                meta, update = self._train_one(job, states[job.parent_id])
            except Exception as exc:  # a client's failure is reported, not fatal to the slice
                meta, update = self.failed(job, exc), None
            metas.append(meta)
            if update is not None:
                updates[job.client_id] = update
        return metas, updates

    @staticmethod
    def failed(job: msg.TrainJob, exc: BaseException) -> msg.ClientMeta:
        """The meta of a client whose training raised ``exc`` (reported, not fatal)."""
        log.warning("client %s failed in round %d: %s", job.client_id, job.round, exc)
        return msg.ClientMeta(
            job.client_id,
            job.parent_id,
            0,
            float("nan"),
            0,
            {},
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}",
        )

    def _train_one(
        self, job: msg.TrainJob, parent_state: State
    ) -> tuple[msg.ClientMeta, Update | None]:
        return self.fit_prepared(job, self.prepare(job, parent_state))

    def fit_prepared(
        self, job: msg.TrainJob, prep: Prepared
    ) -> tuple[msg.ClientMeta, Update | None]:
        """``job``'s client alone, with the one-at-a-time trainer (DP-SGD included)."""
        self.trainer.continual = job.continual  # a continual run's tasks and mitigations
        fit, privacy = train_client(
            self.trainer,
            plan=prep.plan,
            prior=job.privacy,
            data=prep.data,
            tasks=prep.tasks,
            start=prep.begin,
            trainable=job.trains,
            key=job.key,
        )
        return self.finish(job, prep, fit, privacy)

    def prepare(self, job: msg.TrainJob, parent_state: State) -> Prepared:
        """What training ``job``'s client needs: its data (poisoned if it attacks), its start
        state, the lower-rank view of it a lower-rank client begins from, its DP plan."""
        profile = self.profiles[job.client_id]
        data = self.fed.train[job.client_id]
        start: State = dict(parent_state)
        if job.local:
            start.update(job.local)
        rank = self.spec.rank_of(profile)
        begin = start
        if rank < self.spec.lora_rank:  # a lower-rank client: best rank-r view of the adapters
            begin = {
                c: (truncate_rank(p, rank) if c.startswith("adapter.") and c in job.trains else p)
                for c, p in start.items()
            }
        return Prepared(
            data=poisoned(self.attack, job.client_id, data, self.fed.tasks),
            tasks=tuple(profile.tasks),
            start=start,
            begin=begin,
            rank=rank,
            rows=len(data),
            plan=plan_for(self.cfg, profile, len(data), self.fed.tier_names),
        )

    def finish(
        self, job: msg.TrainJob, prep: Prepared, fit: FitResult | None, privacy: object
    ) -> tuple[msg.ClientMeta, Update | None]:
        """A trained client's meta and update: rank mask, delta, its tier's postprocess chain."""
        if fit is None:  # its DP budget is spent: the client sits out this round and says so
            return msg.ClientMeta(
                job.client_id, job.parent_id, 0, 0.0, 0, {}, job.local, privacy=privacy
            ), None
        rank, start = prep.rank, prep.start
        if rank < self.spec.lora_rank:
            fit = replace(
                fit,
                state={
                    c: (mask_rank(p, rank) if c.startswith("adapter.") else p)
                    for c, p in fit.state.items()
                },
            )
        n = prep.rows
        local = {c: fit.state[c] for c in job.trains if c not in job.sends} or None
        if not job.sends:
            return msg.ClientMeta(
                job.client_id, job.parent_id, n, fit.loss, fit.steps, {}, local, privacy=privacy
            ), None
        delta = state_sub({c: fit.state[c] for c in job.sends}, start)
        update = Update.from_delta(  # its training loss rides along (fairness-aware rules)
            delta,
            float(n),
            sender=job.client_id,
            round=job.round,
            num_samples=n,
            stats={"loss": fit.loss},
        )
        tier = self.cfg.tier(job.tier)
        chain = build_chain(tier.postprocess, tier.postprocess_options)
        low = rank if rank < self.spec.lora_rank else None  # only its rank goes on the wire
        ctx = PostContext(job.client_id, job.parent_id, job.tier, job.round, self.cfg.seed, low)
        update, sizes = apply_chain(chain, update, ctx)
        return msg.ClientMeta(
            job.client_id, job.parent_id, n, fit.loss, fit.steps, sizes, local, privacy=privacy
        ), update

    # ---------------------------------------------------------------- merging

    def merge(
        self, tasks: Sequence[msg.MergeTask], *sources: Mapping[str, Update]
    ) -> list[msg.MergeResult]:
        """Run each node-round: validate every child's update, aggregate, server step."""
        pool: dict[str, Update] = {}
        for src in sources:
            pool.update(src)
        return [self._merge_one(t, pool) for t in tasks]

    def _merge_one(self, task: msg.MergeTask, pool: Mapping[str, Update]) -> msg.MergeResult:
        pool = attack_pool(
            self.attack,
            [e.sender for e in task.expectations],
            pool,
            node_id=task.node_id,
            round=task.round,
            seed=self.cfg.seed,
        )
        return merge_node_round(task, pool, cfg=self.cfg, spec=self.spec)

    # ---------------------------------------------------------------- gossip mixing

    def mix(
        self,
        tasks: Sequence[msg.MixTask],
        starts: Mapping[str, State],
        expectations: Mapping[str, Expectation],
        *sources: Mapping[str, Update],
    ) -> list[msg.MixResult]:
        """Mix each task's node (hierfed.mixing): every source's update is validated once and
        turned into its half-step value ``start + mean delta``; a missing or rejected update
        leaves the source at its start. Inputs are not mutated.

        Simulated attackers (model-update attacks) corrupt what they send their peers too:
        one colluding view over every expected sender of the call, applied before validation,
        as a parent's merge does (``attack_pool``)."""
        received: dict[str, Update] = {}
        for src in sources:
            received.update(src)
        pool: Mapping[str, Update] = received
        if self.attack is not None and tasks and expectations:
            pool = attack_pool(
                self.attack,
                sorted(expectations),
                pool,
                node_id="peers",
                round=tasks[0].round,
                seed=self.cfg.seed,
            )
        half: dict[str, State] = {}
        rejected: dict[str, str] = {}

        def value(nid: str, rnd: int) -> State:
            if nid not in half:
                state = dict(starts[nid])
                upd = (
                    pool.get(nid) if nid in expectations else None
                )  # unexpected (e.g. late): unused
                if upd is not None:
                    try:
                        if upd.meta.round != rnd:
                            raise UpdateRejected(
                                nid, f"stale update from round {upd.meta.round} in round {rnd}"
                            )
                        validate_update(upd, expectations[nid], self.spec, like=state)
                        stepped = state_add(state, upd.mean())
                        bad = first_nonfinite({c: stepped[c] for c in upd.tensors})
                        if bad is not None:
                            raise UpdateRejected(
                                nid, f"its half-step overflows (NaN or Inf in {bad})"
                            )
                        state = stepped
                    except UpdateRejected as rej:
                        log.warning("round %d, gossip: %s", rnd, rej)
                        rejected[nid] = rej.reason
                half[nid] = state
            return half[nid]

        out = []
        for task in tasks:
            new: State = {}
            used: set[str] = set()
            for comps, row in task.groups:
                vals = [(coef, value(src, task.round)) for src, coef in row]
                used.update(src for src, _ in row)
                for c in comps:
                    new[c] = combine([(a, v[c]) for a, v in vals])
            why = tuple(sorted((s, r) for s, r in rejected.items() if s in used))
            bad = first_nonfinite(new)
            if bad is not None:  # the node keeps its own start values; recorded, not merged
                own = starts[task.node_id]
                new = {c: own[c] for c in new}
                why += ((task.node_id, f"mixed state overflows (NaN or Inf in {bad}); kept"),)
            out.append(msg.MixResult(task.node_id, new, why))
        return out

    def average(self, task: msg.AverageTask, states: Mapping[str, State]) -> tuple[float, State]:
        """Consensus distance of ``states`` and their weighted mean model (hierfed.mixing)."""
        return consensus_distance(states, task.labels), weighted_average(states, task.weights)

    # ---------------------------------------------------------------- evaluation

    def evaluate(
        self, jobs: Sequence[msg.EvalJob], states: Mapping[str, State]
    ) -> list[tuple[str, dict[str, tuple[float, int]]]]:
        out = []
        for job in jobs:
            data = self.fed.global_test if job.split == "global" else self.fed.test[job.name]
            res = self.trainer.evaluate(
                data=data,
                tasks=job.tasks,
                state=states[job.state_key],
                batch_size=self.cfg.eval.batch_size,
            )
            out.append((job.name, res))
        return out
