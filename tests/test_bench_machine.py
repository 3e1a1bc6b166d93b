"""benchmarks.machine.provenance: the sentence every benchmark report prints about its machine."""

from __future__ import annotations

import pytest

from benchmarks.machine import provenance
from tests.test_bench_results_layout import provenance_problems

BEFORE = {
    "time_utc": "2026-11-26T15:55:27+00:00",
    "cpu_count_logical": 2,
    "cpu_count_physical": 2,
    "memory_total_gib": 23.5,
    "load_avg_1_5_15": [1.13, 1.17, 1.22],
    "platform": "Linux-6.1-x86_64",
    "python": "3.11.7",
    "git_commit": "777a34dc76bc31ef5deca30ee91567f05574b70f",
}
AFTER = {**BEFORE, "time_utc": "2026-11-26T15:57:47+00:00", "load_avg_1_5_15": [1.65, 1.38, 1.3]}


def test_one_record_names_machine_commit_time_and_load():
    assert provenance(BEFORE, source="`meta.machine` in matrix.json") == (
        "Machine (`meta.machine` in matrix.json): 2 logical CPUs, 23.5 GiB, Linux-6.1-x86_64; "
        "commit `777a34dc76bc31ef5deca30ee91567f05574b70f`; 2026-11-26T15:55:27+00:00; "
        "load average (1, 5, 15 min) [1.13, 1.17, 1.22]."
    )


def test_a_before_and_after_pair_spans_both_times_and_loads():
    assert provenance(BEFORE, AFTER) == (
        "Machine: 2 logical CPUs, 23.5 GiB, Linux-6.1-x86_64; "
        "commit `777a34dc76bc31ef5deca30ee91567f05574b70f`; "
        "2026-11-26T15:55:27+00:00 -> 2026-11-26T15:57:47+00:00; "
        "load average (1, 5, 15 min) [1.13, 1.17, 1.22] before, [1.65, 1.38, 1.3] after."
    )


def test_a_commit_that_moved_during_the_run_is_named_and_a_missing_load_is_left_out():
    before = {k: v for k, v in BEFORE.items() if k != "load_avg_1_5_15"}
    after = {**AFTER, "git_commit": "0123456789abcdef0123456789abcdef01234567+dirty"}
    assert provenance(before, after) == (
        "Machine: 2 logical CPUs, 23.5 GiB, Linux-6.1-x86_64; "
        "commit `777a34dc76bc31ef5deca30ee91567f05574b70f` "
        "(`0123456789abcdef0123456789abcdef01234567+dirty` at the end); "
        "2026-11-26T15:55:27+00:00 -> 2026-11-26T15:57:47+00:00."
    )


@pytest.mark.parametrize("key", ["git_commit", "platform", "time_utc"])
def test_a_record_without_a_needed_key_is_refused_naming_it(key):
    with pytest.raises(ValueError, match=rf"until record lacks {key} .*machine_info\(\)"):
        provenance(BEFORE, {k: v for k, v in AFTER.items() if k != key})


def test_the_sentence_satisfies_the_results_layout_check(tmp_path):
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "REPORT.md").write_text("# r\n\n" + provenance(BEFORE) + "\n")
    assert provenance_problems(tmp_path) == []
    (tmp_path / "bytes" / "REPORT.md").write_text("# r\n\nno provenance\n")
    assert len(provenance_problems(tmp_path)) == 1
