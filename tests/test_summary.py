"""Run summaries a person reads: partition ranges and per-stage counts."""
from tasks.summary import ranges, stage_table


def test_ranges_compact_the_partitions_a_run_redid():
    assert ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert ranges([]) == ""


def test_stage_table_counts_runs_skips_and_reasons():
    rows = stage_table([
        {"stage": "probe", "partition": 0, "skipped": True, "ok": 3, "rejected": 1, "error": 0,
         "reasons": {"silent": 1}},
        {"stage": "probe", "partition": 1, "skipped": False, "ok": 2, "rejected": 0, "error": 1,
         "reasons": {"exception": 1}, "seconds": 1.5},
    ])
    assert rows == [{"stage": "probe", "partitions_run": 1, "partitions_skipped": 1, "ok": 5,
                     "rejected": 1, "error": 1, "seconds": 1.5, "ran": "1",
                     "reasons": "exception=1, silent=1"}]
