"""The Topology contract's docstring example runs as written (a doctest), and leaves no trace."""

from __future__ import annotations

import doctest

import hierfed.topology
from hierfed.registry import TOPOLOGIES


def test_the_topology_docstring_example_runs():
    try:
        result = doctest.testmod(hierfed.topology, optionflags=doctest.ELLIPSIS, verbose=False)
        assert result.attempted >= 8
        assert result.failed == 0
    finally:
        TOPOLOGIES._items.pop("doc-flat", None)
