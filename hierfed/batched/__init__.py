"""Batched cohort training: many clients in one vectorized pass (``docs/batched.md``).

``hierfed.batched.trainer`` (``CohortTrainer``, ``cohort_groups``) trains, ``cohort`` drives it
from a worker, ``support`` holds the ``train.batched`` key's rules. Nothing is imported here, so
the config checks can read ``support`` without importing torch.
"""
