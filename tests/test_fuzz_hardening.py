"""Property tests over hostile input (issue 13): config overrides and update contents.

* Any list of ``key=value`` overrides either loads or is refused with one ConfigError line
  naming a key, and the CLI prints exactly that line (markup off) with exit status 2.
* Any update contents (dtype, layout, device, shape, values, weights) under any aggregator
  end as accepted or as a recorded rejection; the node's new state is always finite.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hierfed.cli import main
from hierfed.config import RunConfig, load_config
from hierfed.errors import ConfigError
from hierfed.runtime.merge import merge_node_round
from hierfed.update import Update, UpdateMeta
from tests.test_merge_checks import SENDERS, SPEC, STATE, cfg_with, task

KEYS = [
    "rounds",
    "seed",
    "out",
    "data.name",
    "data.num_institutions",
    "data.test_fraction",
    "data.options",
    "data.options.root",
    "model.prompt_tokens",
    "model.lora_rank",
    "model.lora_targets",
    "model.scopes",
    "model.resource_ranks",
    "model.resource_ranks.light",
    "train.lr",
    "train.optimizer",
    "topology.name",
    "topology.tiers",
    "topology.tiers.institution",
    "topology.tiers.institution.aggregator",
    "topology.tiers.institution.options",
    "topology.tiers.institution.options.trim",
    "topology.tiers.institution.postprocess",
    "topology.tiers.institution.postprocess_options.clip",
    "topology.tiers.institution.postprocess_options.clip.side",
    "topology.tiers.instituion.quorum",
    "topology.default.participation",
    "topology.options",
    "topology.options.time_varying",
    "runtime.name",
    "runtime.faults",
    "runtime.address",
    "attack.name",
    "attack.options",
    "attack.options.scale",
    "privacy.policies.p.epsilon",
    "privacy.default",
    "nosuch.key",
    "",
]

scalars = st.one_of(
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(alphabet="ab:[]{}/,'\"=* \\\n\t#&!|>%@`\x00é", max_size=12),
    st.sampled_from(["median", "clip", "[clip]", "x[/]", "[bold]", "{a: 1}", "[1, 2", "null"]),
)
values = st.one_of(
    scalars.map(str),
    st.lists(scalars, max_size=3).map(lambda v: "[" + ", ".join(map(str, v)) + "]"),
)
overrides = st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=3).map(
    lambda kvs: [f"{k}={v}" for k, v in kvs]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ovs=overrides)
def test_config_overrides_load_or_fail_in_one_line(ovs):
    try:
        cfg = load_config(None, ovs)
    except ConfigError as exc:
        msg = str(exc)
        event("refused")
        assert msg.startswith("config key '") and "'?'" not in msg.split("=")[0]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["show-config", *ovs]) == 2
        printed = buf.getvalue().strip().splitlines()
        assert len(printed) == 1 and printed[0].startswith("error: config key ")
        return
    event("loaded")
    assert isinstance(cfg, RunConfig)


DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int32]
FAULTS = ["none"] * 4 + ["huge"] * 2 + ["dtype", "layout", "shape", "values", "weight"]
ok_floats = st.floats(-10, 10, width=32)
huge = st.sampled_from([3e38, -3e38, 1e38, 1e30])  # finite; their sums may not be
bad_floats = st.sampled_from([math.nan, math.inf, -math.inf])
ok_weights = st.floats(0.5, 50)
bad_weights = st.sampled_from([0.0, -1.0, 1e-200, 1e-7, 1e300, math.nan, math.inf])


@st.composite
def hostile_update(draw, sender: str) -> Update:
    """Mostly valid updates (some with huge finite values), each other one with one fault."""
    fault = draw(st.sampled_from(FAULTS))
    target = draw(
        st.sampled_from([(c, p) for c, cs in SPEC.components.items() for p, _ in cs.shapes])
    )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for c, cspec in SPEC.components.items():
        tensors[c] = {}
        for p, shape in cspec.shapes:
            hit = (c, p) == target
            if hit and fault == "shape":
                shape = (*shape, 1)
            n = math.prod(shape)
            elems = huge if hit and fault == "huge" else ok_floats
            vals = draw(st.lists(elems, min_size=n, max_size=n))
            if hit and fault == "values":
                vals[draw(st.integers(0, n - 1))] = draw(bad_floats)
            t = torch.tensor(vals, dtype=torch.float32).reshape(shape)
            if hit and fault == "dtype":
                t = t.to(draw(st.sampled_from(DTYPES)))
            if hit and fault == "layout":
                kind = draw(st.sampled_from(["sparse", "meta", "sparse_csr"]))
                if kind == "meta":
                    t = torch.empty(shape, device="meta")
                elif kind == "sparse_csr" and t.dim() == 2:
                    with warnings.catch_warnings():  # torch: "CSR support is in beta"
                        warnings.simplefilter("ignore", UserWarning)
                        t = t.to_sparse_csr()
                else:
                    t = t.to_sparse()
            tensors[c][p] = t
    ws = {c: draw(ok_weights) for c in tensors}
    if fault == "weight":
        ws[target[0]] = draw(bad_weights)
    rnd = 0 if fault == "none" and draw(st.integers(0, 9)) == 0 else 1  # a stale one now and then
    return Update(tensors, ws, UpdateMeta((sender,), rnd, 1))


AGGREGATORS = ["weighted_mean", "median", "trimmed_mean", "krum", "norm_bounded", "noise_aware"]
AGGREGATORS += ["lora_naive", "lora_exact"]
CFGS: dict[str, RunConfig] = {}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    aggregator=st.sampled_from(AGGREGATORS),
    n=st.integers(1, 5),
    optimizer=st.sampled_from(["sgd", "fedadam"]),
)
def test_any_update_is_accepted_or_a_recorded_rejection_and_the_state_stays_finite(
    data, aggregator, n, optimizer
):
    key = f"{aggregator}/{optimizer}"
    if key not in CFGS:
        CFGS[key] = cfg_with(
            **{
                "topology.tiers.institution.aggregator": aggregator,
                "topology.tiers.institution.server_optimizer": optimizer,
            }
        )
    senders = SENDERS[:n]
    pool = {s: data.draw(hostile_update(s)) for s in senders}
    res = merge_node_round(task(senders), pool, cfg=CFGS[key], spec=SPEC)
    rejected = dict(res.rejected)
    event(f"accepted {len(res.accepted)} of {n}")
    event("node-round rejected" if res.node_id in rejected else "node-round merged")
    node_rejected = res.node_id in rejected
    for s in senders:  # each sender: merged, rejected alone, or under its node's rejection
        if node_rejected:
            assert s not in res.accepted and res.weights == {} and res.state is STATE
        else:
            assert (s in res.accepted) != (s in rejected), s
    assert set(res.state) == set(STATE)
    for c, params in res.state.items():
        for p, t in params.items():
            assert t.dtype == torch.float32 and t.layout == torch.strided, (c, p)
            assert bool(torch.isfinite(t).all()), (c, p, rejected)


@settings(max_examples=200, deadline=None)
@given(
    vals=st.lists(st.one_of(ok_floats, huge, bad_floats), min_size=1, max_size=6),
    participants=st.integers(0, 4),
    rejected=st.sets(st.sampled_from(["a", "b", "c", "d", "global/inst-00"]), max_size=5),
)
def test_a_collapsed_round_never_passes_the_run_check(vals, participants, rejected):
    """After any round: a non-finite global model or every participant rejected raises
    RunCollapsed (the CLI's non-zero exit); anything else goes on."""
    from hierfed.errors import RunCollapsed
    from hierfed.health import check_round

    state = {"head.t": {"w": torch.tensor(vals)}}
    clients = {"a", "b", "c", "d"}
    rej = [(s, "why") for s in sorted(rejected)]
    collapsed = not all(math.isfinite(v) for v in vals) or (
        participants > 0 and len(rejected & clients) >= participants
    )
    try:
        check_round(
            1, global_state=state, participants=participants, rejections=rej, client_ids=clients
        )
    except RunCollapsed as exc:
        assert collapsed and str(exc).startswith("run stopped after round 1: ")
    else:
        assert not collapsed
