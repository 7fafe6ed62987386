"""The stage runner (tasks/stage.py): what a run reports per partition, which config a stage
runs with, stage keys and their order, and two runs sharing one work root."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pyarrow as pa
import pytest

from schemas.common import CATALOG_SCHEMA, STATUS_ERROR, STATUS_OK, STATUS_REJECTED, stage_schema
from tasks import stage as stage_mod
from tasks import store as store_mod
from tasks.stage import (STAGE_MODULES, Stage, check_stages, dag_order, done_partitions, run_partition,
                         stage_class, stage_keys)
from tasks.store import StageStore

BATCHES: list[tuple[str, list[str]]] = []   # (stage, track ids) of every process() call
SLOW_S = {"gate": 0.0}                       # how long Gate.process takes
BARRIER: dict[str, threading.Barrier] = {}   # set: Gate and Echo meet here inside process()


class Gate(Stage):
    """Keeps a track of at least 100 bytes per second of `audio.min_duration_s`: it reads its
    config while it runs, so a stage built with another config writes something else."""
    name = "gate"
    version = "1"
    schema = stage_schema(pa.field("size", pa.int64()))

    @classmethod
    def check(cls, cfg):
        if cfg.audio.min_duration_s > 100:
            raise ValueError("gate: audio.min_duration_s over 100 s keeps nothing")

    def process(self, tracks):
        BATCHES.append((self.name, [t["track_id"] for t in tracks]))
        if "meet" in BARRIER:
            BARRIER["meet"].wait()
        time.sleep(SLOW_S["gate"])
        floor = 100 * self.cfg.audio.min_duration_s
        rows = []
        for t in tracks:
            if t["uri"].endswith("forgotten"):
                continue                      # a buggy stage that drops a track
            if t["uri"].endswith("long-boom"):
                raise ValueError("x" * 1000)
            kept = t["bytes"] >= floor
            rows.append({"track_id": t["track_id"], "status": STATUS_OK if kept else STATUS_REJECTED,
                         "reason": None if kept else f"too_short: {t['bytes']} bytes < {floor:.0f}",
                         "size": t["bytes"]})
        return rows


class Echo(Stage):
    """Reads gate's output: keeps every track gate kept."""
    name = "echo"
    version = "1"
    inputs = ("gate",)
    schema = stage_schema()

    def process(self, tracks):
        BATCHES.append((self.name, [t["track_id"] for t in tracks]))
        if "meet" in BARRIER:
            BARRIER["meet"].wait()
        return [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in tracks]


class Solo(Stage):
    """A stage whose key the test pins: its config part is fixed, not the profile's."""
    name = "solo"
    version = "3"
    schema = stage_schema()

    def fingerprint(self):
        return {"threshold": 0.5, "languages": ["en", "fr"]}


class After(Solo):
    name = "after"
    version = "1"
    inputs = ("solo",)


class CycleA(Stage):
    name = "cycle_a"
    version = "1"
    inputs = ("cycle_b",)
    schema = stage_schema()


class CycleB(CycleA):
    name = "cycle_b"
    inputs = ("cycle_a",)


@pytest.fixture
def store(tmp_path, monkeypatch):
    for cls in (Gate, Echo, Solo, After, CycleA, CycleB):
        monkeypatch.setitem(stage_mod.STAGE_MODULES, cls.name, f"{__name__}:{cls.__name__}")
    monkeypatch.setattr(stage_mod, "_INSTANCES", {})
    monkeypatch.setattr(stage_mod, "_RUN_LOCKS", {})
    monkeypatch.setitem(SLOW_S, "gate", 0.0)
    BATCHES.clear()
    BARRIER.clear()
    s = StageStore(tmp_path / "work")
    catalog(s, 0, [("t0", "/x/0", 50), ("t1", "/x/1", 150), ("t2", "/x/2", 500)])
    return s


def catalog(store: StageStore, partition: int, tracks: list[tuple[str, str, int]],
            status: str = "ok") -> None:
    rows = [{"track_id": t, "status": status, "reason": None if status == "ok" else "unreadable: x",
             "uri": uri, "bytes": size, "partition": partition} for t, uri, size in tracks]
    store.write_table(store.catalog_path(partition), pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA))


def test_a_run_reports_what_it_did_to_the_partition(store, make_cfg):
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    SLOW_S["gate"] = 0.05
    started = time.perf_counter()
    result = run_partition(store, cfg, "gate", 0, keys)
    wall = time.perf_counter() - started
    seconds = result.pop("seconds")
    assert result == {"stage": "gate", "partition": 0, "key": keys["gate"], "skipped": False,
                      "ok": 2, "rejected": 1, "error": 0, "reasons": {"too_short": 1}}
    assert 0.05 <= seconds <= wall + 0.0005     # the time the stage took (to the ms), not a constant
    assert BATCHES == [("gate", ["t0", "t1", "t2"])]   # the partition reached the stage as one batch


def test_a_skipped_partition_reports_no_work_and_does_not_wait_for_a_lock(store, make_cfg, monkeypatch):
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "gate", 0, keys)

    def no_lock(*args, **kwargs):
        raise AssertionError("a partition whose output exists took a lock")

    monkeypatch.setattr(store, "lock", no_lock)
    assert run_partition(store, cfg, "gate", 0, keys) == {
        "stage": "gate", "partition": 0, "key": keys["gate"], "skipped": True, "seconds": 0.0,
        "ok": 0, "rejected": 0, "error": 0, "reasons": {}}
    assert len(BATCHES) == 1


def test_a_partition_with_no_kept_track_never_calls_the_stage(store, make_cfg):
    catalog(store, 1, [("r0", "/x/r0", 999), ("r1", "/x/r1", 999)], status="rejected")
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    result = run_partition(store, cfg, "gate", 1, keys)
    assert {k: result[k] for k in ("skipped", "ok", "rejected", "error", "reasons")} == \
        {"skipped": False, "ok": 0, "rejected": 0, "error": 0, "reasons": {}}
    assert BATCHES == []
    written = store.read_stage("gate", keys["gate"], 1)
    assert written.num_rows == 0 and written.schema.equals(Gate.schema)   # still written: done


def test_each_config_runs_with_its_own_stage_instance(store, make_cfg):
    """Two configs in one worker (a sweep of thresholds): each partition is judged by the config
    of its own key, not by whichever config loaded the stage first."""
    loose, strict = make_cfg("stages=[gate]"), make_cfg("stages=[gate]", "audio.min_duration_s=2.0")
    loose_keys, strict_keys = stage_keys(loose), stage_keys(strict)
    assert run_partition(store, loose, "gate", 0, loose_keys)["ok"] == 2        # 150 and 500 >= 100
    assert run_partition(store, strict, "gate", 0, strict_keys)["ok"] == 1      # only 500 >= 200
    assert run_partition(store, loose, "gate", 0, loose_keys)["skipped"]
    assert store.read_stage("gate", strict_keys["gate"], 0).column("status").to_pylist() == \
        [STATUS_REJECTED, STATUS_REJECTED, STATUS_OK]


def test_a_track_the_stage_forgot_is_an_error_row_not_a_lost_track(store, make_cfg):
    catalog(store, 2, [("a", "/x/a", 500), ("b", "/x/forgotten", 500), ("c", "/x/c", 500)])
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    result = run_partition(store, cfg, "gate", 2, keys)
    assert (result["ok"], result["error"], result["reasons"]) == (2, 1, {"exception": 1})
    rows = store.read_stage("gate", keys["gate"], 2).to_pylist()
    assert [r["track_id"] for r in rows] == ["a", "b", "c"]     # catalog order, each once
    assert rows[1] == {"track_id": "b", "status": STATUS_ERROR, "size": None,
                       "reason": "exception: the stage returned no row for this track"}


def test_the_output_has_the_declared_schema_even_when_no_reason_is_set(store, make_cfg):
    catalog(store, 3, [("a", "/x/a", 500), ("b", "/x/b", 600)])
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "gate", 3, keys)
    written = store.read_stage("gate", keys["gate"], 3)
    assert written.column("reason").to_pylist() == [None, None]
    assert written.schema.equals(Gate.schema)    # reason a string column, track_id not nullable


def test_a_long_exception_message_is_cut_in_the_reason(store, make_cfg):
    catalog(store, 4, [("a", "/x/a", 500), ("b", "/x/long-boom", 500)])
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "gate", 4, keys)
    bad = store.read_stage("gate", keys["gate"], 4).to_pylist()[1]
    assert bad["reason"] == "exception: ValueError: " + "x" * 300     # 1000 raised, 300 kept


def test_the_warning_about_a_damaged_output_says_why(store, make_cfg, caplog):
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "gate", 0, keys)
    path = store.stage_path("gate", keys["gate"], 0)
    with open(path, "r+b") as fh:
        fh.truncate(20)
    why = store.unreadable(path)
    assert why
    with caplog.at_level("WARNING", logger="acepipe.store"):
        assert not run_partition(store, cfg, "gate", 0, keys)["skipped"]
    assert why in caplog.text


def test_an_unknown_stage_is_named_with_the_known_ones(store):
    with pytest.raises(KeyError) as err:
        stage_class("captoin")
    assert err.value.args[0] == f"unknown stage 'captoin'; known: {', '.join(STAGE_MODULES)}"
    assert "probe, aesthetics, transcribe, lyrics, rhythm, caption" in err.value.args[0]


def test_stage_keys_are_stable_across_releases(store, make_cfg):
    """A work root made by an earlier release stays cached: the key of an unchanged stage (same
    name, version, config and upstream) must not move, or the next night reruns every track.
    The values are the first 16 hex digits of sha256 over the sorted-key JSON of {name, version,
    config, upstream keys}, recorded once; change them only with a note that the upgrade reruns
    everything."""
    keys = stage_keys(make_cfg(), ["after"])
    assert keys == {"solo": "27f8b9b6ef840b64", "after": "346b108e320deca2"}


def test_the_keys_of_a_stage_asked_alone_are_those_of_the_whole_dag(store, make_cfg):
    cfg = make_cfg("stages=[gate, echo, solo]")
    alone = stage_keys(cfg, ["echo"])
    assert set(alone) == {"gate", "echo"}       # what echo needs, not every stage of the config
    assert alone == {k: v for k, v in stage_keys(cfg).items() if k in alone}


def test_a_dependency_cycle_is_named(store, make_cfg):
    with pytest.raises(ValueError) as err:
        stage_keys(make_cfg(), ["cycle_a"])
    assert str(err.value) == "stage dependency cycle: cycle_a -> cycle_b -> cycle_a"


def test_dag_order_puts_what_a_stage_needs_first_once(store):
    assert dag_order(["echo"]) == ["gate", "echo"]
    assert dag_order(["echo", "solo", "gate", "after"]) == ["gate", "echo", "solo", "after"]


def test_check_stages_asks_each_stage_about_this_config(store, make_cfg):
    check_stages(make_cfg(), ["gate", "echo"])
    with pytest.raises(ValueError, match="gate: audio.min_duration_s over 100 s"):
        check_stages(make_cfg("audio.min_duration_s=101"), ["echo", "gate"])


def test_two_stages_on_one_partition_run_side_by_side(store, make_cfg):
    """Different stages (here: gate of partition 1, echo of partition 0) never wait for each other's lock."""
    catalog(store, 1, [("u", "/x/u", 500)])
    cfg = make_cfg("stages=[gate, echo]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "gate", 0, keys)
    BATCHES.clear()
    BARRIER["meet"] = threading.Barrier(2, timeout=10)    # each waits inside process() for the other
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(n, run_partition(store, cfg, n, p, keys)))
               for n, p in (("echo", 0), ("gate", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert (results["echo"]["ok"], results["echo"]["error"]) == (2, 0)
    assert (results["gate"]["ok"], results["gate"]["error"]) == (1, 0)


def test_a_second_run_waits_for_the_first_however_long_then_skips(store, make_cfg, monkeypatch):
    """Two runs on one work root reach the same partition: the second waits for the first (for
    hours, if a real model takes that long), then finds its output instead of computing it again."""
    clock = {"now": 0.0}

    def monotonic():      # every look at the clock is 1000 s later: a wait of hours in a second
        clock["now"] += 1000.0
        return clock["now"]

    monkeypatch.setattr(store_mod, "time", SimpleNamespace(
        monotonic=monotonic, sleep=time.sleep, strftime=time.strftime, gmtime=time.gmtime))
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    SLOW_S["gate"] = 1.2
    results: dict[str, object] = {}

    def run(label):
        try:
            results[label] = run_partition(store, cfg, "gate", 0, keys)
        except Exception as exc:  # noqa: BLE001 - the test reports it below
            results[label] = exc

    first = threading.Thread(target=run, args=("first",))
    first.start()
    while not BATCHES:                 # the first run is inside the stage, holding the partition
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    first.join(30)
    second.join(30)
    assert not results["first"]["skipped"]
    assert isinstance(results["second"], dict) and results["second"]["skipped"], results["second"]
    assert BATCHES == [("gate", ["t0", "t1", "t2"])]     # computed once


def test_the_plan_finds_the_outputs_that_read_among_the_partitions_asked(store, make_cfg):
    cfg = make_cfg("stages=[gate]")
    keys = stage_keys(cfg)
    for p in (1, 2):
        catalog(store, p, [(f"p{p}", f"/x/p{p}", 500)])
    for p in (0, 1, 2):
        run_partition(store, cfg, "gate", p, keys)
    damaged = store.stage_path("gate", keys["gate"], 1)
    with open(damaged, "r+b") as fh:
        fh.truncate(10)
    assert done_partitions(store, "gate", keys["gate"], [0, 1, 5]) == {0}   # 2 not asked, 5 never run
    assert not store.exists(damaged)                                        # set aside: planned again
    assert done_partitions(store, "gate", "no-such-key", [0]) == set()
