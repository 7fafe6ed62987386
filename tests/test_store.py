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


# -- the store's own API: layout, bytes, listings, quarantine, the lock's owner --------------

def test_the_layout_of_a_work_root(tmp_path):
    store = StageStore(tmp_path / "work")
    assert store.local and not StageStore("memory://bucket/work").local
    assert store.catalog_path(3) == f"{tmp_path}/work/catalog/part-00003.parquet"
    assert store.stage_path("probe", "abc", 123456) == f"{tmp_path}/work/stages/probe/abc/part-123456.parquet"


def test_bytes_round_trip_and_leave_no_temporary_file(tmp_path, monkeypatch):
    store = StageStore(tmp_path / "work")
    path = store.path("deep", "er", "blob.bin")
    moves = []
    mv = store.fs.mv
    monkeypatch.setattr(store.fs, "mv", lambda src, dst: (moves.append((src, dst)), mv(src, dst)))
    store.write_bytes(path, b"\x00payload\xff")
    monkeypatch.undo()
    assert store.read_bytes(path) == b"\x00payload\xff"
    [(tmp, dst)] = moves      # a hidden sibling renamed into place: the same directory, so the rename is atomic
    assert dst == path and tmp.startswith(store.path("deep", "er", ".tmp-")) and tmp.endswith("-blob.bin")
    assert store.listdir(store.path("deep", "er")) == ["blob.bin"]
    assert store.listdir(store.path("nowhere")) == []


def test_stream_digest_is_blake2b_128_of_every_chunk():
    import hashlib
    import io

    from tasks.store import stream_digest

    data = bytes(range(256)) * (9 * 2**20 // 256 + 7)       # over two 4 MiB chunks and a tail
    assert stream_digest(io.BytesIO(data)) == (len(data), hashlib.blake2b(data, digest_size=16).hexdigest())
    assert stream_digest(io.BytesIO(b"")) == (0, hashlib.blake2b(b"", digest_size=16).hexdigest())


def test_check_writable_leaves_nothing_and_names_a_root_it_cannot_use(tmp_path):
    from tasks.store import StoreError

    store = StageStore(tmp_path / "work")
    store.check_writable()
    assert list((tmp_path / "work").iterdir()) == []
    store.write_bytes(store.path("catalog", "part-00000.parquet"), b"x")
    store.check_writable()                       # a rerun: the root exists and holds work
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["catalog"]
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(StoreError) as err:
        StageStore(tmp_path / "afile" / "work").check_writable()
    assert str(err.value).startswith(f"work root '{tmp_path / 'afile' / 'work'}' is not writable: ")


def test_listings_of_partitions_and_keys(store):
    for key, part in (("k1", 7), ("k1", 0), ("k2", 12)):
        store.write_table(store.stage_path("upper", key, part), pa.table({"a": [1]}))
    store.write_bytes(store.path("stages", "upper", "k1", "part-7.parquet"), b"x")   # not a partition name
    store.write_bytes(store.path("stages", "upper", "k1", "notes.txt"), b"x")
    assert store.glob_partitions(store.path("stages", "upper", "k1")) == [0, 7]
    assert store.glob_partitions(store.path("stages", "upper", "k9")) == []
    assert sorted(store.stage_keys_on_disk("upper")) == ["k1", "k2"]
    assert store.stage_keys_on_disk("lower") == []
    assert store.catalog_partitions() == [0]


def test_read_catalog_of_every_partition_or_none(store, tmp_path):
    from schemas.common import CATALOG_SCHEMA

    more = [{"track_id": "n0", "status": "ok", "uri": "/y/0", "bytes": 9, "partition": 2}]
    store.write_table(store.catalog_path(2), pa.Table.from_pylist(more, schema=CATALOG_SCHEMA))
    assert store.read_catalog().column("track_id").to_pylist() == ["t0", "t1", "t2", "bad", "n0"]
    assert store.read_catalog(2).column("track_id").to_pylist() == ["n0"]
    older = [{"track_id": "o0", "status": "ok", "uri": "/y/o", "bytes": 3}]    # written before `partition` existed
    store.write_table(store.catalog_path(3), pa.Table.from_pylist(older))
    assert store.read_catalog().column("partition").to_pylist() == [0, 0, 0, 0, 2, None]
    empty = StageStore(tmp_path / "empty").read_catalog()
    assert empty.num_rows == 0 and empty.schema.equals(CATALOG_SCHEMA)


def test_reads_of_some_columns(store):
    table = pa.table({"track_id": ["a"], "status": ["ok"], "score": [0.5]})
    path = store.stage_path("upper", "k", 0)
    store.write_table(path, table)
    assert store.read_stage("upper", "k", 0, columns=["score"]).column_names == ["score"]
    assert store.read_table_or_quarantine(path, columns=["status"]).column_names == ["status"]
    assert store.read_table_or_quarantine(store.stage_path("upper", "k", 1)) is None   # missing: None


def test_outputs_are_zstd_compressed_with_page_checksums(store):
    """A byte flipped inside a page of incompressible data still decompresses: only Parquet's page
    checksum tells, and only a full read (acepipe verify) looks at it."""
    import os

    import pyarrow.parquet as pq

    path = store.stage_path("upper", "k", 0)
    store.write_table(path, pa.table({"a": [os.urandom(4000)]}))
    meta = pq.read_metadata(path).row_group(0).column(0)
    assert meta.compression == "ZSTD"
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(open(path, "rb").read())
    data[start + meta.total_compressed_size // 10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert pq.read_table(path, page_checksum_verification=False).num_rows == 1   # reads, wrongly
    assert store.unreadable(path) is None                   # the footer reads
    assert store.unreadable(path, full=True).startswith(
        "OSError: could not verify page integrity, CRC checksum verification failed")
    assert store.read_table_or_quarantine(path) is None and not store.exists(path)
    store.write_bytes(path, b"PAR1" + b"x" * 64)
    assert store.unreadable(path).startswith("ArrowInvalid: ") and "magic bytes not found" in store.unreadable(path)
    with pytest.raises(FileNotFoundError):
        store.unreadable(store.stage_path("upper", "k", 9))


def test_listings_on_an_object_store(tmp_path):
    import uuid

    store = StageStore(f"memory://list-{uuid.uuid4().hex}/work")
    try:
        for name in ("part-00002.parquet", "part-00000.parquet", "notes.txt"):
            store.write_bytes(store.path("catalog", name), b"x")
        store.write_bytes(store.path("catalog", "sub", "f"), b"x")
        assert sorted(store.listdir(store.path("catalog"))) == \
            ["notes.txt", "part-00000.parquet", "part-00002.parquet", "sub"]
        assert store.catalog_partitions() == [0, 2]
        store.write_bytes(store.path("stages", "probe", "k1", "part-00000.parquet"), b"x")
        assert store.stage_keys_on_disk("probe") == ["k1"] and store.stage_keys_on_disk("tag") == []
        assert store.listdir(store.path("nowhere")) == [] and store.glob_partitions(store.path("nowhere")) == []
    finally:
        store.fs.rm(store.root, recursive=True)


def test_a_quarantined_file_keeps_its_path_and_a_utc_stamp(store, caplog, monkeypatch):
    import re
    import time
    from calendar import timegm

    path = store.stage_path("upper", "k", 0)
    store.write_bytes(path, b"damaged")
    monkeypatch.setenv("TZ", "XXX-11")        # the machine's zone must not show in the stamp
    time.tzset()
    try:
        before = time.time()
        with caplog.at_level("WARNING", logger="acepipe.store"):
            dest = store.quarantine(path, "ArrowInvalid: not parquet")
        after = time.time()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert not store.exists(path) and open(dest, "rb").read() == b"damaged"
    name = re.fullmatch(re.escape(store.path("quarantine", "stages", "upper", "k", "part-00000.parquet"))
                        + r"\.(\d{8}T\d{6}Z)-[0-9a-f]{6}", dest)
    assert name, dest
    stamp = timegm(time.strptime(name.group(1), "%Y%m%dT%H%M%SZ"))
    assert int(before) <= stamp <= after
    assert [r.getMessage() for r in caplog.records] == \
        [f"quarantined {path} (ArrowInvalid: not parquet) -> {dest}; it will be recomputed"]


def test_a_table_that_does_not_read_is_quarantined_with_the_error(store, caplog, monkeypatch):
    path = store.stage_path("upper", "k", 0)
    store.write_bytes(path, b"PAR1" + b"x" * 64)
    with caplog.at_level("WARNING", logger="acepipe.store"):
        assert store.read_table_or_quarantine(path) is None
    assert "(ArrowInvalid: " in caplog.text and "Parquet magic bytes not found" in caplog.text
    assert not store.exists(path)

    store.write_bytes(path, b"x")            # a long error is cut: one readable log line
    monkeypatch.setattr(store, "read_table", lambda *a, **k: (_ for _ in ()).throw(OSError("e" * 500)))
    with caplog.at_level("WARNING", logger="acepipe.store"):
        caplog.clear()
        assert store.read_table_or_quarantine(path) is None
    assert f"(OSError: {'e' * 200}) -> " in caplog.text
    monkeypatch.setattr(store.fs, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("e" * 500)))
    assert store.unreadable(path) == f"OSError: {'e' * 200}"


def _write_lock(store, name: str, owner: str) -> str:
    path = store.path(f".lock-{name}")
    store.write_bytes(path, owner.encode())
    return path


def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_a_lock_left_by_a_dead_process_of_this_host_is_broken(store):
    import json
    import socket

    path = _write_lock(store, "ingest", json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with store.lock("ingest", timeout_s=0.2, poll_s=0.05):
        assert json.loads(store.read_bytes(path))["pid"] != _dead_pid()   # ours now
    assert not store.exists(path)


@pytest.mark.parametrize("owner, shown", [
    ("", "a run starting right now"),          # being written: never broken
    ("live-here", "pid {pid} on {host} since ?"),
    ("other-user", "pid {pid} on {host} since ?"),   # alive, but not ours to signal
    ("dead-elsewhere", "pid {dead} on another-host since 2026-01-01T00:00:00Z"),   # its pids are not ours to check
])
def test_a_lock_that_may_be_live_is_waited_for_and_named(store, caplog, monkeypatch, owner, shown):
    import json
    import os
    import socket

    from tasks.store import StoreError

    dead = _dead_pid()
    if owner == "other-user":
        def kill(pid, sig):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "kill", kill)
    content = {"": "",
               "live-here": json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
               "other-user": json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
               "dead-elsewhere": json.dumps({"pid": dead, "host": "another-host",
                                             "since": "2026-01-01T00:00:00Z"})}[owner]
    path = _write_lock(store, "ingest", content)
    shown = shown.format(pid=os.getpid(), host=socket.gethostname(), dead=dead)
    with caplog.at_level("WARNING", logger="acepipe.store"), pytest.raises(StoreError) as err:
        with store.lock("ingest", timeout_s=0.3, poll_s=0.05):
            pass
    assert str(err.value) == (f"{store.url}/.lock-ingest is held by another run ({shown}) for over 0 s; "
                              "if no run is active, delete the file")
    assert caplog.text.count(f"waiting for the ingest lock of {store.url}, held by {shown}") == 1   # said once
    assert store.read_bytes(path) == content.encode()     # left as it was


def test_on_an_object_store_the_lock_is_a_conditional_create(tmp_path):
    import uuid

    from tasks.store import StoreError

    root = f"memory://lock-{uuid.uuid4().hex}/work"
    first, second = StageStore(root), StageStore(root)
    assert not first.local
    try:
        with first.lock("ingest"):
            with pytest.raises(StoreError, match=r"/\.lock-ingest is held by another run \(pid \d+ on "):
                with second.lock("ingest", timeout_s=0.2, poll_s=0.05):
                    pass
        with second.lock("ingest", timeout_s=0.2, poll_s=0.05):    # released: the next run takes it
            assert second.exists(second.path(".lock-ingest"))
        assert not first.exists(first.path(".lock-ingest"))
    finally:
        first.fs.rm(first.root, recursive=True)


def test_a_filesystem_that_cannot_create_only_if_absent_stops_the_run(tmp_path, monkeypatch):
    from tasks.store import StoreError

    store = StageStore("memory://no-create-mode/work")

    def pipe_file(path, value, **kwargs):
        raise TypeError("pipe_file() got an unexpected keyword argument 'mode'")

    monkeypatch.setattr(store.fs, "pipe_file", pipe_file)
    with pytest.raises(StoreError) as err:
        with store.lock("ingest", timeout_s=0.2):
            pass
    assert str(err.value) == (
        "work root 'memory://no-create-mode/work': MemoryFileSystem cannot create a file only if it is "
        "absent (pipe_file() got an unexpected keyword argument 'mode'), so two runs could both append a "
        "partition; use a local path or an S3 store that honours If-None-Match")


def test_a_lock_on_a_new_work_root_creates_it_and_is_gone_after_a_failure(tmp_path):
    store = StageStore(tmp_path / "fresh" / "work")
    with pytest.raises(RuntimeError, match="the locked work failed"):
        with store.lock("ingest"):
            assert (tmp_path / "fresh" / "work" / ".lock-ingest").exists()
            raise RuntimeError("the locked work failed")
    assert list((tmp_path / "fresh" / "work").iterdir()) == []


def test_joined_rows_are_the_tracks_every_upstream_stage_kept(store):
    def output(stage, rows):
        store.write_table(store.stage_path(stage, "k", 0), pa.Table.from_pylist(
            [{"track_id": t, "status": s, "reason": None, "score": v} for t, s, v in rows],
            schema=stage_schema(pa.field("score", pa.float64()))))

    output("upper", [("t0", "ok", 1.0), ("t1", "ok", 2.0), ("t2", "rejected", 3.0), ("bad", "ok", 4.0)])
    output("other", [("t1", "ok", 20.0), ("t2", "ok", 30.0)])       # t0 has no row: not run yet
    assert [r["track_id"] for r in store.joined_rows(0, {})] == ["t0", "t1", "t2"]   # the catalog's kept
    [t1] = store.joined_rows(0, {"upper": "k", "other": "k"})
    assert (t1["track_id"], t1["uri"], t1["bytes"]) == ("t1", "/x/1", 50)
    assert (t1["upper"]["score"], t1["other"]["score"]) == (2.0, 20.0)
    assert t1["upper"]["status"] == t1["other"]["status"] == "ok"
