"""Federated unlearning: take clients out of a run's training and prove it (docs/unlearning.md).

``exclusion``: the ``exclude`` config key, applied where members are sampled. ``replay``: exact
unlearning of a finished run from its newest clean checkpoint. ``verify``: membership-inference
AUC, parameter distances and the certificate.
"""
