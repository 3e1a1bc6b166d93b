"""Continual federated learning on real data (digits, Chem97): forgetting and mitigations."""
