"""Every ``>>>`` example in the library's docstrings runs and shows what it says (issue 12)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for folder in ("hierfed", "topologies")
    for p in (ROOT / folder).rglob("*.py")
    if ">>>" in p.read_text()
)


def test_the_examples_are_found():
    assert len(MODULES) >= 12 and "hierfed.update" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    """... and leave no trace: a plug-in an example registers (the Topology contract's
    ``doc-flat``) is gone afterwards."""
    from hierfed import plugins, registry  # built-ins and entry points registered first

    assert plugins is not None
    tables = [r for r in vars(registry).values() if isinstance(r, registry.Registry)]
    for r in tables:
        r.names()
    before = [dict(r._items) for r in tables]
    module = importlib.import_module(name.removesuffix(".__init__"))
    try:
        result = doctest.testmod(
            module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        )
    finally:
        for r, items in zip(tables, before):
            r._items = items
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_no_example_is_skipped():
    skipped = [
        name
        for name in MODULES
        if "doctest: +SKIP" in (ROOT / (name.replace(".", "/") + ".py")).read_text()
    ]
    assert skipped == [], f"make these examples runnable: {skipped}"
