"""Run summaries a person reads: partition ranges, per-stage counts, every track's outcome, the rejects."""
from collections import Counter

import pyarrow as pa

from schemas.common import CATALOG_SCHEMA, stage_schema
from schemas.summary import REJECTS_SCHEMA
from tasks.stage import Stage, run_partition, stage_keys
from tasks.store import StageStore
from tasks.summary import ranges, stage_table, summarize_catalog, summary_line, write_rejects


def test_ranges_compact_the_partitions_a_run_redid():
    assert ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert ranges([]) == ""


def test_stage_table_counts_this_runs_work_and_the_cumulative_totals():
    rows = stage_table([
        {"stage": "probe", "partition": 0, "skipped": True, "ok": 0, "rejected": 0, "error": 0,
         "reasons": {}},
        {"stage": "probe", "partition": 1, "skipped": False, "ok": 2, "rejected": 0, "error": 1,
         "reasons": {"exception": 1}, "seconds": 1.5},
        {"stage": "ingest", "partition": -1, "skipped": True, "ok": 0, "rejected": 0, "error": 0,
         "reasons": {}, "seconds": 0.25},
    ], {"probe": Counter(ok=5, rejected=1, error=1), "ingest": Counter(ok=7, rejected=2)})
    assert rows == [
        {"stage": "probe", "partitions_run": 1, "partitions_skipped": 1, "ok": 2, "rejected": 0,
         "error": 1, "seconds": 1.5, "ran": "1", "reasons": "exception=1",
         "total_ok": 5, "total_rejected": 1, "total_error": 1},
        # an ingest that found nothing new did no track work but still took its time
        {"stage": "ingest", "partitions_run": 0, "partitions_skipped": 1, "ok": 0, "rejected": 0,
         "error": 0, "seconds": 0.25, "ran": "", "reasons": "",
         "total_ok": 7, "total_rejected": 2, "total_error": 0}]


def test_stage_table_shows_a_failed_task_and_the_tasks_that_waited_for_it():
    rows = stage_table([
        {"stage": "probe", "partition": 0, "skipped": False, "ok": 0, "rejected": 0, "error": 0,
         "failed": "OSError: [Errno 28] No space left on device",
         "reasons": {"task_failed: OSError: [Errno 28] No space left on device": 1}},
        {"stage": "tag", "partition": 0, "skipped": False, "ok": 0, "rejected": 0, "error": 0,
         "not_run": True, "reasons": {"not_run: upstream task failed": 1}}])
    assert [(r["stage"], r["partitions_run"], r["partitions_skipped"], r["ran"], r["reasons"]) for r in rows] == [
        ("probe", 1, 0, "0", "task_failed: OSError: [Errno 28] No space left on device=1"),
        ("tag", 0, 0, "", "not_run: upstream task failed=1")]


def _catalog(store: StageStore, partition: int, rows: list[tuple[str, str, str | None]]) -> None:
    store.write_table(store.catalog_path(partition), pa.Table.from_pylist(
        [{"track_id": t, "status": s, "reason": r, "uri": f"/music/{t}.wav", "partition": partition}
         for t, s, r in rows], schema=CATALOG_SCHEMA))


def _stage(store: StageStore, name: str, partition: int, rows: list[tuple[str, str, str | None]]) -> None:
    store.write_table(store.stage_path(name, "k", partition), pa.Table.from_pylist(
        [{"track_id": t, "status": s, "reason": r} for t, s, r in rows], schema=stage_schema()))


def test_every_catalog_track_is_explained_and_every_reject_listed(tmp_path):
    store = StageStore(tmp_path / "work")
    _catalog(store, 0, [("a", "ok", None), ("b", "rejected", "empty: the file has zero bytes"),
                        ("c", "ok", None)])
    _stage(store, "probe", 0, [("a", "ok", None), ("c", "rejected", "silent: peak -120.0 dBFS")])
    _stage(store, "tag", 0, [("a", "error", "exception: ValueError: boom")])
    # partition 1's probe task never finished: its ok track is pending, not kept
    _catalog(store, 1, [("d", "ok", None), ("e", "rejected", "unreadable: not audio")])

    summary = summarize_catalog(store, ["probe", "tag"], {"probe": "k", "tag": "k"}, [0, 1])

    assert summary.counts() == {"tracks": 5, "ok": 0, "rejected": 3, "error": 1, "pending": 1,
                                "by_reason": {"ingest/empty": 1, "ingest/unreadable": 1,
                                              "probe/pending": 1, "probe/silent": 1, "tag/exception": 1}}
    assert summary.totals == {"ingest": Counter(ok=3, rejected=2), "probe": Counter(ok=1, rejected=1),
                              "tag": Counter(error=1)}
    assert summary.rejects.schema == REJECTS_SCHEMA
    assert summary.rejects.to_pylist() == [   # catalog order, whichever stage stopped the track
        {"uri": "/music/a.wav", "track_id": "a", "partition": 0, "stage": "tag", "status": "error",
         "reason": "exception: ValueError: boom"},
        {"uri": "/music/b.wav", "track_id": "b", "partition": 0, "stage": "ingest", "status": "rejected",
         "reason": "empty: the file has zero bytes"},
        {"uri": "/music/c.wav", "track_id": "c", "partition": 0, "stage": "probe", "status": "rejected",
         "reason": "silent: peak -120.0 dBFS"},
        {"uri": "/music/e.wav", "track_id": "e", "partition": 1, "stage": "ingest", "status": "rejected",
         "reason": "unreadable: not audio"}]

    path = write_rejects(store, summary.rejects)
    assert path == str(tmp_path / "work" / "reports" / "curate-rejects.parquet")
    assert store.read_table(path).equals(summary.rejects)
    assert [p.name for p in (tmp_path / "work" / "reports").iterdir()] == ["curate-rejects.parquet"]
    # a catalog with nothing rejected still replaces the file: it always shows the present
    write_rejects(store, summarize_catalog(store, [], {}, []).rejects)
    assert store.read_table(path).num_rows == 0


class Fragile(Stage):
    """Raises on one track: the runner isolates it as that track's error row."""
    name = "fragile"
    version = "1"
    schema = stage_schema()

    def process(self, tracks):
        if any(t["track_id"] == "b" for t in tracks):
            raise OSError("cannot decode b.wav")
        return [{"track_id": t["track_id"], "status": "ok", "reason": None} for t in tracks]


def test_a_track_that_raised_is_summarised_under_the_exception_code(tmp_path, make_cfg, monkeypatch):
    from tasks import stage as stage_mod

    monkeypatch.setitem(stage_mod.STAGE_MODULES, "fragile", f"{__name__}:Fragile")
    monkeypatch.setattr(stage_mod, "_INSTANCES", {})
    store = StageStore(tmp_path / "work")
    _catalog(store, 0, [("a", "ok", None), ("b", "ok", None)])
    cfg = make_cfg("stages=[fragile]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "fragile", 0, keys)

    summary = summarize_catalog(store, ["fragile"], keys, [0])

    assert summary.counts()["by_reason"] == {"fragile/exception": 1}
    assert [(r["track_id"], r["stage"], r["status"], r["reason"]) for r in summary.rejects.to_pylist()] == [
        ("b", "fragile", "error", "exception: OSError: cannot decode b.wav")]


def test_summary_line_accounts_for_every_track_and_file():
    line = summary_line({"tracks": 19, "ok": 12, "rejected": 7, "error": 0, "pending": 0, "found": 20,
                         "new_tracks": 0, "duplicates": 0, "known": 20,
                         "rejects_path": "/w/reports/curate-rejects.parquet"})
    assert line == ("curate: 19 tracks (12 kept, 7 rejected, 0 error, 0 not yet processed); this run "
                    "found 20 files (0 new tracks, 0 exact duplicates folded, 20 already catalogued); "
                    "rejects in /w/reports/curate-rejects.parquet")


def test_a_damaged_stage_output_is_quarantined_and_its_tracks_pending(tmp_path):
    store = StageStore(tmp_path / "work")
    _catalog(store, 0, [("a", "ok", None), ("b", "ok", None)])
    _stage(store, "probe", 0, [("a", "ok", None), ("b", "rejected", "silent: peak -120.0 dBFS")])
    _stage(store, "tag", 0, [("a", "ok", None)])
    damaged = store.stage_path("tag", "k", 0)
    data = open(damaged, "rb").read()
    open(damaged, "wb").write(data[: len(data) // 2])   # truncated by a full disk or a crash

    summary = summarize_catalog(store, ["probe", "tag"], {"probe": "k", "tag": "k"}, [0])

    assert summary.counts()["pending"] == 1 and summary.counts()["ok"] == 0
    assert summary.by_reason == Counter({"probe/silent": 1, "tag/pending": 1})
    assert "tag" not in summary.totals
    assert not store.exists(damaged)      # moved aside: the next run recomputes it
    [kept] = (tmp_path / "work" / "quarantine" / "stages" / "tag" / "k").iterdir()
    assert kept.name.startswith("part-00000.parquet.") and kept.read_bytes() == data[: len(data) // 2]
