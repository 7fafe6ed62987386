"""`acepipe review`: the lowest-confidence tracks per label, checked against sorts computed here
from the manifest rows in plain Python; a manifest without the confidence columns still reviews."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pack_fixtures import build_work, fixture_overrides  # noqa: E402

from schemas.pack import MANIFEST_SCHEMA  # noqa: E402
from tasks.pack import pack  # noqa: E402
from tasks.review import COLUMNS, review  # noqa: E402
from tasks.store import StageStore  # noqa: E402

# label -> (value, confidence, fields whose override settles it): the documented table, restated.
EXPECTED_LABELS = {
    "tempo": ("bpm", "bpm_confidence", {"bpm", "bpm_confidence"}),
    "key": ("key", "key_confidence", {"key", "scale", "key_confidence"}),
    "lyrics": ("lyric_id", "lyrics_score", {"lyric_id", "lyrics", "lyrics_score"}),
    "language": ("language", "language_prob", {"language", "language_prob"}),
    "ce": ("ce", "ce", {"ce"}), "cu": ("cu", "cu", {"cu"}), "pc": ("pc", "pc", {"pc"}), "pq": ("pq", "pq", {"pq"}),
}


def lowest(rows: list[dict], label: str, n: int) -> list[tuple[str, float]]:
    """(track_id, confidence) of the n lowest, by a plain sort of the rows."""
    value, conf, settles = EXPECTED_LABELS[label]
    scored = [(r[conf], r["track_id"]) for r in rows
              if r[conf] is not None and r[value] is not None and not settles & set(r["overridden"] or [])]
    return [(tid, c) for c, tid in sorted(scored)[:n]]


def random_manifest(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        def maybe(x, p=0.15):
            return None if rng.random() < p else x
        rows.append({
            "track_id": f"t{i:03d}", "uri": f"/audio/{i}.flac",
            "bpm": maybe(float(rng.uniform(60, 180))), "bpm_confidence": maybe(round(float(rng.random()), 2)),
            "key": maybe(str(rng.choice(["C", "D", "F#"]))), "scale": str(rng.choice(["major", "minor"])),
            "key_confidence": maybe(round(float(rng.random()), 1)),   # coarse: many ties
            "lyric_id": maybe(f"lyr-{i}", 0.5), "lyrics_score": float(rng.random()),
            "language": maybe("en"), "language_prob": maybe(float(rng.random())),
            **{a: float(rng.uniform(1, 9)) for a in ("ce", "cu", "pc", "pq")},
            "caption_finish_reason": "stop", "recaption": None,
            "overridden": maybe(sorted({str(rng.choice(["bpm", "key", "language", "pq", "tags"]))}), 0.8),
        })
    return rows


def as_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([MANIFEST_SCHEMA.field(c) for c in COLUMNS]))


@pytest.mark.parametrize("seed", [0, 1])
def test_each_label_lists_its_lowest_confidences_first(seed):
    rows = random_manifest(60, seed)
    table = as_table(rows)
    stored = table.to_pylist()        # the float32 columns as the manifest holds them
    result = review(table, per_label=7)
    for label in EXPECTED_LABELS:
        got = [(r["track_id"], r["confidence"]) for r in result["labels"][label]]
        assert got == lowest(stored, label, 7), label
    assert result["labels"]["key"][0]["value"] in {f"{k} {s}" for k in ("C", "D", "F#") for s in ("major", "minor")}
    # Values without a confidence are counted, not listed.
    assert result["unscored"]["tempo"] == sum(r["bpm"] is not None and r["bpm_confidence"] is None for r in rows)


def test_captions_cut_short_come_before_captions_without_recaption():
    rows = random_manifest(6, 2)
    empty = {k: None for k in ("simplified", "expanded", "descriptive", "synonyms", "use_cases")}
    rows[0].update(caption_finish_reason="stop", recaption=dict(empty, expanded="a calm piano piece"))
    rows[1].update(caption_finish_reason="length", recaption=dict(empty, simplified="piano"))
    rows[2].update(caption_finish_reason="stop", recaption=dict(empty, simplified="   "))   # blank is missing
    rows[3].update(caption_finish_reason="stop", recaption=None)
    rows[4].update(caption_finish_reason="length", recaption=None, overridden=["caption"])   # a person checked it
    rows[5].update(caption_finish_reason=None, recaption=dict(empty, synonyms="keys"))
    listed = review(as_table(rows))["labels"]["caption"]
    assert [(r["track_id"], r["confidence"]) for r in listed] == [("t001", 0.0), ("t002", 0.5), ("t003", 0.5)]
    assert "finish_reason length" in listed[0]["value"] and listed[1]["value"] == "no recaption"


@pytest.fixture(scope="module")
def packed(tmp_path_factory, synth_corpus, tiny_models_dir):
    cfg = build_work(tmp_path_factory.mktemp("review"), synth_corpus, tiny_models_dir)
    pack(cfg)
    return cfg


def test_cli_prints_the_manifests_lowest_tracks(prefect_harness, packed, capsys):
    from flows.cli import main

    store = StageStore(packed.work_root)
    manifest = pq.read_table(store.path("manifest", "default.parquet")).to_pylist()
    args = ["review", "--config", "tiny", "--work", packed.work_root, "--per-label", "3"]
    for o in fixture_overrides(Path(packed.models.tiny_dir), Path(packed.lyrics_db)):
        args += ["--set", o]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for label in ("pq", "ce", "language", "lyrics"):
        got = [(r["track_id"], r["confidence"]) for r in result["labels"][label]]
        assert got == lowest(manifest, label, 3), label
        uris = {r["track_id"]: r["uri"] for r in manifest}
        assert all(r["uri"] == uris[r["track_id"]] for r in result["labels"][label])
    assert len(result["labels"]["pq"]) == 3
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "lowest-confidence tracks of dataset default" in text and result["labels"]["pq"][0]["track_id"] in text
    assert main(args[:1] + ["--dataset", "nothing"] + args[1:]) == 2
    assert "acepipe pack --dataset nothing" in capsys.readouterr().err


def test_a_manifest_without_the_confidence_columns_still_reviews(packed, tmp_path):
    from tasks.review import review_dataset

    store = StageStore(packed.work_root)
    path = store.path("manifest", "old.parquet")
    table = pq.read_table(store.path("manifest", "default.parquet"))
    pq.write_table(table.drop_columns(["bpm_confidence", "key_confidence", "language_prob",
                                       "caption_finish_reason", "recaption", "overridden"]), path)
    result = review_dataset(store, "old", per_label=2)
    assert result["labels"]["tempo"] == [] and result["unscored"]["tempo"] == table.num_rows
    assert len(result["labels"]["pq"]) == 2
