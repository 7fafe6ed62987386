"""The dataset report: the numbers a person reads, valid PNG charts, files beside the shards."""
from __future__ import annotations

import base64
import io
import re

import pyarrow as pa

from schemas.pack import MANIFEST_SCHEMA
from tasks.report import build_report, read_report, write_report
from tasks.store import StageStore

CHARTS = ["report-aesthetics.png", "report-bpm.png", "report-durations.png", "report-keys.png",
          "report-languages.png"]


def row(i: int, language: str | None, duration: float, **extra) -> dict:
    base = {name: None for name in MANIFEST_SCHEMA.names}
    base.update(track_id=f"t{i:02d}", uri=f"/audio/{i}.wav", duration=duration, language=language,
                instrumental=language is None, bpm=90.0 + 10 * i, key=["C", "D", "F#"][i % 3],
                scale="major" if i % 2 else "minor", ce=5.0 + i, cu=6.0, pc=4.0, pq=7.0 - i / 10)
    base.update(extra)
    return base


def manifest(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


ROWS = [row(0, "en", 1800.0, lyric_id="l0", caption="a"), row(1, "en", 1800.0), row(2, "en", 3600.0),
        row(3, "fr", 5400.0, caption="b"), row(4, None, 900.0)]
REJECTS = [{"track_id": "t90", "uri": "/audio/a|b.wav", "reason": "filtered: language de not in [en]"},
           {"track_id": "t91", "uri": "/audio/c.wav", "reason": "source_missing: gone"},
           {"track_id": "t92", "uri": "/audio/d.wav", "reason": "filtered: duration 3.0 s < 10"}]
SUMMARY = {"dataset": "demo", "shards": 3, "bytes": 12_500_000, "catalog_tracks": 12, "not_ok_upstream": 4}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_counts_and_hours_by_language():
    md = build_report(manifest(ROWS), REJECTS, SUMMARY).markdown
    assert "tracks packed: **5** (3.75 h) in 3 shards, 12.5 MB" in md
    lang = md.split("## Languages")[1].split("##")[0]
    lines = [ln for ln in lang.splitlines() if ln.startswith("| ") and "language" not in ln]
    assert lines == ["| en | 3 | 2.00 |", "| fr | 1 | 1.50 |", "| instrumental | 1 | 0.25 |"]


def test_keys_tempo_aesthetics_durations_and_rejects():
    md = build_report(manifest(ROWS), REJECTS, SUMMARY).markdown
    keys = md.split("## Keys")[1].split("##")[0]
    assert re.findall(r"\| (\w#? \w+) \| (\d) \|", keys) == [
        ("C major", "1"), ("C minor", "1"), ("D major", "1"), ("D minor", "1"), ("F# minor", "1")]
    assert "5 of 5 tracks have a BPM" in md
    assert "| CE | 5 | 7.00 | 5.00 | 9.00 |" in md
    assert "min 900.0 s, median 1800.0 s, max 5400.0 s" in md
    assert "- matched canonical lyrics: 1" in md and "- captioned: 2" in md and "- instrumental: 1" in md
    assert "| filtered | 2 |" in md and "| source_missing | 1 |" in md
    assert "/audio/a\\|b.wav" in md   # a pipe in a path does not break the table


def test_charts_are_valid_pngs_inlined_for_the_artifact():
    report = build_report(manifest(ROWS), REJECTS, SUMMARY)
    assert sorted(report.charts) == CHARTS
    for name, png in report.charts.items():
        width, height = _png_size(png)
        assert width > 200 and height > 100
        assert f"]({name})" in report.markdown
    inline = report.inline_markdown()
    assert "](report-" not in inline
    uris = re.findall(r"\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inline)
    assert len(uris) == len(CHARTS) and all(_png_size(base64.b64decode(u)) for u in uris)
    again = build_report(manifest(ROWS), REJECTS, SUMMARY)
    assert again.charts == report.charts   # no timestamps in the PNGs


def test_charts_decode_as_images():
    import matplotlib.image

    report = build_report(manifest(ROWS), [], SUMMARY)
    for png in report.charts.values():
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.ndim == 3 and image.shape[2] in (3, 4) and image.std() > 0


def test_empty_dataset_and_missing_stage_columns():
    report = build_report(manifest([]), [], {"dataset": "empty"})
    assert "tracks packed: **0**" in report.markdown and report.charts == {}
    bare = [dict(row(i, "en", 60.0), bpm=None, key=None, ce=None, cu=None, pc=None, pq=None) for i in range(2)]
    report = build_report(manifest(bare), [], {"dataset": "bare"})
    assert "0 of 2 tracks have a BPM" in report.markdown and "0 of 2 tracks have a key" in report.markdown
    assert "## Aesthetics" not in report.markdown
    assert sorted(report.charts) == ["report-durations.png", "report-languages.png"]


def test_written_beside_the_shards_replacing_stale_charts(tmp_path):
    store = StageStore(tmp_path)
    directory = store.path("shards", "demo")
    store.write_bytes(f"{directory}/report-old.png", b"stale")
    store.write_bytes(f"{directory}/shard-000000.tar", b"keep")
    paths = write_report(store, directory, build_report(manifest(ROWS), REJECTS, SUMMARY))
    names = sorted(p.name for p in (tmp_path / "shards" / "demo").iterdir())
    assert names == sorted(["report.md", "shard-000000.tar", *CHARTS])
    assert len(paths) == 1 + len(CHARTS)
    assert (tmp_path / "shards" / "demo" / "report.md").read_text().startswith("# Dataset `demo`")


def test_a_written_report_reads_back_as_the_same_artifact(tmp_path):
    store = StageStore(tmp_path)
    directory = store.path("shards", "demo")
    assert read_report(store, directory) is None
    report = build_report(manifest(ROWS), REJECTS, SUMMARY)
    write_report(store, directory, report)
    again = read_report(store, directory)
    assert again == report and again.inline_markdown() == report.inline_markdown()
