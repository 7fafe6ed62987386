"""The manifest's rows (tasks/manifest.py), without audio: a catalog track and its stage outputs
become one row (which language, which lyrics, which duration), the pack filter's decision and
reason for each threshold at and around its boundary, and the join over a hand-written store
(tracks not kept upstream, partitions curate has not reached, an older output without a newer
column, an output that does not read, a person's override seen by the filter)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from schemas.common import CATALOG_SCHEMA
from schemas.config import load_config
from schemas.pack import PackFilter
from tasks.manifest import candidates, filter_reason, manifest_row
from tasks.stage import stage_class, stage_keys
from tasks.store import StageStore

BASE = {"track_id": "t1", "uri": "/music/a.flac", "partition": 3, "bytes": 1000, "codec": "FLAC",
        "sample_rate": 48000, "channels": 2, "duration": 99.0}


def track(**stages) -> dict:
    return {**BASE, **stages}


# -- one row ----------------------------------------------------------------------------------------
def test_a_track_with_every_stage_becomes_one_row():
    alignment = [{"line": "hello world", "section": "verse", "start": 1.5, "end": 3.0, "score": 0.9},
                 {"line": "la la", "section": "chorus", "start": 4.0, "end": 5.5, "score": 0.7}]
    row = manifest_row(track(
        probe={"duration": 120.5, "peak_dbfs": -1.0, "rms_dbfs": -14.0},
        aesthetics={"ce": 6.0, "cu": 7.0, "pc": 4.0, "pq": 8.0},
        transcribe={"language": "fr", "language_prob": 0.6, "text": "bonjour", "instrumental": False},
        lyrics={"lyric_id": "L9", "score": 0.8, "language": "en", "title": "T", "artist": "A",
                "lyrics": "[verse]\nhello world", "alignment": alignment},
        rhythm={"bpm": 120.0, "bpm_confidence": 0.9, "meter": 4, "key": "A", "scale": "minor",
                "key_confidence": 0.7, "segments": [{"start": 0.0, "end": 10.0, "label": "intro", "x": 1}]},
        caption={"description": "a song", "tags": ["pop"], "finish_reason": "stop",
                 "recaption": {"simplified": "pop", "expanded": "synth pop", "extra": "dropped"}}))
    assert row["duration"] == 120.5                    # probe's decoded duration over the header's
    assert (row["peak_dbfs"], row["rms_dbfs"], row["title"], row["artist"]) == (-1.0, -14.0, "T", "A")
    assert (row["source_sample_rate"], row["source_channels"], row["codec"]) == (48000, 2, "FLAC")
    assert row["language"] == "en"                    # the matched lyrics' language wins
    assert (row["language_prob"], row["transcript"], row["instrumental"]) == (0.6, "bonjour", False)
    assert (row["lyric_id"], row["lyrics_score"], row["lyrics"]) == ("L9", 0.8, "[verse]\nhello world")
    assert row["lyrics_lines"] == [{"start": 1.5, "end": 3.0, "section": "verse", "text": "hello world"},
                                   {"start": 4.0, "end": 5.5, "section": "chorus", "text": "la la"}]
    assert (row["bpm"], row["bpm_confidence"], row["meter"]) == (120.0, 0.9, 4)
    assert (row["key"], row["scale"], row["key_confidence"]) == ("A", "minor", 0.7)
    assert row["structure"] == [{"start": 0.0, "end": 10.0, "label": "intro"}]
    assert (row["caption"], row["tags"], row["caption_finish_reason"]) == ("a song", ["pop"], "stop")
    assert row["recaption"] == {"simplified": "pop", "expanded": "synth pop", "descriptive": None,
                                "synonyms": None, "use_cases": None}
    assert (row["ce"], row["cu"], row["pc"], row["pq"]) == (6.0, 7.0, 4.0, 8.0)
    assert row["overridden"] == [] and row["shard"] is None and row["flac_bytes"] is None


def test_without_a_lyrics_match_the_transcripts_language_and_no_lyrics():
    row = manifest_row(track(
        transcribe={"language": "fr", "text": "bonjour", "instrumental": False},
        lyrics={"lyric_id": None, "score": None, "language": "en", "lyrics": "stale text",
                "alignment": [{"line": "x", "section": "verse", "start": 0.0, "end": 1.0}]}))
    assert row["language"] == "fr" and row["lyrics"] is None and row["lyrics_lines"] is None
    matched_without_times = manifest_row(track(lyrics={"lyric_id": "L1", "lyrics": "la", "alignment": None}))
    assert matched_without_times["lyrics"] == "la" and matched_without_times["lyrics_lines"] is None


def test_a_track_without_stage_outputs_keeps_the_catalog_facts_and_nulls():
    row = manifest_row(track())
    assert row["duration"] == 99.0 and row["uri"] == "/music/a.flac" and row["partition"] == 3
    for name in ("language", "bpm", "key", "caption", "tags", "recaption", "structure", "lyrics_lines", "ce"):
        assert row[name] is None, name


# -- the filter ---------------------------------------------------------------------------------------
def row_with(**values) -> dict:
    row = manifest_row(track(probe={"duration": 100.0}))
    row.update(ce=5.0, cu=5.0, pc=5.0, pq=5.0, language="en", instrumental=False, lyric_id="L",
               lyrics="la", lyrics_score=0.5, caption="c", bpm=100.0)
    row.update(values)
    return row


@pytest.mark.parametrize("field", ["duration", "source_sample_rate", "source_channels", "codec"])
def test_a_track_without_a_required_catalog_fact_is_left_out(field):
    assert filter_reason(row_with(**{field: None}), PackFilter()) == (
        f"missing_field: {field} is null (the catalog or probe row lacks it; re-run curate)")


def test_an_empty_filter_keeps_everything():
    assert filter_reason(row_with(language=None, caption=None, bpm=None, ce=None, lyric_id=None), PackFilter()) is None


@pytest.mark.parametrize("duration,reason", [
    (9.9, "filtered: duration 9.9 s < pack.filter.min_duration_s 10.0"), (10.0, None), (200.0, None),
    (200.1, "filtered: duration 200.1 s > pack.filter.max_duration_s 200.0")])
def test_duration_bounds_are_inclusive(duration, reason):
    f = PackFilter(min_duration_s=10.0, max_duration_s=200.0)
    assert filter_reason(row_with(duration=duration), f) == reason


@pytest.mark.parametrize("axis", ["ce", "cu", "pc", "pq"])
def test_each_aesthetics_axis_has_its_own_inclusive_threshold(axis):
    f = PackFilter(**{f"min_{axis}": 6.0})
    assert filter_reason(row_with(**{axis: 6.0}), f) is None
    assert filter_reason(row_with(**{axis: 5.99}), f) == f"filtered: {axis} 5.99 < pack.filter.min_{axis} 6.0"
    assert filter_reason(row_with(**{axis: None}), f) == (
        f"missing_field: {axis} is null but pack.filter.min_{axis} is set (run aesthetics)")
    others = [a for a in ("ce", "cu", "pc", "pq") if a != axis]
    assert filter_reason(row_with(**{axis: 6.0}, **{a: 0.0 for a in others}), f) is None   # others unfiltered


def test_require_lyrics():
    f = PackFilter(require_lyrics=True)
    assert filter_reason(row_with(lyric_id=None), f) == "filtered: no matched lyrics and pack.filter.require_lyrics is set"
    assert filter_reason(row_with(lyrics=""), f) == "missing_field: lyrics is null for matched lyric_id L"
    assert filter_reason(row_with(), f) is None


def test_min_lyrics_score_applies_to_matched_lyrics_only():
    f = PackFilter(min_lyrics_score=0.5)
    assert filter_reason(row_with(lyrics_score=0.5), f) is None
    assert filter_reason(row_with(lyrics_score=0.49), f) == "filtered: lyrics score 0.49 < pack.filter.min_lyrics_score 0.5"
    assert filter_reason(row_with(lyrics_score=None), f) == (
        "missing_field: lyrics_score is null but pack.filter.min_lyrics_score is set")
    assert filter_reason(row_with(lyric_id=None, lyrics_score=None), f) is None


def test_languages_keep_instrumentals_whatever_their_tag():
    f = PackFilter(languages=["en", "es"])
    assert filter_reason(row_with(language="es"), f) is None
    assert filter_reason(row_with(language="fr"), f) == "filtered: language fr not in pack.filter.languages ['en', 'es']"
    assert filter_reason(row_with(language=None), f) == (
        "missing_field: language is null but pack.filter.languages is set (run transcribe)")
    assert filter_reason(row_with(language="ja", instrumental=True), f) is None
    assert filter_reason(row_with(language=None, instrumental=True), f) is None


def test_require_caption_and_bpm():
    assert filter_reason(row_with(caption=""), PackFilter(require_caption=True)) == (
        "filtered: no caption and pack.filter.require_caption is set")
    assert filter_reason(row_with(caption="x"), PackFilter(require_caption=True)) is None
    assert filter_reason(row_with(bpm=None), PackFilter(require_bpm=True)) == "filtered: no tempo and pack.filter.require_bpm is set"
    assert filter_reason(row_with(bpm=0.0), PackFilter(require_bpm=True)) is None


def test_the_first_failing_check_is_the_reason():
    f = PackFilter(min_duration_s=50.0, min_pq=9.0, languages=["en"])
    assert filter_reason(row_with(duration=10.0, pq=1.0, language="fr"), f).startswith("filtered: duration")
    assert filter_reason(row_with(pq=1.0, language="fr"), f).startswith("filtered: pq")


# -- the join over a store -------------------------------------------------------------------------------
def write_catalog(store: StageStore, partition: int, rows: list[dict]) -> None:
    full = [{**{f.name: None for f in CATALOG_SCHEMA}, "aliases": [], "duration": 100.0, "sample_rate": 44100,
             "channels": 2, "codec": "FLAC", "partition": partition, **r} for r in rows]
    store.write_table(store.catalog_path(partition), pa.Table.from_pylist(full, schema=CATALOG_SCHEMA))


def write_stage(store: StageStore, name: str, key: str, partition: int, rows: list[dict], drop=()) -> None:
    schema = stage_class(name).schema
    full = [{**{f.name: None for f in schema}, **r} for r in rows]
    table = pa.Table.from_pylist(full, schema=schema)
    store.write_table(store.stage_path(name, key, partition), table.drop_columns(list(drop)))


@pytest.fixture
def joined(tmp_path, tiny_models_dir):
    cfg = load_config("tiny", [f"work_root={tmp_path / 'work'}", f"models.tiny_dir={tiny_models_dir}",
                               "stages=[probe,aesthetics]", "pack.filter.min_pq=5.0"], environ={})
    store = StageStore(cfg.work_root)
    keys = stage_keys(cfg, ["probe", "aesthetics"])
    ok = {"status": "ok", "uri_raw": b"/m/x"}
    write_catalog(store, 0, [{"track_id": "d", "uri": "/m/d", **ok}, {"track_id": "b", "uri": "/m/b", **ok},
                             {"track_id": "a", "uri": "/m/a", **ok}, {"track_id": "bad", "uri": "/m/bad",
                                                                      "status": "rejected", "reason": "unreadable: x"},
                             {"track_id": "c", "uri": "/m/c", **ok}, {"track_id": "e", "uri": "/m/e", "status": "ok"}])
    write_stage(store, "probe", keys["probe"], 0, [
        {"track_id": t, "status": "ok", "duration": 90.0} for t in ("a", "b", "d", "e")] + [
        {"track_id": "c", "status": "rejected", "reason": "silent: x"}])
    write_stage(store, "aesthetics", keys["aesthetics"], 0, [
        {"track_id": "a", "status": "ok", "pq": 7.0}, {"track_id": "b", "status": "ok", "pq": 3.0},
        {"track_id": "d", "status": "ok", "pq": 6.0}, {"track_id": "e", "status": "ok", "pq": 6.0}],
        drop=("ce",))                                   # an older output, before a column existed
    write_catalog(store, 1, [{"track_id": "f", "uri": "/m/f", **ok}])   # curate has not reached it
    write_stage(store, "probe", keys["probe"], 1, [{"track_id": "f", "status": "ok", "duration": 90.0}])
    write_catalog(store, 2, [{"track_id": "g", "uri": "/m/g", **ok}, {"track_id": "h", "uri": "/m/h", **ok}])
    return cfg, store, keys


def test_the_join_keeps_tracks_ok_everywhere_in_track_id_order_and_counts_the_others(joined):
    cfg, store, keys = joined
    kept, rejects, upstream = candidates(store, cfg)
    assert [row["track_id"] for row, _ in kept] == ["a", "d"]
    assert all(row["duration"] == 90.0 and row["ce"] is None for row, _ in kept)   # the missing column: null
    assert [r["pq"] for r, _ in kept] == [7.0, 6.0] and kept[0][1]["uri"] == "/m/a"
    assert sorted((r["track_id"], r["uri"], r["reason"]) for r in rejects) == [
        ("b", "/m/b", "filtered: pq 3.00 < pack.filter.min_pq 5.0"),
        ("e", "/m/e", "missing_field: uri_raw is null (the catalog row has no path to open)")]
    assert upstream == {"keys": keys, "catalog_tracks": 9, "not_ok_upstream": 2, "stage_missing": 3}


def test_an_override_is_what_the_filter_sees(joined):
    cfg, store, _ = joined
    kept, rejects, _ = candidates(store, cfg, {"b": {"pq": 9.5}, "a": {"pq": 1.0}})
    assert [(row["track_id"], row["pq"], row["overridden"]) for row, _ in kept] == [("b", 9.5, ["pq"]), ("d", 6.0, [])]
    assert ("a", "filtered: pq 1.00 < pack.filter.min_pq 5.0") in [(r["track_id"], r["reason"]) for r in rejects]


def test_an_output_that_does_not_read_rejects_its_tracks_and_is_quarantined(joined):
    cfg, store, keys = joined
    path = store.stage_path("aesthetics", keys["aesthetics"], 0)
    store.write_bytes(path, b"PAR1 not a parquet file")
    kept, rejects, _ = candidates(store, cfg)
    assert kept == [] and not store.exists(path) and store.listdir(store.path("quarantine"))
    assert sorted((r["track_id"], r["uri"]) for r in rejects) == [("a", "/m/a"), ("b", "/m/b"), ("d", "/m/d"),
                                                                    ("e", "/m/e")]
    assert all(r["reason"].startswith("stage_unreadable: stages/aesthetics/") and "acepipe run" in r["reason"]
               for r in rejects)
