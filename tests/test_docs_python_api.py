"""docs/python-api.md runs: its python code blocks, in order, in one namespace, from an
empty folder."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_python_blocks_are_found():
    text = "x\n```python\na = 1\n```\n```\nnot python\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]


def test_the_python_api_page_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 4
    namespace: dict[str, object] = {"__name__": "python_api_doc"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
    # what the page claims, checked after it ran
    assert (tmp_path / "exported" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "exported" / "personalized" / "global__inst-01" / "model.json").is_file()
    assert list((tmp_path / "runs" / "demo" / "tensorboard").glob("events.out.tfevents.*"))
    assert namespace["preds"][0]["id"] == "s1"  # type: ignore[index]
