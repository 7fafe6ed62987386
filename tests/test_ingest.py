"""Ingest: discovery, content-hash dedup, probing, append-only partitions, the rehash memo."""
import hashlib
import os
import time
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
    with pytest.raises(SourceError, match=r"^no sources configured: pass --source DIR or set `sources`"):
        check_sources([])


def test_file_urls_and_single_files_are_sources(source, make_cfg):
    song = source / "song1.wav"
    check_sources([f"file://{source}", f"file://{song}"])   # exist: no error
    with pytest.raises(SourceError, match="gone.wav"):
        check_sources([str(source), f"file://{source}/gone.wav"])
    cfg = make_cfg()
    result = ingest(cfg, StageStore(cfg.work_root), [f"file://{song}", str(source / "song2.wav")])
    assert result.found == result.new_tracks == 2
    uris = [r["uri"] for r in StageStore(cfg.work_root).read_catalog().to_pylist()]
    assert uris == [str(song), str(source / "song2.wav")]   # plain paths, in the order given
    with pytest.raises(SourceError, match=r"'.*gone.wav' does not exist \(a directory, URL or .txt list\)"):
        ingest(cfg, StageStore(cfg.work_root), [str(song), str(source / "gone.wav")])

    configured = make_cfg(sources=[str(source / "song3.wav")], work=source.parent / "w2")
    assert ingest(configured, StageStore(configured.work_root)).found == 1   # no list given: the config's


def test_url_sources_are_listed_hashed_and_probed(make_cfg, tmp_path):
    """An fsspec URL (here the in-memory filesystem) is walked like a directory: audio
    suffixes in any case, the track id is the hash of the bytes, the header is probed."""
    import fsspec

    fs, top = fsspec.filesystem("memory"), f"/bucket-{tmp_path.name}"
    write_tone(tmp_path / "t.wav", seconds=1.25, sr=16000)
    data = (tmp_path / "t.wav").read_bytes()
    fs.pipe({f"{top}/songs/x/one.WAV": data, f"{top}/songs/notes.txt": b"not audio",
             f"{top}/songs/two.flac": b"fLaC garbage", f"{top}/songs/y/empty.wav": b""})
    with pytest.raises(SourceError, match="nowhere"):
        check_sources([f"memory://{top}/nowhere"])
    check_sources([f"memory://{top}/songs"])
    with pytest.raises(SourceError, match="nowhere"):
        ingest(make_cfg(), StageStore(make_cfg().work_root), [f"memory://{top}/nowhere"])

    cfg = make_cfg()
    # a URL source then a local file: the same bytes in both places are one track
    result = ingest(cfg, StageStore(cfg.work_root), [f"memory://{top}/songs", str(tmp_path / "t.wav")])
    assert result.found == 4 and result.duplicates == 1 and result.new_tracks == 3
    rows = {r["uri"]: r for r in StageStore(cfg.work_root).read_catalog().to_pylist()}
    one = rows[f"memory://{top}/songs/x/one.WAV"]
    assert one["track_id"] == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert (one["status"], one["bytes"], one["sample_rate"], one["channels"]) == ("ok", len(data), 16000, 1)
    assert one["duration"] == pytest.approx(1.25)
    assert one["aliases"] == [str(tmp_path / "t.wav")]
    assert rows[f"memory://{top}/songs/two.flac"]["bytes"] == 12
    assert rows[f"memory://{top}/songs/y/empty.wav"]["bytes"] == 0


def test_extensions_are_configurable_and_case_insensitive(source, make_cfg):
    (source / "LOUD.WAV").write_bytes((source / "song4.wav").read_bytes())
    cfg = make_cfg("ingest.extensions=['.Flac']")
    result = ingest(cfg, StageStore(cfg.work_root), [str(source)])
    assert result.found == 1 and result.rejected == {"unreadable": 1}   # broken.flac only
    cfg = make_cfg("ingest.extensions=['.wav']", work=source.parent / "w2")
    result = ingest(cfg, StageStore(cfg.work_root), [str(source)])
    assert result.found == 8 and result.duplicates == 2     # LOUD.WAV and the copy are song4/song0


def test_a_list_names_paths_relative_to_itself_and_absolute_ones(source, tmp_path, make_cfg):
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "list.txt"
    listing.write_text(f"  ../src/song1.wav  \n../src/gone.wav\n\n../src/lost.wav\n{source / 'song2.wav'}\n")
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    result = ingest(cfg, store, [str(listing)])
    assert result.found == 4 and result.new_tracks == 4 and result.rejected == {"unreadable": 2}
    rows = store.read_catalog().to_pylist()
    assert [r["uri"] for r in rows] == [str(source / n) for n in ("song1.wav", "gone.wav", "lost.wav", "song2.wav")]
    assert rows[0]["bytes"] == (source / "song1.wav").stat().st_size
    for gone in rows[1:3]:     # no bytes to hash: each keyed by its path, one row each
        assert gone["reason"] == "unreadable: cannot read the file (No such file or directory)"
        assert gone["track_id"] == hashlib.blake2b(gone["uri_raw"], digest_size=16).hexdigest()
        assert gone["bytes"] == -1 and gone["aliases"] == []


def test_catalog_rows_hold_the_probed_header_and_the_partition(source, make_cfg):
    sf.write(source / "sub" / "stereo.wav", np.zeros((8000, 2)) + 0.1, 8000)
    (source / "sub" / "zero.wav").write_bytes(b"")
    cfg = make_cfg("ingest.partition_size=5")
    store = StageStore(cfg.work_root)
    result = ingest(cfg, store, [str(source)])
    assert result.partitions == result.new_partitions == [0, 1]
    assert result.rejected == {"unreadable": 1, "empty": 1}
    rows = store.read_catalog().to_pylist()
    assert [r["partition"] for r in rows] == [0] * 5 + [1] * 4   # in the order of discovery
    names = [Path(os.fsdecode(r["uri_raw"])).name for r in rows]
    assert names[:4] == ["broken.flac", os.fsdecode(b"na\xefve-\xff.wav"), "song0.wav", "song1.wav"]
    song = next(r for r in rows if r["uri"].endswith("song1.wav"))
    data = (source / "song1.wav").read_bytes()
    assert song["track_id"] == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert (song["bytes"], song["sample_rate"], song["channels"], song["codec"]) == (
        len(data), 22050, 1, "wav/pcm_16")
    assert song["duration"] == pytest.approx(1.5) and song["reason"] is None
    stereo = next(r for r in rows if r["uri"].endswith("stereo.wav"))
    assert (stereo["channels"], stereo["sample_rate"], stereo["duration"]) == (2, 8000, 1.0)
    zero = next(r for r in rows if r["uri"].endswith("zero.wav"))
    assert zero["status"] == "rejected" and zero["reason"] == "empty: the file has zero bytes"
    assert zero["duration"] is None and zero["bytes"] == 0

    write_tone(source / "sub" / "later.wav", freq=321)
    again = ingest(cfg, store, [str(source)])
    assert again.partitions == [0, 1, 2] and again.new_partitions == [2]
    assert again.known == again.found - 1 and again.duplicates == 0


def test_content_hash_is_blake2b_128_of_the_bytes_whatever_the_chunk(tmp_path):
    blob = np.random.default_rng(0).bytes(3 * 2**20 + 17)
    (tmp_path / "big.wav").write_bytes(blob)
    expected = hashlib.blake2b(blob, digest_size=16).hexdigest()
    assert ingest_mod.content_hash(os.fsencode(tmp_path / "big.wav"), 1) == expected
    assert ingest_mod.content_hash(os.fsencode(tmp_path / "big.wav")) == expected


def test_a_touched_file_is_hashed_again_and_stays_one_track(source, make_cfg, monkeypatch):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(source)])
    seen = {r["uri"]: r for r in store.read_table(store.path("catalog", "seen.parquet")).to_pylist()}
    song = source / "song2.wav"
    assert seen[str(song)]["mtime_ns"] == song.stat().st_mtime_ns
    assert seen[str(song)]["bytes"] == song.stat().st_size
    os.utime(song, ns=(song.stat().st_atime_ns, song.stat().st_mtime_ns + 10**9))

    hashed = []
    real_hash = ingest_mod.content_hash
    monkeypatch.setattr(ingest_mod, "content_hash", lambda p, c=4: hashed.append(p) or real_hash(p, c))
    result = ingest(cfg, store, [str(source)])
    assert hashed == [os.fsencode(song)] and result.new_tracks == 0 and result.known == 8
    memo = store.read_table(store.path("catalog", "seen.parquet")).to_pylist()
    assert len(memo) == len(seen) + 1       # the old (size, mtime) key is kept beside the new one
    assert {r["mtime_ns"] for r in memo if r["uri"] == str(song)} == {
        seen[str(song)]["mtime_ns"], song.stat().st_mtime_ns}


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


def test_an_ingest_waits_while_another_run_holds_the_lock(source, make_cfg):
    import threading

    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    held, hold_s = threading.Event(), 1.0

    def other_run():
        with store.lock("ingest"):
            held.set()
            time.sleep(hold_s)

    other = threading.Thread(target=other_run)
    other.start()
    held.wait(10)
    called = time.perf_counter()
    result = ingest(cfg, store, [str(source / "song1.wav")])
    wall = time.perf_counter() - called
    other.join()
    assert result.new_tracks == 1
    assert hold_s * 0.9 <= result.seconds <= wall + 0.001     # its wall time, the wait included


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
def corpus(tmp_path):
    """A small corpus in this test's own folder, to delete and replace files in: songs in two
    formats, a nested folder holding a byte-identical copy, and bad files under bad/. Written
    per test in milliseconds (the session's synthetic corpus takes seconds, and mutation
    testing starts a fresh session per mutant)."""
    root = tmp_path / "corpus"
    (root / "pop").mkdir(parents=True)
    (root / "bad").mkdir()
    for i, name in enumerate(["a.wav", "b.flac", "c.wav", "pop/d.flac", "pop/e.wav"]):
        write_tone(root / name, freq=300 + 40 * i)
    (root / "pop" / "e-duplicate.wav").write_bytes((root / "pop" / "e.wav").read_bytes())
    sf.write(root / "bad" / "silent.wav", np.zeros(22050), 22050)
    (root / "bad" / "empty.wav").write_bytes(b"")
    return root


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


def test_a_run_over_a_subset_of_the_sources_marks_nothing_missing(corpus, make_cfg, monkeypatch):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    before = by_id(store)
    gone = plain_ok_tracks(before, ".wav", ".flac")[:2]
    gone_bytes = {r["uri"]: Path(r["uri"]).read_bytes() for r in gone}
    for r in gone:
        Path(r["uri"]).unlink()

    def unchanged():
        return {t: r for t, r in by_id(store).items() if t in before} == before

    write_tone(corpus / "bad" / "new.wav", freq=1717)        # new in the subset: the memo is rewritten
    subset = ingest(cfg, store, [str(corpus / "bad")])   # the deleted files lie outside it
    assert subset.marked == {} and subset.new_tracks == 1 and unchanged()
    listed = corpus.parent / "list.txt"
    listed.write_text(str(corpus / "bad" / "silent.wav") + "\n")
    assert ingest(cfg, store, [str(listed)]).marked == {} and unchanged()

    hashed = []
    real_hash = ingest_mod.content_hash
    monkeypatch.setattr(ingest_mod, "content_hash", lambda p, c=4: hashed.append(p) or real_hash(p, c))
    whole = ingest(cfg, store, [str(corpus)])
    assert hashed == []            # the subset runs kept the memo of the files they did not list
    assert whole.marked == {"source_missing": 2}
    assert all(by_id(store)[r["track_id"]]["status"] == "rejected" for r in gone)
    assert store.read_catalog().num_rows == len(by_id(store))     # one row per track, still

    for uri, data in gone_bytes.items():
        Path(uri).write_bytes(data)
    back = ingest(cfg, store, [str(corpus)])
    assert back.restored == 2 and back.marked == {} and unchanged()


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


def test_source_scope_judges_only_uris_under_this_runs_sources(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("other/listed.wav\n")
    (tmp_path / "one.wav").write_bytes(b"RIFF")           # a single-file source: not a list
    in_scope = ingest_mod.source_scope([f"{tmp_path}/corpus/", f"file://{tmp_path}/one.wav", str(listing),
                                        "memory:///scope-bucket/songs"])
    assert in_scope(f"{tmp_path}/corpus/x/y.wav") and in_scope(f"{tmp_path}/corpus")
    assert not in_scope(f"{tmp_path}/corpus2/y.wav")           # a sibling that shares the prefix
    assert in_scope(f"{tmp_path}/one.wav") and not in_scope(f"{tmp_path}/two.wav")
    assert in_scope(f"{tmp_path}/other/listed.wav") and not in_scope(f"{tmp_path}/other/unlisted.wav")
    assert not in_scope(str(listing))
    assert in_scope("memory:///scope-bucket/songs/a.wav") and not in_scope("memory:///scope-bucket/songs2/a.wav")


def test_a_moved_file_keeps_its_track_under_the_new_name(corpus, make_cfg):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    old = next(r for r in by_id(store).values() if r["uri"] == str(corpus / "a.wav"))
    (corpus / "moved").mkdir()
    (corpus / "a.wav").rename(corpus / "moved" / "a2.wav")
    result = ingest(cfg, store, [str(corpus)])
    assert (result.new_tracks, result.marked, result.restored) == (0, {}, 0)
    assert result.known == result.found == 8
    row = by_id(store)[old["track_id"]]
    assert (row["status"], row["uri"], row["aliases"]) == ("ok", str(corpus / "moved" / "a2.wav"), [old["uri"]])
    assert row["uri_raw"] == os.fsencode(corpus / "moved" / "a2.wav")

    # Missing for a night, then back under yet another name: ok again, opened from there.
    (corpus / "moved" / "a2.wav").rename(tmp := corpus.parent / "away.wav")
    assert ingest(cfg, store, [str(corpus)]).marked == {"source_missing": 1}
    assert by_id(store)[old["track_id"]]["reason"] == (
        f"source_missing: {corpus / 'moved' / 'a2.wav'} no longer exists (nor does its alias)")
    tmp.rename(corpus / "pop" / "a3.wav")
    back = ingest(cfg, store, [str(corpus)])
    row = by_id(store)[old["track_id"]]
    assert back.restored == 1 and back.marked == {} and row["status"] == "ok" and row["reason"] is None
    assert row["uri"] == str(corpus / "pop" / "a3.wav")
    assert sorted(row["aliases"]) == sorted([old["uri"], str(corpus / "moved" / "a2.wav")])


def test_deleted_copies_are_counted_in_the_reason(corpus, make_cfg):
    for n in (2, 3):
        (corpus / "pop" / f"e-copy{n}.wav").write_bytes((corpus / "pop" / "e.wav").read_bytes())
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    assert ingest(cfg, store, [str(corpus)]).duplicates == 3
    dup = next(r for r in by_id(store).values() if r["aliases"])
    for uri in [dup["uri"], *dup["aliases"]]:
        Path(uri).unlink()
    assert ingest(cfg, store, [str(corpus)]).marked == {"source_missing": 1}
    assert by_id(store)[dup["track_id"]]["reason"] == (
        f"source_missing: {dup['uri']} no longer exists (nor do its 3 aliases)")


@pytest.mark.parametrize("error,cause", [(PermissionError(13, "Permission denied"), "Permission denied"),
                                         (OSError("HTTP 403 (Forbidden)"), "HTTP 403 (Forbidden)")])
def test_a_catalogued_file_that_cannot_be_read_is_marked_with_the_cause(corpus, make_cfg, monkeypatch,
                                                                        error, cause):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    song = corpus / "c.wav"
    before = by_id(store)
    tid = next(t for t, r in before.items() if r["uri"] == str(song))
    song.unlink()
    assert ingest(cfg, store, [str(corpus)]).marked == {"source_missing": 1}
    song.write_bytes(b"")         # back, zero bytes (the memo misses), and it cannot be read
    real_hash = ingest_mod.content_hash

    def hash_or_deny(path, chunk_mb=4):
        if path == os.fsencode(song):
            raise error
        return real_hash(path, chunk_mb)

    monkeypatch.setattr(ingest_mod, "content_hash", hash_or_deny)
    result = ingest(cfg, store, [str(corpus)])
    assert (result.new_tracks, result.known, result.rejected) == (0, result.found, {})
    assert result.marked == {}      # missing already: the new cause is written, not counted again
    assert by_id(store)[tid]["reason"] == f"source_missing: {song} cannot be read ({cause})"
    assert {t: r for t, r in by_id(store).items() if t != tid} == {t: r for t, r in before.items() if t != tid}


def test_other_audio_under_a_missing_name_turns_missing_into_changed(corpus, make_cfg):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    song = corpus / "b.flac"
    tid = next(t for t, r in by_id(store).items() if r["uri"] == str(song))
    song.unlink()
    assert ingest(cfg, store, [str(corpus)]).marked == {"source_missing": 1}
    write_tone(song, freq=1500)
    result = ingest(cfg, store, [str(corpus)])
    assert result.marked == {"source_changed": 1} and result.new_tracks == 1
    assert by_id(store)[tid]["reason"].startswith(f"source_changed: {song} now holds other audio")


def test_a_probe_reject_stands_when_its_file_goes_and_a_subset_keeps_the_primary(corpus, make_cfg):
    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(corpus)])
    before = by_id(store)
    (corpus / "bad" / "empty.wav").unlink()
    result = ingest(cfg, store, [str(corpus)])
    assert result.marked == {} and by_id(store) == before   # still `empty: ...`, not source_missing

    dup = next(r for r in before.values() if r["aliases"])
    listed = corpus.parent / "alias-only.txt"
    listed.write_text(dup["aliases"][0] + "\n")
    assert ingest(cfg, store, [str(listed)]).marked == {} and by_id(store) == before
    listed.write_text(dup["aliases"][0] + "\n" + dup["uri"] + "\n")   # both, the alias first
    assert ingest(cfg, store, [str(listed)]).marked == {} and by_id(store) == before


class ObjectStore:
    """An object store's listing as s3fs gives it: no `mtime`, a `LastModified` datetime (here the
    in-memory filesystem's creation time, set per upload)."""

    @staticmethod
    def register():
        import fsspec
        from fsspec.implementations.memory import MemoryFileSystem

        class Dated(MemoryFileSystem):
            protocol = "objstore"

            @classmethod
            def _strip_protocol(cls, path):
                return super()._strip_protocol(path.replace("objstore://", "memory://", 1))

            def ls(self, path, detail=True, **kwargs):
                entries = super().ls(path, detail=detail, **kwargs)
                for e in entries if detail else []:
                    if e["type"] == "file":
                        e["LastModified"] = self.store[e["name"]].created
                        del e["created"]
                return entries

        fsspec.register_implementation("objstore", Dated, clobber=True)
        return Dated()


def test_url_listings_date_files_by_mtime_or_last_modified(source, tmp_path, make_cfg, monkeypatch):
    """The memo keys a URL's file by its listed modification time: `mtime` (a local or mounted
    filesystem) or `LastModified` (object stores); a re-upload with the same size is hashed again."""
    from datetime import datetime, timezone

    cfg = make_cfg()
    store = StageStore(cfg.work_root)
    assert ingest(cfg, store, [f"local://{source}"]).new_tracks == 7
    odd = next(r for r in store.read_catalog().to_pylist() if b"\xff" in r["uri_raw"])
    assert odd["status"] == "rejected" and odd["reason"].startswith("unreadable")   # not a crash
    memo = {r["uri"]: r for r in store.read_table(store.path("catalog", "seen.parquet")).to_pylist()}
    song = source / "song3.wav"
    assert abs(memo[f"file://{song}"]["mtime_ns"] - song.stat().st_mtime_ns) < 10**4

    fs, top = ObjectStore.register(), f"/bucket-{tmp_path.name}"
    data = (source / "song1.wav").read_bytes()
    fs.pipe(f"{top}/a.wav", data)
    fs.store[f"{top}/a.wav"].created = datetime(2024, 1, 1, tzinfo=timezone.utc)
    cfg = make_cfg(work=tmp_path / "objstore")
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [f"objstore://{top}"])
    (memo,) = store.read_table(store.path("catalog", "seen.parquet")).to_pylist()
    assert memo["mtime_ns"] == 1704067200 * 10**9 and memo["bytes"] == len(data)

    hashed = []
    real_hash = ingest_mod.content_hash
    monkeypatch.setattr(ingest_mod, "content_hash", lambda p, c=4: hashed.append(p) or real_hash(p, c))
    assert ingest(cfg, store, [f"objstore://{top}"]).known == 1 and hashed == []
    fs.pipe(f"{top}/a.wav", data)                 # uploaded again: same bytes, a new date
    result = ingest(cfg, store, [f"objstore://{top}"])
    assert hashed == [f"objstore://{top}/a.wav".encode()] and result.known == 1 and result.new_tracks == 0


def test_probing_uses_the_configured_ffmpeg(source, make_cfg):
    """A file soundfile cannot read is handed to the ffprobe beside the configured ffmpeg; when
    that is missing, the reject says which binary to install."""
    cfg = make_cfg("audio.ffmpeg=/opt/no-such-dir/ffmpeg")
    store = StageStore(cfg.work_root)
    ingest(cfg, store, [str(source / "broken.flac")])
    (row,) = store.read_catalog().to_pylist()
    assert row["reason"] == "unreadable: soundfile cannot read it and /opt/no-such-dir/ffprobe is not installed"
