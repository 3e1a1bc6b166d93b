"""Secure aggregation (SecAgg+) on a tier edge: in simulation, the protocol's arithmetic for
real — quantization to integers mod M, pairwise and self masks from X25519 key agreements,
Shamir-shared seeds, dropout recovery. ``edge`` plugs it into a node's merge; ``protocol``,
``quantize`` and ``shamir`` are plain functions and classes a deployment can reuse.
"""
