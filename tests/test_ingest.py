"""Ingest: discovery, content-hash dedup, probing, append-only partitions, the rehash memo."""
import os

import numpy as np
import pytest
import soundfile as sf

from tasks import ingest as ingest_mod
from tasks.ingest import SourceError, check_sources, ingest
from tasks.store import StageStore


def write_tone(path, seconds=1.5, freq=440.0, sr=22050):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), sr)


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        write_tone(src / f"song{i}.wav", freq=200 + 50 * i)
    (src / "sub" / "song0-copy.wav").write_bytes((src / "song0.wav").read_bytes())
    (src / "readme.txt").write_text("not discovered: wrong extension")
    (src / "broken.flac").write_bytes(b"fLaC garbage")
    write_tone(os.fsencode(src) + b"/na\xefve-\xff.wav", freq=999)
    return src


def test_dedup_rejects_and_partitions(source, make_cfg):
    cfg = make_cfg("ingest.partition_size=3")
    store = StageStore(cfg.work_root)
    result = ingest(cfg, store, [str(source)])
    assert result.found == 8 and result.duplicates == 1 and result.new_tracks == 7
    catalog = store.read_catalog().to_pylist()
    assert len(catalog) == 7 and result.new_partitions == [0, 1, 2]
    dup = next(r for r in catalog if r["aliases"])
    assert dup["aliases"][0].endswith("song0-copy.wav") or dup["uri"].endswith("song0-copy.wav")
    broken = next(r for r in catalog if r["uri"].endswith("broken.flac"))
    assert broken["status"] == "rejected" and broken["reason"].startswith("unreadable")
    odd = next(r for r in catalog if b"\xff" in r["uri_raw"])
    assert odd["status"] == "ok" and "\\xff" in odd["uri"]
    assert all(len(r["track_id"]) == 32 and "." not in r["track_id"] for r in catalog)


def test_rerun_is_append_only_and_hashes_only_new_files(source, make_cfg, monkeypatch):
    cfg = make_cfg("ingest.partition_size=3")
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(source)])
    before = {p: store.read_bytes(store.catalog_path(p)) for p in store.catalog_partitions()}

    hashed = []
    real_hash = ingest_mod.content_hash
    monkeypatch.setattr(ingest_mod, "content_hash", lambda p, c=4: hashed.append(p) or real_hash(p, c))
    write_tone(source / "new.wav", freq=1234)
    result = ingest(cfg, store, [str(source)])
    assert result.new_tracks == 1 and result.new_partitions == [3]
    assert len(hashed) == 1 and hashed[0].endswith(b"new.wav")
    for p, data in before.items():  # old partitions untouched, so their stage outputs stay valid
        assert store.read_bytes(store.catalog_path(p)) == data

    hashed.clear()
    nothing = ingest(cfg, store, [str(source)])
    assert nothing.new_tracks == 0 and nothing.new_partitions == [] and hashed == []


def test_file_list_source(source, tmp_path, make_cfg):
    listing = tmp_path / "list.txt"
    listing.write_text("src/song1.wav\nsrc/song2.wav\n")
    cfg = make_cfg()
    result = ingest(cfg, StageStore(cfg.work_root), [str(listing)])
    assert result.new_tracks == 2


def test_missing_source_fails_at_once(tmp_path):
    with pytest.raises(SourceError, match="does-not-exist"):
        check_sources([str(tmp_path / "does-not-exist")])
    with pytest.raises(SourceError, match="no sources"):
        check_sources([])


def test_overlapping_runs_do_not_duplicate_tracks(source, make_cfg):
    from concurrent.futures import ThreadPoolExecutor

    cfg = make_cfg("ingest.partition_size=2")
    store = StageStore(cfg.work_root)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ingest(cfg, store, [str(source)]), range(2)))
    assert sorted(r.new_tracks for r in results) == [0, 7]
    ids = store.read_catalog().column("track_id").to_pylist()
    assert len(ids) == len(set(ids)) == 7


def test_stale_lock_of_a_dead_process_is_broken(source, make_cfg):
    import json
    import socket

    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    os.makedirs(store.root, exist_ok=True)
    with open(os.path.join(store.root, ".lock-ingest"), "w") as fh:
        json.dump({"pid": 2**22 + 12345, "host": socket.gethostname()}, fh)
    assert ingest(cfg, store, [str(source)]).new_tracks == 7


def test_a_file_that_cannot_be_read_is_one_reject_across_reruns(source, make_cfg, monkeypatch):
    real_hash = ingest_mod.content_hash

    def hash_or_deny(path, chunk_mb=4):
        if path.endswith(b"song3.wav"):
            raise PermissionError(13, "Permission denied")
        return real_hash(path, chunk_mb)

    monkeypatch.setattr(ingest_mod, "content_hash", hash_or_deny)
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    first = ingest(cfg, store, [str(source)])
    again = ingest(cfg, store, [str(source)])
    assert first.rejected == {"unreadable": 2} and first.seconds > 0
    assert again.new_tracks == 0 and again.known == again.found
    denied = [r for r in store.read_catalog().to_pylist() if r["uri"].endswith("song3.wav")]
    assert len(denied) == 1 and denied[0]["reason"].startswith("unreadable: cannot read the file")
