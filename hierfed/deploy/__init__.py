"""Deployment: the global tier on a Flower SuperLink, each institution's subtree on its own
SuperNode (docs/deployment.md). ``command`` is the CLI, ``flower_app`` the Flower app,
``server`` and ``node`` the two sides, ``wire`` the bytes between them, ``certs`` trial
credentials, ``secagg`` SecAgg+ on the top edge."""

from __future__ import annotations


def node_name(institution: str) -> str:
    """The name an institution's SuperNode key is registered under (no slashes)."""
    return institution.replace("/", "_")
