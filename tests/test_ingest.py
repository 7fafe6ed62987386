"""Ingest: discovery, content-hash dedup, probing, append-only partitions, the rehash memo."""
import os
from pathlib import Path

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


# -- sources deleted, replaced, restored after ingest --------------------------------------------
@pytest.fixture
def corpus(synth_corpus, tmp_path):
    """The synthetic corpus's audio in this test's own folder, to delete and replace files in."""
    import shutil

    return Path(shutil.copytree(synth_corpus / "audio", tmp_path / "corpus"))


def catalog_files(store):
    """name -> (bytes, mtime_ns) of every file under catalog/: what a rerun must leave alone."""
    root = Path(store.path("catalog"))
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


def by_id(store):
    return {r["track_id"]: r for r in store.read_catalog().to_pylist()}


def plain_ok_tracks(catalog, *suffixes):
    return [r for r in catalog.values() if r["status"] == "ok" and not r["aliases"]
            and r["uri"].isascii() and r["uri"].endswith(suffixes)]


def test_a_deleted_and_a_replaced_source_are_marked_then_a_restored_one_is_ok(corpus, make_cfg,
                                                                             monkeypatch):
    from tasks.summary import summarize_catalog

    cfg = make_cfg("ingest.partition_size=4")
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    before = by_id(store)
    files_before = catalog_files(store)
    gone, replaced = plain_ok_tracks(before, ".wav", ".flac")[:2]
    gone_bytes = Path(gone["uri"]).read_bytes()
    Path(gone["uri"]).unlink()
    write_tone(replaced["uri"], seconds=2.0, freq=777)   # other audio under the same name

    hashed = []
    real_hash = ingest_mod.content_hash
    monkeypatch.setattr(ingest_mod, "content_hash", lambda p, c=4: hashed.append(p) or real_hash(p, c))
    result = ingest(cfg, store, [str(corpus)])
    assert hashed == [os.fsencode(replaced["uri"])]   # unchanged files are known by size and mtime
    after = by_id(store)
    new = [r for tid, r in after.items() if tid not in before]
    assert result.new_tracks == 1 and len(new) == 1
    assert new[0]["uri"] == replaced["uri"] and new[0]["status"] == "ok"
    assert result.marked == {"source_missing": 1, "source_changed": 1} and result.rejected == {}
    assert after[gone["track_id"]]["status"] == "rejected"
    assert after[gone["track_id"]]["reason"] == f"source_missing: {gone['uri']} no longer exists"
    assert after[replaced["track_id"]]["status"] == "rejected"
    assert after[replaced["track_id"]]["reason"] == (
        f"source_changed: {replaced['uri']} now holds other audio (new track {new[0]['track_id']})")
    for tid, row in before.items():
        if tid not in (gone["track_id"], replaced["track_id"]):
            assert after[tid] == row
    touched = {f"part-{r['partition']:05d}.parquet" for r in (gone, replaced)}
    files_after = catalog_files(store)
    assert {n for n in files_before if files_after[n] != files_before[n]} == touched | {"seen.parquet"}

    # The summary reads the catalog first: both count as rejected at ingest, with their codes.
    summary = summarize_catalog(store, [], {}, store.catalog_partitions())
    assert summary.by_reason["ingest/source_missing"] == 1
    assert summary.by_reason["ingest/source_changed"] == 1

    # Marked once: a rerun with nothing new changes and rewrites nothing.
    files_marked = catalog_files(store)
    assert ingest(cfg, store, [str(corpus)]).marked == {} and catalog_files(store) == files_marked

    Path(gone["uri"]).write_bytes(gone_bytes)
    back = ingest(cfg, store, [str(corpus)])
    again = by_id(store)
    assert back.restored == 1 and back.marked == {} and back.new_tracks == 0
    assert again[gone["track_id"]] == before[gone["track_id"]]
    assert again[replaced["track_id"]] == after[replaced["track_id"]]


def test_a_duplicate_stays_ok_while_one_alias_holds_its_bytes(corpus, make_cfg):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    dup = next(r for r in by_id(store).values() if r["aliases"])
    first, alias = dup["uri"], dup["aliases"][0]

    Path(first).unlink()
    result = ingest(cfg, store, [str(corpus)])
    row = by_id(store)[dup["track_id"]]
    assert result.marked == {} and row["status"] == "ok"
    # the stages and pack open `uri_raw`: it now names the file that still holds the bytes
    assert row["uri"] == alias and row["uri_raw"] == os.fsencode(alias) and row["aliases"] == [first]

    alias_bytes = Path(alias).read_bytes()
    Path(alias).unlink()
    ingest(cfg, store, [str(corpus)])
    row = by_id(store)[dup["track_id"]]
    assert row["status"] == "rejected"
    assert row["reason"] == f"source_missing: {alias} no longer exists (nor does its alias)"

    # Bytes found are proof even in a run over a subset: a list naming only the copy put
    # back at the first name makes the track ok again, opened from there.
    Path(first).write_bytes(alias_bytes)
    listed = corpus.parent / "list.txt"
    listed.write_text(first + "\n")
    assert ingest(cfg, store, [str(listed)]).restored == 1
    row = by_id(store)[dup["track_id"]]
    assert row["status"] == "ok" and row["reason"] is None
    assert row["uri"] == first and row["aliases"] == [alias]


def test_a_run_over_a_subset_of_the_sources_marks_nothing_missing(corpus, make_cfg):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    before = by_id(store)
    gone = plain_ok_tracks(before, ".wav", ".flac")[0]
    Path(gone["uri"]).unlink()

    subset = ingest(cfg, store, [str(corpus / "bad")])   # the deleted file lies outside it
    assert subset.marked == {} and by_id(store) == before
    listed = corpus.parent / "list.txt"
    listed.write_text(str(corpus / "bad" / "silent.wav") + "\n")
    assert ingest(cfg, store, [str(listed)]).marked == {} and by_id(store) == before

    whole = ingest(cfg, store, [str(corpus)])
    assert whole.marked == {"source_missing": 1}
    assert by_id(store)[gone["track_id"]]["status"] == "rejected"


def test_a_rerun_with_no_change_rewrites_no_catalog_file(corpus, make_cfg):
    cfg = make_cfg("ingest.partition_size=4")
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    files = catalog_files(store)
    result = ingest(cfg, store, [str(corpus)])
    assert result.new_tracks == 0 and result.marked == {} and result.restored == 0
    assert catalog_files(store) == files


def test_pack_leaves_out_the_tracks_ingest_marked(synth_corpus, tiny_models_dir, tmp_path):
    """Once curate has marked them, pack finds the old tracks not ok in the catalog and leaves
    them out (not a pack reject); the replacing audio is a candidate like any other."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from pack_fixtures import build_work, write_stages

    from tasks.pack import candidates

    cfg = build_work(tmp_path, synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    kept, _, upstream = candidates(store, cfg)
    gone, replaced = [t for _, t in kept if not t["aliases"] and t["uri"].endswith((".wav", ".flac"))][:2]
    Path(gone["uri"]).unlink()
    write_tone(replaced["uri"], seconds=2.0, freq=777)

    result = ingest(cfg, store, [str(tmp_path / "audio")])
    write_stages(cfg, store, result.new_partitions)   # what curate computes for the new track
    now, rejects, upstream_now = candidates(store, cfg)
    ids = {r["track_id"] for r, _ in now}
    assert gone["track_id"] not in ids and replaced["track_id"] not in ids and rejects == []
    assert upstream_now["not_ok_upstream"] == upstream["not_ok_upstream"] + 2
    assert any(t["uri"] == replaced["uri"] for _, t in now) and len(now) == len(kept) - 1
