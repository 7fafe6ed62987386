"""The pack stage on a real work root (ingest + probe on the synthetic corpus, the other stages'
outputs written into the store): shards read back through webdataset, the manifest, filters,
bad input at pack time, reruns, determinism, a killed pack, the flow and the CLI."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, fixture_overrides, stage_row, tiny_config  # noqa: E402

from schemas.common import reason_code  # noqa: E402
from schemas.pack import MANIFEST_SCHEMA  # noqa: E402
from tasks import audio  # noqa: E402
from tasks.pack import candidates, pack  # noqa: E402
from tasks.store import StageStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def with_overrides(cfg, *overrides: str, work: Path | None = None):
    return tiny_config(Path(work or cfg.work_root), Path(cfg.models.tiny_dir), Path(cfg.lyrics_db), *overrides)


def visible_shards(store: StageStore, dataset: str) -> list[str]:
    d = Path(store.path("shards", dataset))
    return sorted(p.name for p in d.glob("shard-*.tar"))


def index_of(store: StageStore, dataset: str) -> list[dict]:
    return pq.read_table(store.path("shards", dataset, "index.parquet")).to_pylist()


def manifest_of(store: StageStore, dataset: str) -> list[dict]:
    return pq.read_table(store.path("manifest", f"{dataset}.parquet")).to_pylist()


def rejects_of(store: StageStore, dataset: str) -> dict[str, str]:
    rows = pq.read_table(store.path("shards", dataset, "rejects.parquet")).to_pylist()
    return {r["track_id"]: r["reason"] for r in rows}


def read_samples(store: StageStore, dataset: str) -> list[dict]:
    import webdataset as wds

    shards = sorted({r["shard"] for r in index_of(store, dataset)})
    urls = [store.path("shards", dataset, s) for s in shards]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def assert_consistent(store: StageStore, dataset: str) -> list[dict]:
    """Index, manifest and the shards on disk describe the same samples."""
    index = index_of(store, dataset)
    manifest = manifest_of(store, dataset)
    assert visible_shards(store, dataset) == sorted({r["shard"] for r in index})
    assert [r["track_id"] for r in index] == [r["track_id"] for r in manifest]
    assert [r["shard"] for r in index] == [r["shard"] for r in manifest]
    samples = read_samples(store, dataset)
    assert [s["__key__"] for s in samples] == [r["track_id"] for r in index]
    for s, r in zip(samples, index):
        assert s["__url__"].endswith(r["shard"])
        assert len(s["flac"]) + len(s["json"]) + len(s["txt"]) == r["bytes"]
    return samples


@pytest.fixture(scope="module")
def work(tmp_path_factory, synth_corpus, tiny_models_dir):
    root = tmp_path_factory.mktemp("pack")
    cfg = build_work(root, synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    summary = pack(cfg)
    return SimpleNamespace(root=root, cfg=cfg, store=store, summary=summary, manifest=manifest_of(store, "default"))


def test_shards_read_back_through_webdataset(work):
    samples = assert_consistent(work.store, "default")
    rows = work.manifest
    assert len(rows) == work.summary["packed"] >= 5
    assert [r["track_id"] for r in rows] == sorted(r["track_id"] for r in rows)
    assert work.summary["shards"] > 1 and any(n > 1 for n in
                                              np.unique([r["shard"] for r in rows], return_counts=True)[1])
    for sample, row in zip(samples, rows):
        meta = json.loads(sample["json"])
        assert meta["track_id"] == sample["__key__"] == row["track_id"]
        assert "uri" not in meta and "partition" not in meta
        for field in ("duration", "language", "lyric_id", "bpm", "key", "caption", "tags", "structure", "pq"):
            assert meta[field] == row[field], field
        assert (meta["sample_rate"], meta["channels"]) == (44100, 2)
        expected_text = row["lyrics"] or row["transcript"] or ""
        assert sample["txt"].decode() == expected_text == meta["lyrics_text"]
        audio_data, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32", always_2d=True)
        assert sr == 44100 and audio_data.shape[1] == 2
        assert abs(len(audio_data) / sr - row["duration"]) < 2e-3, row["uri"]
        assert row["flac_bytes"] == len(sample["flac"])
    # The FLAC is the source's audio: compare one track with the loader's own decode.
    row = rows[0]
    track = next(t for t in work.store.read_catalog().to_pylist() if t["track_id"] == row["track_id"])
    reference = audio.load_track(track, 44100, 2, work.cfg.audio)
    decoded, _ = sf.read(io.BytesIO(samples[0]["flac"]), dtype="float32", always_2d=True)
    n = min(decoded.shape[0], reference.shape[1])
    assert np.max(np.abs(decoded[:n].T - np.clip(reference[:, :n], -1, 1))) < 1e-4


def test_shards_respect_the_target_size(work):
    target = work.cfg.pack.shard_bytes
    index = index_of(work.store, "default")
    for shard in visible_shards(work.store, "default"):
        size = os.path.getsize(work.store.path("shards", "default", shard))
        members = [r for r in index if r["shard"] == shard]
        assert size <= target or len(members) == 1, (shard, size, len(members))
        with tarfile.open(work.store.path("shards", "default", shard)) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())


def test_manifest_is_the_join_of_kept_tracks(work):
    table = pq.read_table(work.store.path("manifest", "default.parquet"))
    assert table.schema.remove_metadata().equals(MANIFEST_SCHEMA)
    assert set(json.loads(table.schema.metadata[b"stage_keys"])) == set(work.cfg.stages)
    catalog = work.store.read_catalog().to_pylist()
    packed = {r["track_id"] for r in work.manifest}
    s = work.summary
    assert s["catalog_tracks"] == len(catalog)
    assert s["packed"] + s["rejected"] + s["not_ok_upstream"] + s["stage_missing"] == len(catalog)
    assert not packed & {t["track_id"] for t in catalog if t["status"] != "ok"}
    # The fixture has aesthetics reject one probe-ok track: it is upstream's, not in the pack.
    keys = json.loads(table.schema.metadata[b"stage_keys"])
    aesthetics = pq.read_table(work.store.stage_path("aesthetics", keys["aesthetics"], 0)).to_pylist()
    rejected = [r["track_id"] for r in aesthetics if r["status"] != "ok"]
    assert len(rejected) == 1 and rejected[0] not in packed
    for row in work.manifest:   # every stage's value reaches its manifest column
        up = {name: stage_row(name, row) for name in ("aesthetics", "transcribe", "lyrics", "rhythm", "caption")}
        matched = up["lyrics"]["lyric_id"] is not None
        axes = ("ce", "cu", "pc", "pq")
        assert [round(row[a], 3) for a in axes] == [up["aesthetics"][a] for a in axes]
        assert row["transcript"] == up["transcribe"]["text"]
        assert row["instrumental"] == up["transcribe"]["instrumental"]
        assert row["language"] == (up["lyrics"]["language"] if matched else up["transcribe"]["language"])
        for column, (stage, field) in {"lyric_id": ("lyrics", "lyric_id"), "lyrics": ("lyrics", "lyrics"),
                                       "title": ("lyrics", "title"), "artist": ("lyrics", "artist"),
                                       "bpm": ("rhythm", "bpm"), "key": ("rhythm", "key"),
                                       "scale": ("rhythm", "scale"), "structure": ("rhythm", "segments"),
                                       "caption": ("caption", "description"), "tags": ("caption", "tags")}.items():
            assert row[column] == up[stage][field], column
        assert (row["lyrics_score"] is None) == (not matched)
        assert row["peak_dbfs"] is not None and row["rms_dbfs"] is not None and row["source_sample_rate"] > 0
        assert row["shard"].startswith("shard-") and row["codec"]


def test_rerun_skips_and_a_thread_count_change_does_not_repack(work):
    shard_dir = Path(work.store.path("shards", "default"))
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    again = pack(with_overrides(work.cfg, "pack.workers=1"))
    assert again["skipped"] is True
    for k in ("packed", "shards", "bytes", "rejected", "fingerprint", "hours"):
        assert again[k] == work.summary[k], k
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before


def test_changing_a_pack_value_repacks(work):
    small = with_overrides(work.cfg, "pack.shard_bytes=100000")
    first = pack(small, "resize")
    assert first["skipped"] is False and first["shards"] == first["packed"]   # one sample per shard
    assert_consistent(work.store, "resize")
    mono = with_overrides(work.cfg, "pack.sample_rate=22050", "pack.channels=1")
    second = pack(mono, "resize")
    assert second["skipped"] is False and second["shards"] < first["shards"]
    samples = assert_consistent(work.store, "resize")   # shards of the first pack are gone
    for s in samples:
        info = sf.info(io.BytesIO(s["flac"]))
        assert (info.samplerate, info.channels) == (22050, 1)
        assert json.loads(s["json"])["sample_rate"] == 22050
    assert pack(mono, "resize")["skipped"] is True
    Path(work.store.path("shards", "resize", "index.parquet")).write_bytes(b"")   # a power cut's remains
    assert pack(mono, "resize")["skipped"] is False
    assert_consistent(work.store, "resize")


def _shard_bytes(store: StageStore, dataset: str) -> dict[str, bytes]:
    return {name: Path(store.path("shards", dataset, name)).read_bytes() for name in visible_shards(store, dataset)}


def test_a_truncated_or_missing_shard_is_written_again_alone(work, caplog):
    store = work.store
    pack(work.cfg, "damaged")
    clean = _shard_bytes(store, "damaged")
    index, manifest = index_of(store, "damaged"), manifest_of(store, "damaged")
    assert len(clean) >= 3 and {r["shard_bytes"] for r in index} >= {len(b) for b in clean.values()}
    shard_dir = Path(store.path("shards", "damaged"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    victim = shard_dir / "shard-000001.tar"
    victim.write_bytes(clean[victim.name][: len(clean[victim.name]) // 3])   # a cut copy, a full disk
    (shard_dir / "shard-000002.tar").unlink()

    with caplog.at_level("WARNING", logger="acepipe.pack"):
        summary = pack(work.cfg, "damaged")
    assert summary["skipped"] is False and summary["rewritten"] == ["shard-000001.tar", "shard-000002.tar"]
    assert "shard-000001.tar is damaged" in caplog.text and "shard-000002.tar is damaged (missing)" in caplog.text
    assert _shard_bytes(store, "damaged") == clean                      # the very bytes packed before
    after = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    assert {n for n in after if after[n] != mtimes.get(n)} == {"shard-000001.tar", "shard-000002.tar"}
    assert index_of(store, "damaged") == index and manifest_of(store, "damaged") == manifest
    assert_consistent(store, "damaged")
    assert not list(shard_dir.glob(".tmp-*"))
    assert pack(work.cfg, "damaged")["skipped"] is True

    # An index written before shard sizes and checksums were recorded: the pack is rebuilt.
    old = pq.read_table(shard_dir / "index.parquet")
    pq.write_table(old.drop_columns(["shard_bytes", "shard_blake2b"]), shard_dir / "index.parquet")
    rebuilt = pack(work.cfg, "damaged")
    assert rebuilt["skipped"] is False and rebuilt["rewritten"] == []
    assert index_of(store, "damaged") == index and _shard_bytes(store, "damaged") == clean


def test_a_shard_that_cannot_be_rewritten_alone_repacks_the_dataset(tmp_path, synth_corpus, tiny_models_dir,
                                                                     caplog):
    cfg = build_work(tmp_path, synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    pack(cfg)
    index = index_of(store, "default")
    victim = next(r for r in index if r["shard"] == "shard-000001.tar")
    track = next(t for t in store.read_catalog().to_pylist() if t["track_id"] == victim["track_id"])
    os.remove(os.fsdecode(track["uri_raw"]))            # its source is gone since the pack
    Path(store.path("shards", "default", "shard-000001.tar")).write_bytes(b"")

    with caplog.at_level("WARNING", logger="acepipe.pack"):
        summary = pack(cfg)
    assert "shard-000001.tar cannot be written again alone" in caplog.text
    assert "packing the whole dataset again" in caplog.text
    assert summary["skipped"] is False and summary["rewritten"] == [] and summary["packed"] == len(index) - 1
    assert reason_code(rejects_of(store, "default")[victim["track_id"]]) == "source_missing"
    assert_consistent(store, "default")


def test_an_unreadable_stage_output_rejects_its_tracks_and_pack_goes_on(work, tmp_path, caplog):
    copy = tmp_path / "work"
    shutil.copytree(work.cfg.work_root, copy, ignore=shutil.ignore_patterns("shards", "manifest", ".lock-*"))
    cfg = with_overrides(work.cfg, work=copy)
    store = StageStore(cfg.work_root)
    keys = json.loads(pq.read_schema(work.store.path("manifest", "default.parquet")).metadata[b"stage_keys"])
    damaged = Path(store.stage_path("caption", keys["caption"], 1))
    damaged.write_bytes(damaged.read_bytes()[:-20])          # the footer is gone
    in_partition = {r["track_id"] for r in work.manifest if r["partition"] == 1}
    assert in_partition

    with caplog.at_level("WARNING", logger="acepipe.store"):
        summary = pack(cfg)
    assert not damaged.exists() and list((copy / "quarantine").rglob("part-00001.parquet.*"))
    assert "quarantined" in caplog.text and "part-00001.parquet" in caplog.text
    rejects = rejects_of(store, "default")
    assert set(rejects) == in_partition
    for reason in rejects.values():
        assert reason_code(reason) == "stage_unreadable" and "acepipe run" in reason
        assert f"stages/caption/{keys['caption']}/part-00001.parquet" in reason
    assert summary["packed"] == len(work.manifest) - len(in_partition)
    assert summary["reasons"] == {"stage_unreadable": len(in_partition)}
    assert {r["track_id"] for r in manifest_of(store, "default")} == {r["track_id"] for r in work.manifest} - in_partition
    assert_consistent(store, "default")


def test_a_stage_output_without_a_newer_column_gives_nulls_not_quarantine(work, tmp_path):
    """Outputs written before a stage produced a column still pack: the column is null there
    (scale stands in for a newer column here: the fixture's rhythm rows give it values)."""
    copy = tmp_path / "work"
    shutil.copytree(work.cfg.work_root, copy, ignore=shutil.ignore_patterns("shards", "manifest", ".lock-*"))
    cfg = with_overrides(work.cfg, work=copy)
    store = StageStore(cfg.work_root)
    keys = json.loads(pq.read_schema(work.store.path("manifest", "default.parquet")).metadata[b"stage_keys"])
    older = Path(store.stage_path("rhythm", keys["rhythm"], 1))
    pq.write_table(pq.read_table(older).drop_columns(["bpm_confidence", "meter", "scale"]), older)
    summary = pack(cfg)
    assert older.exists() and not (copy / "quarantine").exists()
    assert summary["packed"] == work.summary["packed"]
    assert any(r["partition"] == 1 and r["scale"] for r in work.manifest)
    for before, after in zip(work.manifest, manifest_of(store, "default")):
        for column in ("bpm", "key", "bpm_confidence", "meter", "scale"):
            lacks = after["partition"] == 1 and column in ("bpm_confidence", "meter", "scale")
            assert after[column] == (None if lacks else before[column]), column


def _expected(rows, predicate):
    return sorted(r["track_id"] for r in rows if predicate(r))


def _median(rows, field):
    return sorted(r[field] for r in rows)[len(rows) // 2]


@pytest.mark.parametrize("name", ["min_duration_s", "max_duration_s", "min_pq", "min_ce", "languages",
                                  "require_lyrics", "min_lyrics_score"])
def test_each_filter_leaves_out_the_right_tracks(work, name):
    rows = work.manifest
    if name in ("min_duration_s", "max_duration_s", "min_pq", "min_ce"):
        field = {"min_duration_s": "duration", "max_duration_s": "duration"}.get(name, name[4:])
        value = _median(rows, field)
        override = f"pack.filter.{name}={value}"
        out = _expected(rows, (lambda r: r[field] > value) if name.startswith("max") else (lambda r: r[field] < value))
        pattern = f"filtered: {field}"
    elif name == "languages":
        override, pattern = "pack.filter.languages=[en]", "filtered: language"
        out = _expected(rows, lambda r: r["language"] != "en" and not r["instrumental"])
    elif name == "require_lyrics":
        override, pattern = "pack.filter.require_lyrics=true", "filtered: no matched lyrics"
        out = _expected(rows, lambda r: r["lyric_id"] is None)
    else:
        override, pattern = "pack.filter.min_lyrics_score=0.95", "filtered: lyrics score"
        out = _expected(rows, lambda r: r["lyric_id"] is not None)
    assert 0 < len(out) < len(rows), (name, out)
    kept, rejects, _ = candidates(work.store, with_overrides(work.cfg, override))
    assert sorted(r["track_id"] for r in rejects) == out
    assert all(r["reason"].startswith(pattern) and name in r["reason"] for r in rejects), rejects
    assert sorted(r["track_id"] for r, _ in kept) == sorted(set(r["track_id"] for r in rows) - set(out))


AXES = ("ce", "cu", "pc", "pq")
THRESHOLD = 5.5


@pytest.fixture(scope="module")
def crafted(work, tmp_path_factory):
    """A copy of the work root where chosen tracks carry known values: an instrumental tagged
    Japanese by the transcriber, a sung Japanese track without matched lyrics, one track per
    aesthetics axis just below THRESHOLD on that axis (just above on the others), and one just
    above on every axis."""
    copy = tmp_path_factory.mktemp("crafted") / "work"
    shutil.copytree(work.cfg.work_root, copy, ignore=shutil.ignore_patterns("shards", "manifest", ".lock-*"))
    cfg = with_overrides(work.cfg, work=copy)
    store = StageStore(cfg.work_root)
    keys = json.loads(pq.read_schema(work.store.path("manifest", "default.parquet")).metadata[b"stage_keys"])
    by_id = {r["track_id"]: r for r in work.manifest}
    ids = sorted(by_id)
    assert len(ids) >= 5

    def rewrite(stage, tid, **values):
        _rewrite(store.stage_path(stage, keys[stage], by_id[tid]["partition"]), tid, **values)

    below, above = dict(zip(AXES, ids[:4])), ids[4]
    for axis, tid in below.items():
        rewrite("aesthetics", tid, **{a: THRESHOLD - 0.01 if a == axis else THRESHOLD + 0.01 for a in AXES})
    rewrite("aesthetics", above, **{a: THRESHOLD + 0.01 for a in AXES})
    unmatched = dict(lyric_id=None, score=None, language=None, title=None, artist=None, lyrics=None)
    instrumental, sung = ids[0], ids[1]
    rewrite("transcribe", instrumental, language="ja", instrumental=True, text="")
    rewrite("lyrics", instrumental, **unmatched)
    rewrite("transcribe", sung, language="ja", instrumental=False, text="夜空の星")
    rewrite("lyrics", sung, **unmatched)
    return SimpleNamespace(cfg=cfg, store=store, below=below, above=above, instrumental=instrumental, sung=sung,
                           manifest=work.manifest,
                           untouched=[r for r in work.manifest if r["track_id"] not in ids[:5]])


def _split(crafted, *overrides) -> tuple[dict[str, dict], dict[str, str]]:
    kept, rejects, _ = candidates(crafted.store, with_overrides(crafted.cfg, *overrides))
    return {r["track_id"]: r for r, _ in kept}, {r["track_id"]: r["reason"] for r in rejects}


def test_language_filter_lets_instrumentals_through_unless_lyrics_are_required(crafted):
    kept, reasons = _split(crafted, "pack.filter.languages=[en]")
    assert crafted.instrumental in kept, reasons.get(crafted.instrumental)
    assert kept[crafted.instrumental]["language"] == "ja" and kept[crafted.instrumental]["instrumental"]
    assert reasons.get(crafted.sung, "kept") == "filtered: language ja not in pack.filter.languages ['en']"
    others = [r for r in crafted.manifest if r["track_id"] not in (crafted.instrumental, crafted.sung)]
    assert set(reasons) == {crafted.sung} | {r["track_id"] for r in others
                                            if r["language"] != "en" and not r["instrumental"]}

    kept, reasons = _split(crafted, "pack.filter.languages=[en]", "pack.filter.require_lyrics=true")
    assert reasons.get(crafted.instrumental, "kept") == \
        "filtered: no matched lyrics and pack.filter.require_lyrics is set"
    assert crafted.sung in reasons and not any(r["instrumental"] for r in kept.values())


@pytest.mark.parametrize("axis", AXES)
def test_each_aesthetics_threshold_leaves_out_the_track_just_below_it(crafted, axis):
    kept, reasons = _split(crafted, f"pack.filter.min_{axis}={THRESHOLD}")
    low = crafted.below[axis]
    assert reasons.get(low, "kept") == f"filtered: {axis} {THRESHOLD - 0.01:.2f} < pack.filter.min_{axis} {THRESHOLD}"
    assert crafted.above in kept
    assert all(tid in kept for a, tid in crafted.below.items() if a != axis)   # other axes not filtered
    for row in crafted.untouched:   # the fixture's own scores, on this axis only
        score = stage_row("aesthetics", row)[axis]
        assert (row["track_id"] in reasons) == (score < THRESHOLD), (row["track_id"], score)


def test_all_aesthetics_thresholds_at_once_name_the_axis_that_failed(crafted):
    kept, reasons = _split(crafted, *(f"pack.filter.min_{a}={THRESHOLD}" for a in AXES))
    for axis, tid in crafted.below.items():
        reason = reasons.get(tid, "kept")
        assert reason.startswith(f"filtered: {axis} ") and f"pack.filter.min_{axis} " in reason, (axis, reason)
    assert crafted.above in kept


def test_a_filtered_pack_writes_its_rejects(work):
    cfg = with_overrides(work.cfg, "pack.filter.languages=[en]")
    summary = pack(cfg, "english")
    assert_consistent(work.store, "english")
    assert {r["language"] for r in manifest_of(work.store, "english")} == {"en"}
    rejects = rejects_of(work.store, "english")
    assert summary["rejected"] == len(rejects) > 0 and summary["reasons"] == {"filtered": len(rejects)}


def _rewrite(path: str, track_id: str, **values) -> None:
    table = pq.read_table(path)
    rows = table.to_pylist()
    for r in rows:
        if r["track_id"] == track_id:
            r.update(values)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def test_rows_without_a_required_field_are_left_out_with_a_reason(work, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(work.cfg.work_root, copy, ignore=shutil.ignore_patterns("shards", "manifest", ".lock-*"))
    cfg = with_overrides(work.cfg, work=copy)
    store = StageStore(cfg.work_root)
    keys = json.loads(pq.read_schema(work.store.path("manifest", "default.parquet")).metadata[b"stage_keys"])
    rows = work.manifest
    by_id = {r["track_id"]: r for r in rows}
    matched = next(r["track_id"] for r in rows if r["lyric_id"] is not None)
    a, b, c, d, e = [r["track_id"] for r in rows if r["track_id"] != matched][:5]

    def stage_file(stage, tid):
        return store.stage_path(stage, keys[stage], by_id[tid]["partition"])

    _rewrite(stage_file("probe", a), a, duration=None)
    _rewrite(store.catalog_path(by_id[a]["partition"]), a, duration=None)
    _rewrite(store.catalog_path(by_id[b]["partition"]), b, sample_rate=None)
    _rewrite(stage_file("caption", c), c, description=None)
    _rewrite(stage_file("rhythm", d), d, bpm=None)
    _rewrite(stage_file("aesthetics", e), e, pq=None)
    _rewrite(stage_file("lyrics", matched), matched, lyrics=None)

    summary = pack(cfg)
    assert rejects_of(store, "default") == {
        a: "missing_field: duration is null (the catalog or probe row lacks it; re-run curate)",
        b: "missing_field: source_sample_rate is null (the catalog or probe row lacks it; re-run curate)"}
    assert summary["packed"] == len(rows) - 2
    assert_consistent(store, "default")

    cases = [("pack.filter.require_caption=true", c, "filtered: no caption"),
             ("pack.filter.require_bpm=true", d, "filtered: no tempo"),
             ("pack.filter.min_pq=0", e, "missing_field: pq is null"),
             ("pack.filter.require_lyrics=true", matched, "missing_field: lyrics is null")]
    for override, tid, reason in cases:
        _, rejects, _ = candidates(store, with_overrides(cfg, override))
        reasons = {r["track_id"]: r["reason"] for r in rejects}
        assert reasons[tid].startswith(reason), (override, reasons)
        if override != "pack.filter.require_lyrics=true":   # that one also filters the unmatched
            assert set(reasons) == {a, b, tid}, (override, reasons)


def test_audio_that_fails_at_pack_time_is_left_out(tmp_path, synth_corpus, tiny_models_dir):
    cfg = build_work(tmp_path, synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    kept, _, _ = candidates(store, cfg)
    by_name = {Path(t["uri"]).name: t for _, t in kept}
    truncated, replaced, deleted = by_name["song-007.wav"], by_name["song-006.flac"], by_name["song-002.ogg"]
    path = Path(os.fsdecode(truncated["uri_raw"]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])       # cut after ingest
    shutil.copy(synth_corpus / "audio" / "song-003-96k.flac", os.fsdecode(replaced["uri_raw"]))
    os.remove(os.fsdecode(deleted["uri_raw"]))

    summary = pack(cfg)
    reasons = rejects_of(store, "default")
    assert set(reasons) == {truncated["track_id"], replaced["track_id"], deleted["track_id"]}
    assert reason_code(reasons[truncated["track_id"]]) == "source_changed"
    assert reason_code(reasons[replaced["track_id"]]) == "source_changed"
    assert reason_code(reasons[deleted["track_id"]]) == "source_missing"
    assert "song-002.ogg" in reasons[deleted["track_id"]]
    assert summary["packed"] == len(kept) - 3 and summary["reasons"] == {"source_changed": 2, "source_missing": 1}
    assert_consistent(store, "default")

    # Without re-hashing, the loader's own guard catches the cut file as it decodes it. (Its
    # per-process cache still holds this process's probe decodes, keyed by path: clear it.)
    audio.DECODE_CACHE.clear()
    pack(with_overrides(cfg, "pack.verify_source=false"), "unverified")
    reasons = rejects_of(store, "unverified")
    assert reason_code(reasons[truncated["track_id"]]) == "truncated"
    assert deleted["track_id"] in reasons
    assert_consistent(store, "unverified")


def test_same_manifest_and_config_give_byte_identical_shards(work, tmp_path, synth_corpus, tiny_models_dir):
    other = build_work(tmp_path, synth_corpus, tiny_models_dir)
    summary = pack(other)
    other_store = StageStore(other.work_root)
    names = visible_shards(work.store, "default")
    assert names == visible_shards(other_store, "default") and summary["fingerprint"] == work.summary["fingerprint"]
    for name in names:
        a = Path(work.store.path("shards", "default", name)).read_bytes()
        b = Path(other_store.path("shards", "default", name)).read_bytes()
        assert a == b, name
    assert index_of(work.store, "default") == index_of(other_store, "default")


KILLER = r"""
import os, signal, sys
sys.path.insert(0, {repo!r})
from schemas.config import Config
from tasks import pack, shards

original = shards.ShardWriter.add
def add(self, key, files):
    shard = original(self, key, files)
    if len(self.shards) == 2:          # one sample into the second shard: die mid-shard
        self._fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return shard
shards.ShardWriter.add = add
cfg = Config.model_validate_json(open({cfg!r}).read())
pack.pack(cfg, "crash", rebuild=True)
"""


def test_a_killed_rebuild_leaves_no_partial_shard_and_no_index(work, tmp_path):
    store = work.store
    pack(with_overrides(work.cfg, "pack.shard_bytes=1000000000"), "crash")   # a complete earlier pack
    assert visible_shards(store, "crash") == ["shard-000000.tar"]
    cfg = with_overrides(work.cfg)   # the default's shard size: several shards
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = KILLER.format(repo=str(REPO), cfg=str(tmp_path / "cfg.json"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]

    shard_dir = Path(store.path("shards", "crash"))
    assert not (shard_dir / "index.parquet").exists()
    assert not Path(store.path("manifest", "crash.parquet")).exists()
    assert not (shard_dir / "rejects.parquet").exists()
    assert [p.name for p in shard_dir.glob(".tmp-*shard-000001.tar")], "the kill did not land mid-shard"
    assert visible_shards(store, "crash") == ["shard-000000.tar"]
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:   # the visible shard is complete
        names = [m.name for m in tar.getmembers()]
        assert all(len(tar.extractfile(m).read()) == m.size for m in tar.getmembers())
    assert names == [n for n in names if n.split(".")[0] in {r["track_id"] for r in work.manifest}]

    summary = pack(cfg, "crash")   # the rerun (no index: a full pack) builds what a clean run builds
    assert summary["skipped"] is False
    assert not list(shard_dir.glob(".tmp-*")) and not list(Path(store.root).glob(".lock-*"))
    assert_consistent(store, "crash")
    for name in visible_shards(store, "crash"):
        assert (shard_dir / name).read_bytes() == Path(store.path("shards", "default", name)).read_bytes()


def test_an_error_mid_pack_removes_the_open_shard(work, monkeypatch):
    from tasks import shards

    original, calls = shards.ShardWriter.add, []

    def add(self, key, files):
        calls.append(key)
        if len(calls) == 4:
            raise OSError("disk full")
        return original(self, key, files)

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    with pytest.raises(OSError, match="disk full"):
        pack(work.cfg, "failing")
    shard_dir = Path(work.store.path("shards", "failing"))
    assert not list(shard_dir.glob(".tmp-*")) and not (shard_dir / "index.parquet").exists()
    monkeypatch.undo()
    pack(work.cfg, "failing")
    assert_consistent(work.store, "failing")


def _is_png(data: bytes) -> bool:
    import matplotlib.image

    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return False
    return matplotlib.image.imread(io.BytesIO(data), format="png").ndim == 3


def test_flow_writes_shards_report_and_artifact(prefect_harness, work):
    from prefect.artifacts import Artifact

    from flows.params import PackParams
    from flows.pack import pack as pack_flow

    params = PackParams(config="tiny", work_root=work.cfg.work_root, dataset="flow_run",
                        overrides=fixture_overrides(Path(work.cfg.models.tiny_dir), Path(work.cfg.lyrics_db)))
    summary = pack_flow(params)
    assert summary["packed"] == work.summary["packed"] and summary["skipped"] is False
    assert_consistent(work.store, "flow_run")
    shard_dir = Path(work.store.path("shards", "flow_run"))
    report = (shard_dir / "report.md").read_text()
    charts = sorted(p.name for p in shard_dir.glob("report-*.png"))
    assert charts == ["report-aesthetics.png", "report-bpm.png", "report-durations.png", "report-keys.png",
                      "report-languages.png"]
    assert all(_is_png((shard_dir / c).read_bytes()) for c in charts)
    assert all(f"]({c})" in report for c in charts) and f"**{summary['packed']}**" in report
    artifact = Artifact.get("dataset-report-flow-run")
    assert artifact is not None and artifact.data.count("data:image/png;base64,") == len(charts)
    review = Artifact.get("review-flow-run")    # the lowest-confidence tracks, as a table
    table = json.loads(review.data) if isinstance(review.data, str) else review.data
    lowest_pq = sorted((r["pq"], r["track_id"]) for r in manifest_of(work.store, "flow_run"))[:10]
    assert review.type == "table"
    assert [(r["track_id"], r["rank"]) for r in table if r["label"] == "pq"] == \
        [(tid, i + 1) for i, (_, tid) in enumerate(lowest_pq)]
    assert pack_flow(params)["skipped"] is True


def test_cli_packs_and_refuses_an_empty_work_root(prefect_harness, work, tmp_path, capsys):
    from flows.cli import main

    args = ["pack", "--config", "tiny", "--work", work.cfg.work_root, "--dataset", "from_cli"]
    for o in fixture_overrides(Path(work.cfg.models.tiny_dir), Path(work.cfg.lyrics_db)):
        args += ["--set", o]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"{work.summary['packed']} tracks" in out and "shards/from_cli" in out
    assert_consistent(work.store, "from_cli")
    shard_dir = Path(work.store.path("shards", "from_cli"))
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.tar")}
    assert main(args + ["--rebuild"]) == 0   # every shard written again, to the same bytes
    assert "(unchanged, skipped)" not in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("shard-*.tar")}
    assert after.keys() == before.keys() and all(after[n] != before[n] for n in after)
    assert_consistent(work.store, "from_cli")
    assert main(["pack", "--config", "tiny", "--work", str(tmp_path / "empty")]) == 2
    assert "no catalog" in capsys.readouterr().err
    assert main(args[:-2] + ["--dataset", "../escape"] + args[-2:]) == 2


# -- the tiny pipeline's own stage outputs: confidences, meter, line times; overrides over a rerun --
@pytest.fixture(scope="module")
def real_run(prefect_harness, synth_corpus, tiny_models_dir, tmp_path_factory):
    """A curate run of the tiny profile (Essentia's tempo: the tiny Beat This gives none), then
    the real lyrics stage's match of one kept track against a transcript of a database song
    (the tiny Whisper transcribes noise, which matches nothing), written as that stage writes."""
    from flows.curate import curate
    from flows.params import RunParams
    from schemas.config import load_config
    from tasks.lyrics import LyricsStage
    from tasks.lyrics_index import lyric_lines, read_lyrics_db
    from tasks.stage import dag_order, stage_keys

    work = tmp_path_factory.mktemp("real") / "work"
    overrides = [f"models.tiny_dir={tiny_models_dir}", f"lyrics_db={synth_corpus / 'lyrics.parquet'}",
                 "rhythm.beat_tracker=essentia"]
    summary = curate(RunParams(config="tiny", work_root=str(work), sources=[str(synth_corpus / "audio")],
                               overrides=overrides))
    assert summary["failed_tasks"] == [] and summary["pending"] == 0
    cfg = load_config("tiny", [f"work_root={work}", *overrides], environ={})
    store = StageStore(cfg.work_root)
    keys = stage_keys(cfg, dag_order(cfg.stages))
    kept, _, _ = candidates(store, cfg)
    row, track = kept[0]
    song = next(r for r in read_lyrics_db(str(synth_corpus / "lyrics.parquet")).rows if r["language"] == "en")
    lines = [line for _, line in lyric_lines(song["lyrics"])]
    heard = {"text": " ".join(lines), "language": "en", "instrumental": False,
             "segments": [{"start": 2.0 + 3 * i, "end": 4.5 + 3 * i, "text": line} for i, line in enumerate(lines)]}
    stage = LyricsStage(cfg)
    stage.setup()
    [sung] = stage.process([{"track_id": row["track_id"], "transcribe": heard}])
    assert sung["lyric_id"] == song["lyric_id"] and len(sung["alignment"]) == len(lines)
    path = store.stage_path("lyrics", keys["lyrics"], row["partition"])
    rows = [sung if r["track_id"] == row["track_id"] else r for r in store.read_table(path).to_pylist()]
    store.write_table(path, pa.Table.from_pylist(rows, schema=LyricsStage.schema))
    return SimpleNamespace(cfg=cfg, overrides=overrides, store=store, keys=keys, sung=sung,
                           synth_corpus=synth_corpus)


def _stage_rows(store: StageStore, stage: str, key: str) -> dict[str, dict]:
    rows = {}
    for p in store.catalog_partitions():
        path = store.stage_path(stage, key, p)
        if store.exists(path):
            rows.update({r["track_id"]: r for r in store.read_table(path).to_pylist()})
    return rows


def test_manifest_carries_confidences_meter_and_line_times_of_real_stage_outputs(real_run):
    store, keys = real_run.store, real_run.keys
    summary = pack(real_run.cfg, "real")
    rows = manifest_of(store, "real")
    assert len(rows) == summary["packed"] > 0
    transcribe, lyrics, rhythm, caption = (_stage_rows(store, name, keys[name])
                                           for name in ("transcribe", "lyrics", "rhythm", "caption"))
    for row in rows:
        tid = row["track_id"]
        assert row["language_prob"] == transcribe[tid]["language_prob"]
        assert (row["bpm"], row["bpm_confidence"], row["meter"]) == \
            (rhythm[tid]["bpm"], rhythm[tid]["bpm_confidence"], rhythm[tid]["meter"])
        assert row["key_confidence"] == rhythm[tid].get("key_confidence")     # null until rhythm gives it
        assert row["caption_finish_reason"] == caption[tid].get("finish_reason")
        alignment = lyrics[tid]["alignment"] if lyrics[tid]["lyric_id"] else None
        assert row["lyrics_lines"] == ([{"start": a["start"], "end": a["end"], "section": a["section"],
                                         "text": a["line"]} for a in alignment] if alignment else None)
        assert row["overridden"] == []
    # Real values, not nulls passed along: Essentia's tempo and meter, Whisper's language odds,
    # and the one matched track's line times (the transcript segments it was aligned to).
    assert any(r["meter"] for r in rows) and all(r["language_prob"] > 0 for r in rows)
    assert all(0 <= r["bpm_confidence"] <= 1 for r in rows if r["bpm_confidence"] is not None)
    matched = [r for r in rows if r["lyrics_lines"]]
    assert [r["track_id"] for r in matched] == [real_run.sung["track_id"]]
    assert [line["start"] for line in matched[0]["lyrics_lines"]] == [2.0 + 3 * i for i in
                                                                     range(len(matched[0]["lyrics_lines"]))]
    assert {line["section"] for line in matched[0]["lyrics_lines"]} >= {"verse", "chorus"}


def test_an_override_survives_a_curate_rerun_and_matches_a_clean_pack(real_run):
    """A person corrects a key; a config change makes curate recompute rhythm and caption; the
    re-pack holds the person's key and otherwise exactly what a pack without the override holds."""
    from flows.curate import curate
    from flows.params import RunParams
    from schemas.config import load_config
    from tasks.overrides import set_override

    store = real_run.store
    first = pack(real_run.cfg, "corrected")
    track_id = manifest_of(store, "corrected")[-1]["track_id"]
    set_override(store, "corrected", track_id, "key", "Bb", "ana")
    set_override(store, "corrected", track_id, "scale", "minor", "ana")
    with_override = pack(real_run.cfg, "corrected")
    assert with_override["fingerprint"] != first["fingerprint"]

    changed = [*real_run.overrides, "rhythm.min_key_strength=0.1"]
    summary = curate(RunParams(config="tiny", work_root=real_run.cfg.work_root,
                               sources=[str(real_run.synth_corpus / "audio")], overrides=changed))
    ran = {s["stage"]: s["partitions_run"] for s in summary["stages"]}
    assert ran["rhythm"] > 0 and ran["caption"] > 0 and ran["transcribe"] == 0
    cfg = load_config("tiny", [f"work_root={real_run.cfg.work_root}", *changed], environ={})
    after = pack(cfg, "corrected")
    clean = pack(cfg, "clean")
    assert after["keys"]["rhythm"] != with_override["keys"]["rhythm"] and after["skipped"] is False
    a, b = manifest_of(store, "clean"), manifest_of(store, "corrected")
    assert [r["track_id"] for r in a] == [r["track_id"] for r in b]
    for x, y in zip(a, b):
        differ = {k for k in x if k not in ("shard", "flac_bytes") and x[k] != y[k]}
        if x["track_id"] == track_id:
            assert (y["key"], y["scale"], y["overridden"]) == ("Bb", "minor", ["key", "scale"])
            assert differ <= {"key", "scale", "overridden"} and "overridden" in differ
        else:
            assert differ == set(), x["track_id"]
    assert pack(cfg, "corrected")["skipped"] is True and clean["fingerprint"] != after["fingerprint"]
