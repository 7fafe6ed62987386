"""Overrides: values checked against the manifest's types, `acepipe override set|list|remove`,
and pack applying them (the filter sees them, the fingerprint follows them, a stage version bump
does not lose them), compared with a clean pack of the same work root without them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, fixture_overrides, tiny_config, write_stages  # noqa: E402

from tasks.overrides import (OverrideError, checked_value, load_overrides, overrides_path,  # noqa: E402
                             parse_cli_value, read_overrides, remove_override, set_override)
from tasks.pack import pack  # noqa: E402
from tasks.store import StageStore  # noqa: E402


def manifest_of(store: StageStore, dataset: str) -> list[dict]:
    return pq.read_table(store.path("manifest", f"{dataset}.parquet")).to_pylist()


# -- values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, expected", [
    ("bpm", 120, 120.0), ("bpm", 99.5, 99.5), ("meter", 3, 3), ("meter", 4.0, 4), ("key", "F#", "F#"),
    ("instrumental", True, True), ("tags", ["pop", "rock"], ["pop", "rock"]), ("caption", None, None),
    ("recaption", {"simplified": "calm piano"},
     {"simplified": "calm piano", "expanded": None, "descriptive": None, "synonyms": None, "use_cases": None}),
    ("lyrics_lines", [{"start": 1.0, "end": 2.5, "section": "verse", "text": "la"}],
     [{"start": 1.0, "end": 2.5, "section": "verse", "text": "la"}]),
])
def test_a_value_of_the_columns_type_is_accepted(field, value, expected):
    assert checked_value(field, value) == expected


@pytest.mark.parametrize("field, value, message", [
    ("bpm", True, "bpm must be a number"),          # pyarrow alone would store 1.0
    ("bpm", "fast", "bpm must be a number"),
    ("meter", 3.5, "meter must be a number (int32)"),   # pyarrow alone would cut it to 3
    ("meter", 2**40, "does not fit int32"),
    ("tags", "pop", "tags must be a JSON list, each item a string"),   # pyarrow alone: ["p", "o", "p"]
    ("tags", ["pop", 3], "tags[1] must be a string"),
    ("recaption", {"short": "x"}, "recaption has no key short"),
    ("key", 5, "key must be a string"),
])
def test_a_value_of_another_type_is_refused_naming_the_field(field, value, message):
    with pytest.raises(OverrideError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        checked_value(field, value)


@pytest.mark.parametrize("field, why", [("bogus", "is not a manifest column"),
                                        ("duration", "is set by pack from the file itself"),
                                        ("track_id", "is set by pack from the file itself")])
def test_an_unknown_or_fixed_field_is_refused(field, why):
    with pytest.raises(OverrideError, match=f"unknown_field: '{field}' {why}; fields a person can override: .*bpm"):
        checked_value(field, 1)


def test_cli_values_are_text_for_text_fields_and_json_otherwise():
    assert parse_cli_value("caption", "a [quiet] song") == "a [quiet] song"
    assert parse_cli_value("bpm", "128") == 128.0
    assert parse_cli_value("tags", '["pop", "rock"]') == ["pop", "rock"]
    assert parse_cli_value("key_confidence", None) is None
    with pytest.raises(OverrideError,
                       match=r"tags must be a JSON list, each item a string written as JSON, not 'pop, rock'"):
        parse_cli_value("tags", "pop, rock")


# -- pack ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory, synth_corpus, tiny_models_dir):
    cfg = build_work(tmp_path_factory.mktemp("overrides"), synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    summary = pack(cfg, "clean")
    return cfg, store, summary, manifest_of(store, "clean")


def _differences(a: list[dict], b: list[dict]) -> dict[str, set[str]]:
    """{track_id: fields that differ} between two manifests of the same tracks (shard placement
    aside: an append packs a changed track again at the end)."""
    a, b = (sorted(m, key=lambda r: r["track_id"]) for m in (a, b))
    assert [r["track_id"] for r in a] == [r["track_id"] for r in b]
    skip = {"shard", "flac_bytes"}
    return {x["track_id"]: {k for k in x if k not in skip and x[k] != y[k]} for x, y in zip(a, b)
            if any(x[k] != y[k] for k in x if k not in skip)}


def test_an_override_wins_over_the_stage_value_until_it_is_removed(work):
    cfg, store, clean_summary, clean = work
    track = clean[2]
    set_override(store, "fixed", track["track_id"], "bpm", 123.0, "ana")
    set_override(store, "fixed", track["track_id"], "tags", ["waltz", "strings"], "ana")
    set_override(store, "fixed", track["track_id"], "bpm", 96.0, "ben")   # replaces ana's bpm
    assert [(r["field"], r["value"], r["who"]) for r in read_overrides(store, "fixed").to_pylist()] == \
        [("bpm", "96.0", "ben"), ("tags", '["waltz", "strings"]', "ana")]

    first = pack(cfg, "fixed")
    rows = manifest_of(store, "fixed")
    assert _differences(clean, rows) == {track["track_id"]: {"bpm", "tags", "overridden"}}
    row = next(r for r in rows if r["track_id"] == track["track_id"])
    assert (row["bpm"], row["tags"], row["overridden"]) == (96.0, ["waltz", "strings"], ["bpm", "tags"])
    assert first["fingerprint"] != clean_summary["fingerprint"] and first["overrides"] == 2
    samples = _sample_json(store, "fixed", track["track_id"])
    assert samples["bpm"] == 96.0 and samples["tags"] == ["waltz", "strings"]

    again = pack(cfg, "fixed")       # unchanged overrides: nothing to do
    assert again["skipped"] is True and again["fingerprint"] == first["fingerprint"]
    set_override(store, "fixed", track["track_id"], "bpm", 96.0, "carla")   # same value, other person
    assert pack(cfg, "fixed")["skipped"] is True
    set_override(store, "fixed", track["track_id"], "bpm", 97.0, "carla")
    changed = pack(cfg, "fixed")
    assert changed["skipped"] is False and changed["fingerprint"] not in (first["fingerprint"],
                                                                          clean_summary["fingerprint"])

    assert [r["field"] for r in remove_override(store, "fixed", track["track_id"])] == ["bpm", "tags"]
    restored = pack(cfg, "fixed")
    assert _differences(clean, manifest_of(store, "fixed")) == {}
    assert restored["overrides"] == 0 and restored["skipped"] is False
    with pytest.raises(OverrideError, match="no_override: track .* has no override of bpm"):
        remove_override(store, "fixed", track["track_id"], "bpm")


def _sample_json(store: StageStore, dataset: str, track_id: str) -> dict:
    import webdataset as wds

    index = pq.read_table(store.path("shards", dataset, "index.parquet")).to_pylist()
    shard = next(r["shard"] for r in index if r["track_id"] == track_id)
    for s in wds.WebDataset([store.path("shards", dataset, shard)], shardshuffle=False, empty_check=False):
        if s["__key__"] == track_id:
            return json.loads(s["json"])
    raise AssertionError(f"{track_id} not in {shard}")


def test_the_filter_sees_the_overridden_value(work):
    cfg, store, _, clean = work
    spoken = [r for r in clean if not r["instrumental"]]
    english = {r["track_id"] for r in clean if r["instrumental"] or r["language"] == "en"}
    moved_in = next(r for r in spoken if r["language"] != "en")
    moved_out = next(r for r in spoken if r["language"] == "en")
    set_override(store, "english", moved_in["track_id"], "language", "en", "ana")
    set_override(store, "english", moved_out["track_id"], "language", "de", "ana")
    pack(tiny_config(Path(cfg.work_root), Path(cfg.models.tiny_dir), Path(cfg.lyrics_db),
                     "pack.filter.languages=[en]"), "english")
    packed = {r["track_id"] for r in manifest_of(store, "english")}
    assert packed == (english | {moved_in["track_id"]}) - {moved_out["track_id"]}
    rejects = pq.read_table(store.path("shards", "english", "rejects.parquet")).to_pylist()
    assert next(r["reason"] for r in rejects if r["track_id"] == moved_out["track_id"]).startswith(
        "filtered: language de not in pack.filter.languages")


def test_overrides_survive_a_stage_version_bump(work, tmp_path, synth_corpus, tiny_models_dir, monkeypatch):
    """The rhythm stage's outputs are recomputed under a new key; the override, apart from them,
    still wins, and the rest of the manifest is what a clean pack of the new outputs gives."""
    from tasks.rhythm import STAGE as RHYTHM

    cfg = build_work(tmp_path, synth_corpus, tiny_models_dir)
    store = StageStore(cfg.work_root)
    pack(cfg, "default")
    track_id = manifest_of(store, "default")[0]["track_id"]
    set_override(store, "default", track_id, "key", "G", "ana")
    before = pack(cfg, "default")

    monkeypatch.setattr(RHYTHM, "version", RHYTHM.version + "-bumped")
    write_stages(cfg, store, store.catalog_partitions())   # what `acepipe run` recomputes after the bump
    clean = pack(cfg, "clean")
    after = pack(cfg, "default")
    assert after["keys"]["rhythm"] != before["keys"]["rhythm"] and after["skipped"] is False
    assert _differences(manifest_of(store, "clean"), manifest_of(store, "default")) == \
        {track_id: {"key", "overridden"}}
    row = next(r for r in manifest_of(store, "default") if r["track_id"] == track_id)
    assert (row["key"], row["overridden"]) == ("G", ["key"])
    assert clean["fingerprint"] != after["fingerprint"]


def test_a_hand_edited_table_is_checked_when_pack_reads_it(work):
    cfg, store, _, clean = work
    path = overrides_path(store, "hand")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    good = {"track_id": clean[0]["track_id"], "field": "meter", "value": "3", "who": "ana", "when": "now"}
    pq.write_table(pa.Table.from_pylist([good]), path)
    by_track, digest = load_overrides(store, "hand")
    assert by_track == {clean[0]["track_id"]: {"meter": 3}} and len(digest) == 16
    pq.write_table(pa.Table.from_pylist([dict(good, value="waltz")]), path)
    with pytest.raises(OverrideError, match=r"overrides/hand.parquet: track .* field meter: .*not JSON"):
        pack(cfg, "hand")
    pq.write_table(pa.Table.from_pylist([dict(good, value="3.5")]), path)
    with pytest.raises(OverrideError, match="field meter: bad_value: meter must be a number"):
        pack(cfg, "hand")
    pq.write_table(pa.Table.from_pylist([good, dict(good, value="4")]), path)
    with pytest.raises(OverrideError, match="duplicate_override"):
        pack(cfg, "hand")
    assert not Path(store.path("manifest", "hand.parquet")).exists()


def test_cli_sets_lists_and_removes(prefect_harness, work, synth_corpus, capsys):
    from flows.cli import main

    cfg, store, _, clean = work
    base = ["--config", "tiny", "--work", cfg.work_root, "--dataset", "cli"]
    for o in fixture_overrides(Path(cfg.models.tiny_dir), Path(cfg.lyrics_db)):
        base += ["--set", o]
    catalog = store.read_catalog().to_pylist()
    by_path = next(t for t in catalog if t["track_id"] == clean[1]["track_id"])
    path = by_path["uri"]
    assert main(["override", "set", *base, "--track", path, "--field", "tags", "--value", '["calm"]',
                 "--who", "ana"]) == 0
    assert main(["override", "set", *base, "--track", clean[0]["track_id"], "--field", "lyrics", "--null",
                 "--who", "ben"]) == 0
    capsys.readouterr()
    assert main(["override", "list", *base, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted((r["track_id"], r["field"], r["value"], r["who"]) for r in listed) == sorted(
        [(clean[1]["track_id"], "tags", '["calm"]', "ana"), (clean[0]["track_id"], "lyrics", "null", "ben")])

    assert main(["override", "set", *base, "--track", "no-such-track", "--field", "bpm", "--value", "1",
                 "--who", "ana"]) == 2
    assert "unknown_track: 'no-such-track'" in capsys.readouterr().err
    assert main(["override", "set", *base, "--track", path, "--field", "tempo", "--value", "1", "--who", "a"]) == 2
    assert "unknown_field: 'tempo'" in capsys.readouterr().err
    assert main(["override", "remove", *base, "--track", path]) == 0
    assert main(["override", "remove", *base, "--track", clean[0]["track_id"], "--field", "lyrics"]) == 0
    assert read_overrides(store, "cli").num_rows == 0


def test_an_override_of_a_track_no_stage_kept_is_reported(work, caplog):
    cfg, store, summary, clean = work
    aesthetics = store.read_table(store.stage_path("aesthetics", summary["keys"]["aesthetics"], 0)).to_pylist()
    dropped = next(r["track_id"] for r in aesthetics if r["status"] != "ok")
    set_override(store, "dropped", dropped, "bpm", 100, "ana")
    with caplog.at_level("WARNING", logger="acepipe.pack"):
        result = pack(cfg, "dropped")
    assert f"overrides of 1 track(s) not kept upstream apply to nothing: {dropped}" in caplog.text
    assert dropped not in {r["track_id"] for r in manifest_of(store, "dropped")}
    assert result["packed"] == len(clean)
