"""`acepipe inspect`: what it prints for a track is what the store holds for that track under
the current config's stage keys, found by track_id, by path or by a duplicate's path.

The work root is written here with the store's own writer and the stage schemas (no flow),
so every value the report shows is one this file chose."""
from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from flows.cli import main
from flows.params import RunParams
from schemas.aesthetics import AESTHETICS_SCHEMA
from schemas.common import CATALOG_SCHEMA
from schemas.probe import PROBE_SCHEMA
from schemas.transcribe import TRANSCRIBE_SCHEMA
from tasks.stage import dag_order, stage_keys
from tasks.store import StageStore

OLD = ["transcribe.sample_len=32"]   # another config: the transcribe key (and lyrics', downstream) differ


def track_id(name: str) -> str:
    return hashlib.blake2b(name.encode(), digest_size=16).hexdigest()


A, B, C = track_id("song a"), track_id("song b"), track_id("song c")


def keys_of(work, overrides=()) -> dict[str, str]:
    """The stage keys of the tiny profile on `work`, loaded as the CLI loads its config."""
    cfg = RunParams(config="tiny", work_root=str(work), overrides=list(overrides)).load()
    return stage_keys(cfg, dag_order(cfg.stages))


def catalog_row(tid, path, partition, aliases=(), **facts) -> dict:
    return {"track_id": tid, "status": "ok", "reason": None, "uri": str(path), "uri_raw": os.fsencode(path),
            "aliases": [str(a) for a in aliases], "partition": partition, **facts}


def write_work_root(root, keys: dict[str, str], old_keys: dict[str, str]) -> dict:
    """Catalog partitions 0 (A, B) and 1 (C); probe and aesthetics of partition 0 under the current
    keys; transcribe of partition 0 only under the old config's key. Returns what was written."""
    audio = root / "audio"
    rows = {
        A: catalog_row(A, audio / "song-a.flac", 0, aliases=[audio / "copy-of-a.flac"], bytes=1000,
                       duration=12.5, sample_rate=44100, channels=2, codec="flac"),
        B: catalog_row(B, audio / "song-b.wav", 0, bytes=2000, duration=30.25, sample_rate=8000,
                       channels=1, codec="wav"),
        C: catalog_row(C, audio / "song-c.flac", 1, bytes=3000, duration=7.75, sample_rate=48000,
                       channels=2, codec="flac"),
    }
    probe = {A: {"track_id": A, "status": "ok", "reason": None, "duration": 12.5, "sample_rate": 44100,
                 "channels": 2, "peak_dbfs": -1.5, "rms_dbfs": -18.25},
             B: {"track_id": B, "status": "rejected", "reason": "silent: peak -90.0 dBFS", "duration": 30.25,
                 "sample_rate": 8000, "channels": 1, "peak_dbfs": -90.0, "rms_dbfs": -96.5}}
    aesthetics = {A: {"track_id": A, "status": "ok", "reason": None, "ce": 6.5, "cu": 7.25, "pc": 3.75,
                      "pq": 5.5, "windows": 2}}
    transcribe_old = {A: {"track_id": A, "status": "ok", "reason": None, "language": "fr", "language_prob": 0.75,
                          "text": "la la la under the old key", "segments": [], "words": [],
                          "instrumental": False, "instrumental_reason": None, "no_speech_prob": 0.125,
                          "windows": 1}}
    store = StageStore(root / "work")
    for p in (0, 1):
        part = [r for r in rows.values() if r["partition"] == p]
        store.write_table(store.catalog_path(p), pa.Table.from_pylist(part, schema=CATALOG_SCHEMA))
    for name, key, schema, table in (("probe", keys["probe"], PROBE_SCHEMA, probe),
                                     ("aesthetics", keys["aesthetics"], AESTHETICS_SCHEMA, aesthetics),
                                     ("transcribe", old_keys["transcribe"], TRANSCRIBE_SCHEMA, transcribe_old)):
        store.write_table(store.stage_path(name, key, 0),
                          pa.Table.from_pylist(list(table.values()), schema=schema))
    return {"catalog": rows, "probe": probe, "aesthetics": aesthetics, "transcribe_old": transcribe_old}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    keys, old_keys = keys_of(root / "work"), keys_of(root / "work", OLD)
    return {"root": root, "work": root / "work", "keys": keys, "old_keys": old_keys,
            **write_work_root(root, keys, old_keys)}


def inspect(capsys, track, work, *extra: str) -> tuple[int, dict, str]:
    rc = main(["inspect", str(track), "--config", "tiny", "--work", str(work), *extra])
    out = capsys.readouterr().out
    return rc, json.loads(out), out


def shown_catalog(row: dict) -> dict:
    """A catalog row as inspect prints it: the raw path bytes as text."""
    return {**row, "uri_raw": os.fsdecode(row["uri_raw"])}


def test_inspect_by_path_prints_exactly_the_rows_written_for_that_track(work, capsys):
    rc, report, _ = inspect(capsys, work["root"] / "audio" / "song-a.flac", work["work"])
    keys = work["keys"]
    assert rc == 0 and report["found"] and report["track_id"] == A
    assert report["catalog"] == shown_catalog(work["catalog"][A])
    assert report["stages"]["probe"] == {"key": keys["probe"], **work["probe"][A]}
    assert report["stages"]["aesthetics"] == {"key": keys["aesthetics"], **work["aesthetics"][A]}
    for name in ("rhythm", "caption"):   # nothing written for them
        assert report["stages"][name] == {"key": keys[name], "status": "not run"}
    assert list(report["stages"]) == ["probe", "aesthetics", "transcribe", "lyrics", "rhythm", "caption"]


def test_inspect_by_track_id_relative_path_or_duplicate_path_is_the_same_report(work, capsys, monkeypatch):
    _, by_path, _ = inspect(capsys, work["root"] / "audio" / "song-a.flac", work["work"])
    _, by_id, _ = inspect(capsys, A, work["work"])
    _, by_alias, _ = inspect(capsys, work["root"] / "audio" / "copy-of-a.flac", work["work"])
    monkeypatch.chdir(work["root"])      # the README's form: a path relative to where you are
    _, by_relative, _ = inspect(capsys, "audio/song-a.flac", work["work"])
    assert by_id == by_path == by_alias == by_relative


def test_another_tracks_values_do_not_leak_into_a_report(work, capsys):
    rc, report, out = inspect(capsys, B, work["work"])
    keys = work["keys"]
    assert rc == 0 and report["track_id"] == B
    assert report["catalog"] == shown_catalog(work["catalog"][B])
    assert report["stages"]["probe"] == {"key": keys["probe"], **work["probe"][B]}
    # the aesthetics file of B's partition holds only A: B was rejected before it
    assert report["stages"]["aesthetics"] == {"key": keys["aesthetics"],
                                              "status": "not processed (rejected upstream)"}
    assert A not in out and "song-a" not in out and "7.25" not in out
    # C's partition has a catalog and no stage output at all
    rc, report, _ = inspect(capsys, C, work["work"])
    assert rc == 0 and report["catalog"] == shown_catalog(work["catalog"][C])
    assert all(s == {"key": keys[n], "status": "not run"} for n, s in report["stages"].items())


def test_an_output_under_another_configs_key_is_not_shown_as_current(work, capsys):
    keys, old = work["keys"], work["old_keys"]
    assert keys["transcribe"] != old["transcribe"] and keys["lyrics"] != old["lyrics"]
    _, report, out = inspect(capsys, A, work["work"])
    assert report["stages"]["transcribe"] == {"key": keys["transcribe"], "status": "not run"}
    assert "under the old key" not in out
    # inspected with the config that wrote it, the same output is the current one
    _, report, _ = inspect(capsys, A, work["work"], *[f"--set={o}" for o in OLD])
    assert report["stages"]["transcribe"] == {"key": old["transcribe"], **work["transcribe_old"][A]}
    assert report["stages"]["lyrics"]["key"] == old["lyrics"]     # keys follow their upstream's
    assert report["stages"]["probe"] == {"key": keys["probe"], **work["probe"][A]}


def test_an_unknown_track_is_an_error_naming_it(work, capsys, tmp_path):
    rc, report, _ = inspect(capsys, "no-such-track", work["work"])
    assert rc == 1 and report["found"] is False
    assert report["error"] == "'no-such-track' is neither a track_id nor an ingested path"
    rc, report, _ = inspect(capsys, A, tmp_path / "empty-work")
    assert rc == 1 and report["found"] is False
    assert str(tmp_path / "empty-work") in report["error"] and "acepipe run" in report["error"]


def test_a_damaged_output_is_quarantined_and_reported(work, capsys, tmp_path):
    write_work_root(tmp_path, work["keys"], work["old_keys"])
    store = StageStore(tmp_path / "work")
    damaged = store.stage_path("probe", work["keys"]["probe"], 0)
    store.write_bytes(damaged, b"not parquet at all")
    rc, report, _ = inspect(capsys, A, tmp_path / "work")
    assert rc == 0
    assert report["stages"]["probe"]["status"].startswith("output did not read and was moved to quarantine/")
    assert not os.path.exists(damaged)
    moved = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "work" / "quarantine") for f in fs]
    assert len(moved) == 1 and open(moved[0], "rb").read() == b"not parquet at all"
    # the aesthetics output beside it is untouched
    assert report["stages"]["aesthetics"] == {"key": work["keys"]["aesthetics"], **work["aesthetics"][A]}
