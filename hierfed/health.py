"""Run-level checks after each round: a run that collapsed stops, loudly.

Per-update and per-node-round checks reject and record (hierfed.postprocess.validate,
hierfed.runtime.merge). What they cannot fix is a round after which the global model holds
NaN or Inf, or in which every client's update was rejected (e.g. the model they trained from
was already garbage): going on would only produce more rejections and a meaningless result,
so the driver raises ``RunCollapsed`` before that round is checkpointed, and the CLI exits
non-zero with the reason.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from hierfed.errors import RunCollapsed
from hierfed.update import first_nonfinite


def check_round(
    rnd: int,
    *,
    global_state: Mapping[str, Mapping[str, torch.Tensor]],
    participants: int,
    rejections: Collection[tuple[str, str]],
    client_ids: Collection[str],
) -> None:
    """Raise RunCollapsed if the global model is non-finite or every participant's update
    was rejected this round."""
    bad = first_nonfinite(global_state)
    if bad is not None:
        raise RunCollapsed(
            rnd,
            f"the global model holds NaN or Inf (first: {bad}); bound what senders can do with "
            "a robust aggregator or receiver-side clipping (docs/reliability.md)",
        )
    rejected = {s for s, _ in rejections if s in client_ids}
    if participants > 0 and len(rejected) >= participants:
        why = next(r for s, r in rejections if s in rejected)
        raise RunCollapsed(
            rnd,
            f"every client update was rejected ({len(rejected)} of {participants}; e.g. {why})",
        )
