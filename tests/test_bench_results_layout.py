"""benchmarks/results/ holds one current result per benchmark, each naming its commit and machine.

Older runs live in git history, not in folders beside the current one (issue 12, item 7). A
subfolder is allowed only where it is declared below as part of a current result; every JSON
results file names the git commit and the machine it ran on, or is declared a part of a
sibling file that does; every report (``.md``, ``.txt``) names both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# benchmark folder -> the subfolders that are part of its current result
PART_FOLDERS: dict[str, frozenset[str]] = {
    "bytes": frozenset(),
    # what a run moves through Ray's object store per round (docs/cluster.md)
    "cluster": frozenset(),
    "overhead": frozenset(),
    "privacy": frozenset(),
    "reliability": frozenset(),
    # the institution-tier attack matrix: a second experiment, not an older run
    "robustness": frozenset({"institution"}),
    # each run's per-round metrics, from which `python -m benchmarks report` rebuilds the rest
    "topologies": frozenset({"metrics"}),
    "scale": frozenset(),
    "unlearning": frozenset(),
    "continual": frozenset(),
    # the attribution report on the edu-m3t MiniLM config (`python -m hierfed explain` output)
    "equity": frozenset({"minilm"}),
    "codecs": frozenset(),
    # a deployed run over Flower (TLS, SuperNode auth, SecAgg+) against the simulated one
    "deploy": frozenset(),
}
# JSON files whose commit and machine live in a sibling file (glob, relative to RESULTS)
COVERED_BY: dict[str, str] = {
    "topologies/status.json": "topologies/machine.json",
    "topologies/metrics/*.summary.json": "topologies/machine.json",
    "equity/minilm/*.json": "equity/results.json",
}
# git ignores run folders (`runs/` in .gitignore): heavy outputs a local rerun may leave
IGNORED_DIRS = frozenset({"runs", "__pycache__"})

COMMIT = re.compile(r"^[0-9a-f]{40}(\+dirty)?$")
COMMIT_IN_TEXT = re.compile(r"\bcommits?:? `?[0-9a-f]{7,40}\b", re.IGNORECASE)
MACHINE_KEYS = ("cpu_count_logical", "memory_total_gib", "platform")


def _is_machine(d: Any) -> bool:
    return (
        isinstance(d, dict)
        and isinstance(d.get("git_commit"), str)
        and COMMIT.match(d["git_commit"]) is not None
        and all(k in d for k in MACHINE_KEYS)
    )


def _machine_of(data: Any) -> dict[str, Any] | None:
    """The machine record (with ``git_commit``) of one results file, in any layout we write."""
    if not isinstance(data, dict):
        return None
    meta = data.get("meta")
    for cand in (
        data.get("machine_before"),  # overhead, scale, reliability
        data.get("machine"),  # bytes
        data.get("before"),  # a suite's machine.json
        meta.get("machine") if isinstance(meta, dict) else None,  # privacy, robustness
        meta.get("before") if isinstance(meta, dict) else None,  # equity
    ):
        if _is_machine(cand):
            return cand
    return None


def layout_problems(root: Path) -> list[str]:
    """Subfolders not declared in PART_FOLDERS, and benchmark folders not declared at all."""
    problems = []
    for bench in sorted(p for p in root.iterdir() if p.is_dir()):
        if bench.name not in PART_FOLDERS:
            problems.append(f"{bench.name}/: not a declared benchmark; add it to PART_FOLDERS")
            continue
        for sub in sorted(p for p in bench.iterdir() if p.is_dir()):
            if sub.name in IGNORED_DIRS or sub.name in PART_FOLDERS[bench.name]:
                continue
            problems.append(
                f"{bench.name}/{sub.name}/: not part of the current result; keep older runs in "
                "git history (git rm it and cite `git show <commit>:<path>`), or declare it in "
                "PART_FOLDERS"
            )
    return problems


def provenance_problems(root: Path) -> list[str]:
    """JSON results without commit and machine; reports that name neither."""
    covered = {p for pattern in COVERED_BY for p in root.glob(pattern)}
    problems = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or IGNORED_DIRS & set(path.relative_to(root).parts):
            continue
        if path.suffix == ".json":
            if path in covered:
                continue
            data = json.loads(path.read_text())
            runs = data.get("runs") if isinstance(data, dict) else None
            if _machine_of(data) is not None:
                continue  # one measurement with its own record (its runs share it)
            if isinstance(runs, list):  # several runs in one evidence file
                for i, run in enumerate(runs):
                    m = _machine_of(run.get("results"))
                    if not run.get("label") or m is None:
                        problems.append(f"{rel}: runs[{i}] lacks a label or a commit and machine")
                    elif run.get("git_commit") != m["git_commit"]:
                        problems.append(
                            f"{rel}: runs[{i}] ({run['label']}) git_commit "
                            f"{run.get('git_commit')!r} is not its results' {m['git_commit']!r}"
                        )
            elif _machine_of(data) is None:
                problems.append(
                    f"{rel}: names no commit and machine (a machine_before/machine/meta.machine "
                    f"with git_commit and {', '.join(MACHINE_KEYS)}), and COVERED_BY names no "
                    "sibling that does"
                )
        elif path.suffix in (".md", ".txt"):
            text = path.read_text()
            if "machine" not in text.lower() or COMMIT_IN_TEXT.search(text) is None:
                problems.append(
                    f"{rel}: does not name its commit ('commit <hash>') and its machine"
                )
    for pattern, source in COVERED_BY.items():
        if any(root.glob(pattern)) and not (root / source).is_file():
            problems.append(f"{pattern}: covered by {source}, which is missing")
    return problems


def test_results_hold_only_the_current_result_of_each_benchmark():
    assert layout_problems(RESULTS) == []
    assert {p.name for p in RESULTS.iterdir() if p.is_dir()} == set(PART_FOLDERS)


def test_every_kept_result_names_its_commit_and_machine():
    assert provenance_problems(RESULTS) == []


COMMIT_A = "0123456789abcdef0123456789abcdef01234567"
MACHINE = {
    "git_commit": COMMIT_A,
    "cpu_count_logical": 2,
    "memory_total_gib": 23.5,
    "platform": "Linux",
}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _runs(label_commit: str) -> str:
    """A runs.json with one run labelled ``a`` whose own machine record is MACHINE."""
    run = {"label": "a", "git_commit": label_commit, "results": {"machine_before": MACHINE}}
    return json.dumps({"runs": [run]})


def test_an_older_run_beside_the_current_one_is_flagged(tmp_path):
    root = _tree(
        tmp_path,
        {
            "overhead/results.json": "{}",
            "overhead/repeat-1/results.json": "{}",
            "overhead/runs/x.npy": "",  # git-ignored output of a local run
            "robustness/institution/matrix.json": "{}",
            "gpu/results.json": "{}",
        },
    )
    problems = layout_problems(root)
    assert len(problems) == 2
    assert problems[0].startswith("gpu/: not a declared benchmark")
    assert problems[1].startswith("overhead/repeat-1/: not part of the current result")


@pytest.mark.parametrize(
    ("files", "flagged"),
    [
        ({"scale/results.json": json.dumps({"machine_before": MACHINE})}, None),
        (
            {"scale/results.json": json.dumps({"machine_before": {**MACHINE, "git_commit": ""}})},
            "scale/results.json",
        ),
        (
            {"bytes/results.json": json.dumps({"machine": {"git_commit": COMMIT_A}})},
            "bytes/results.json",
        ),
        ({"privacy/n.json": json.dumps({"meta": {"machine": MACHINE}, "rows": []})}, None),
        ({"overhead/runs.json": _runs(COMMIT_A)}, None),
        ({"overhead/runs.json": _runs("0" * 40)}, "overhead/runs.json: runs[0] (a)"),
        (
            {"overhead/runs.json": json.dumps({"runs": [{"label": "a", "results": {}}]})},
            "overhead/runs.json: runs[0]",
        ),
        (
            {"topologies/status.json": "[]"},
            "topologies/status.json: covered by topologies/machine.json",
        ),
        (
            {
                "topologies/status.json": "[]",
                "topologies/machine.json": json.dumps({"before": MACHINE}),
            },
            None,
        ),
        ({"bytes/REPORT.md": "Machine: 2 CPUs; commit `42e34e7`."}, None),
        ({"bytes/REPORT.md": "Machine: 2 CPUs."}, "bytes/REPORT.md"),
        ({"bytes/REPORT.md": "commit `42e34e7`"}, "bytes/REPORT.md"),
        ({"bytes/REPORT.md": "Machine: 2 CPUs; commit unknown"}, "bytes/REPORT.md"),
    ],
)
def test_a_result_without_commit_or_machine_is_flagged(tmp_path, files, flagged):
    problems = provenance_problems(_tree(tmp_path, files))
    if flagged is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(flagged), problems
