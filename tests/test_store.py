"""The stage store and runner: atomic writes, skip-if-present, key invalidation, isolation."""
from pathlib import Path

import pyarrow as pa
import pytest

from schemas.common import REASONS, STATUS_OK, STATUS_REJECTED, reason_code, stage_schema
from tasks import stage as stage_mod
from tasks.stage import STAGE_MODULES, Stage, run_partition, stage_class, stage_keys
from tasks.store import StageStore

CALLS: dict[str, int] = {}


class Upper(Stage):
    name = "upper"
    version = "1"
    inputs = ()
    schema = stage_schema(pa.field("size", pa.int64()))

    def process(self, tracks):
        CALLS[self.name] = CALLS.get(self.name, 0) + len(tracks)
        rows = []
        for t in tracks:
            if t["uri"].endswith("boom"):
                raise ValueError("cannot handle boom")
            status = STATUS_OK if t["bytes"] > 10 else STATUS_REJECTED
            rows.append({"track_id": t["track_id"], "status": status,
                         "reason": None if status == STATUS_OK else "too_small: under 10 bytes",
                         "size": t["bytes"]})
        return rows


class Lower(Stage):
    name = "lower"
    version = "1"
    inputs = ("upper",)
    schema = stage_schema(pa.field("double", pa.int64()))

    def process(self, tracks):
        CALLS[self.name] = CALLS.get(self.name, 0) + len(tracks)
        return [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None,
                 "double": 2 * t["upper"]["size"]} for t in tracks]


class Other(Stage):
    name = "other"
    version = "1"
    inputs = ()
    schema = stage_schema()

    def process(self, tracks):
        CALLS[self.name] = CALLS.get(self.name, 0) + len(tracks)
        return [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in tracks]


@pytest.fixture
def store(tmp_path, monkeypatch):
    from schemas.common import CATALOG_SCHEMA

    for name in ("upper", "lower", "other"):
        monkeypatch.setitem(stage_mod.STAGE_MODULES, name, f"{__name__}:{name.capitalize()}")
    monkeypatch.setattr(stage_mod, "_INSTANCES", {})
    CALLS.clear()
    s = StageStore(tmp_path / "work")
    rows = [{"track_id": f"t{i}", "status": "ok", "uri": f"/x/{i}", "bytes": b, "partition": 0}
            for i, b in enumerate([5, 50, 500])]
    rows.append({"track_id": "bad", "status": "rejected", "reason": "unreadable: x",
                 "uri": "/x/bad", "bytes": 0, "partition": 0})
    s.write_table(s.catalog_path(0), pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA))
    return s


def test_write_is_atomic(store, monkeypatch):
    path = store.stage_path("upper", "k", 0)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(store.fs, "mv", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write_table(path, pa.table({"a": [1]}))
    assert not store.exists(path)
    assert store.glob_partitions(store.path("stages", "upper", "k")) == []


def test_runner_joins_upstream_and_skips_what_exists(store, make_cfg):
    cfg = make_cfg("stages=[upper, lower]")
    keys = stage_keys(cfg, ["upper", "lower"])
    first = run_partition(store, cfg, "upper", 0, keys)
    assert (first["ok"], first["rejected"], first["skipped"]) == (2, 1, False)
    assert CALLS["upper"] == 3  # the catalog reject is never given to a stage
    low = run_partition(store, cfg, "lower", 0, keys)
    assert low["ok"] == 2  # only tracks upper kept
    doubles = store.read_stage("lower", keys["lower"], 0).column("double").to_pylist()
    assert sorted(doubles) == [100, 1000]
    again = run_partition(store, cfg, "upper", 0, keys)
    assert again["skipped"] and CALLS["upper"] == 3 and again["ok"] == 0   # no work this run


def test_version_bump_invalidates_the_stage_and_its_dependants_only(store, make_cfg, monkeypatch):
    cfg = make_cfg("stages=[upper, lower, other]")
    before = stage_keys(cfg)
    monkeypatch.setattr(Upper, "version", "2")
    after = stage_keys(cfg)
    assert after["upper"] != before["upper"]
    assert after["lower"] != before["lower"]
    assert after["other"] == before["other"]


def test_config_change_invalidates(make_cfg, store):
    a = stage_keys(make_cfg("stages=[upper]"))
    b = stage_keys(make_cfg("stages=[upper]", "audio.min_duration_s=2.0"))
    assert a["upper"] != b["upper"]


# For each curate stage, an override of its own config that changes what it writes (the
# probe has no section of its own: the loader's guards under `audio` are its config).
OWN_CONFIG_CHANGE = {
    "probe": ("audio.silence_dbfs", -60.0),
    "aesthetics": ("aesthetics.min_pq", 4.0),
    "transcribe": ("transcribe.beam_size", 3),
    "lyrics": ("lyrics.min_score", 0.7),
    "rhythm": ("rhythm.min_bpm", 60.0),
    "caption": ("caption.prompt", "Describe the instruments only."),
}


def dependants(name: str) -> set[str]:
    """The stages that read `name`'s output, directly or through others, from their declared inputs."""
    found: set[str] = set()
    while True:
        more = {s for s in STAGE_MODULES if s not in found and s != name
                and ({name} | found) & set(stage_class(s).inputs)}
        if not more:
            return found
        found |= more


def test_every_curate_stage_has_a_config_change_to_test_its_key_with():
    assert set(OWN_CONFIG_CHANGE) == set(STAGE_MODULES)


@pytest.mark.parametrize("stage", list(OWN_CONFIG_CHANGE))
def test_a_stage_config_change_reruns_that_stage_and_its_dependants_only(make_cfg, stage):
    dotted, value = OWN_CONFIG_CHANGE[stage]
    base, changed = make_cfg(), make_cfg(f"{dotted}={value}")
    section, field = dotted.split(".")
    assert getattr(getattr(base, section), field) != value == getattr(getattr(changed, section), field)
    names = list(STAGE_MODULES)
    before, after = stage_keys(base, names), stage_keys(changed, names)
    rerun = {name for name in names if before[name] != after[name]}
    assert rerun == {stage} | dependants(stage), dotted


def test_how_the_caption_server_is_reached_reruns_nothing(make_cfg):
    names = list(STAGE_MODULES)
    assert stage_keys(make_cfg("caption.url=http://a/v1", "caption.timeout_s=5"), names) == \
        stage_keys(make_cfg("caption.url=http://b/v1"), names)


def test_one_bad_track_does_not_fail_the_partition(store, make_cfg):
    from schemas.common import CATALOG_SCHEMA

    rows = [{"track_id": "a", "status": "ok", "uri": "/x/a", "bytes": 99, "partition": 1},
            {"track_id": "b", "status": "ok", "uri": "/x/boom", "bytes": 99, "partition": 1}]
    store.write_table(store.catalog_path(1), pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA))
    cfg = make_cfg("stages=[upper]")
    result = run_partition(store, cfg, "upper", 1, stage_keys(cfg))
    assert (result["ok"], result["error"]) == (1, 1)
    assert result["reasons"] == {"exception": 1}     # what the run summary groups the error under
    t = store.read_stage("upper", stage_keys(cfg)["upper"], 1).to_pylist()
    bad = next(r for r in t if r["track_id"] == "b")
    # the documented code, then what Upper raised: its type and its message
    assert (bad["status"], bad["reason"]) == ("error", "exception: ValueError: cannot handle boom")
    assert reason_code(bad["reason"]) in REASONS
    assert next(r for r in t if r["track_id"] == "a")["status"] == STATUS_OK


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flipped_byte"])
def test_a_damaged_output_is_quarantined_and_recomputed(store, make_cfg, damage, caplog):
    """Truncation and garbage break the footer (found before every skip); a flipped byte in a
    page is found by Parquet's page checksum when the file is read in full."""
    import os

    cfg = make_cfg("stages=[upper]")
    keys = stage_keys(cfg)
    run_partition(store, cfg, "upper", 0, keys)
    path = store.stage_path("upper", keys["upper"], 0)
    clean = store.read_table(path)
    data = open(path, "rb").read()
    bad = {"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)),
           "flipped_byte": data[:8] + bytes([data[8] ^ 0xFF]) + data[9:]}[damage]
    open(path, "wb").write(bad)
    assert store.unreadable(path, full=True) is not None

    if damage == "flipped_byte":      # the footer still reads: a cheap skip check cannot see it
        assert run_partition(store, cfg, "upper", 0, keys)["skipped"]
        assert store.read_table_or_quarantine(path) is None     # a full read finds it and moves it
    with caplog.at_level("WARNING", logger="acepipe.store"):
        again = run_partition(store, cfg, "upper", 0, keys)
    assert not again["skipped"] and CALLS["upper"] == 6        # computed a second time
    assert store.read_table(path).equals(clean)
    moved = list((Path(store.root) / "quarantine").rglob("part-00000.parquet.*"))
    assert len(moved) == 1 and moved[0].read_bytes() == bad     # kept for a person to look at
    if damage != "flipped_byte":
        assert "quarantined" in caplog.text and path in caplog.text


def test_a_run_waiting_for_a_lock_says_whose_it_is(store, caplog):
    import json
    import os
    import socket
    import threading

    with store.lock("ingest"):
        owner = json.load(open(os.path.join(store.root, ".lock-ingest")))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["since"]
        done = threading.Event()

        def second():
            with store.lock("ingest", poll_s=0.05):
                done.set()

        with caplog.at_level("WARNING", logger="acepipe.store"):
            t = threading.Thread(target=second)
            t.start()
            t.join(0.5)
            assert not done.is_set()
    t.join(5)
    assert done.is_set()
    assert f"pid {os.getpid()} on {socket.gethostname()} since {owner['since']}" in caplog.text


def test_two_processes_never_compute_the_same_partition_twice(tmp_path, tiny_models_dir):
    """Two runs started together on one work root: each partition's stage work happens once
    (the second waits on the partition's lock, then finds the output)."""
    import subprocess
    import sys
    import textwrap

    from schemas.common import CATALOG_SCHEMA

    work = tmp_path / "work"
    s = StageStore(work)
    for p in range(4):
        rows = [{"track_id": f"p{p}t{i}", "status": "ok", "uri": f"/x/{p}/{i}", "bytes": 99, "partition": p}
                for i in range(3)]
        s.write_table(s.catalog_path(p), pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA))
    log = tmp_path / "calls.log"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_store as t
        from schemas.config import load_config
        from tasks import stage as stage_mod
        from tasks.stage import run_partition, stage_keys
        from tasks.store import StageStore

        stage_mod.STAGE_MODULES["upper"] = "test_store:Upper"
        process = t.Upper.process
        def slow(self, tracks):
            with open({str(log)!r}, "a") as fh:
                fh.write(",".join(x["track_id"] for x in tracks) + "\\n")
            time.sleep(0.3)
            return process(self, tracks)
        t.Upper.process = slow
        cfg = load_config("tiny", ["work_root={work}", "models.tiny_dir={tiny_models_dir}", "stages=[upper]"], environ={{}})
        keys = stage_keys(cfg)
        for p in range(4):
            run_partition(StageStore({str(work)!r}), cfg, "upper", p, keys)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    batches = log.read_text().split()
    assert sorted(batches) == sorted(f"p{p}t0,p{p}t1,p{p}t2" for p in range(4))   # each once
