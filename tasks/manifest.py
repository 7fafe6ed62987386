"""The manifest's rows (stage 7, pack; see tasks/pack.py): the join of the catalog and every
configured stage's output per partition, a person's overrides in place of the stage values
they correct, and the pack filter that decides which kept tracks enter the dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from typing import Container, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.common import STATUS_OK
from schemas.config import Config
from schemas.pack import RECAPTION_KEYS, PackFilter
from tasks.overrides import apply_overrides
from tasks.stage import dag_order, stage_keys
from tasks.store import StageStore

log = logging.getLogger("acepipe.pack")

# Catalog facts without which a track cannot be decoded or described.
REQUIRED = ("duration", "source_sample_rate", "source_channels", "codec")

# -- the manifest: join and filter ------------------------------------------------------------
# The stage columns the manifest takes: only these are read (beats, words and segments of
# 1.8M tracks would not fit in memory, and the manifest does not carry them). A column that a
# stage output does not have (written before the stage produced it) reads as null.
STAGE_COLUMNS = {
    "probe": ["duration", "peak_dbfs", "rms_dbfs"],
    "aesthetics": ["ce", "cu", "pc", "pq"],
    "transcribe": ["language", "language_prob", "text", "instrumental"],
    "lyrics": ["lyric_id", "score", "language", "title", "artist", "lyrics", "alignment"],
    "rhythm": ["bpm", "bpm_confidence", "meter", "key", "scale", "key_confidence", "segments"],
    "caption": ["description", "tags", "finish_reason", "recaption"],
}


def _get(row: dict, stage: str, field: str):
    return (row.get(stage) or {}).get(field)


def _lyrics_lines(alignment: list[dict] | None) -> list[dict] | None:
    return [{"start": a.get("start"), "end": a.get("end"), "section": a.get("section"), "text": a.get("line")}
            for a in alignment] if alignment else None


def _recaption(recaption: dict | None) -> dict | None:
    return {k: recaption.get(k) for k in RECAPTION_KEYS} if recaption else None


def manifest_row(track: dict) -> dict:
    """A catalog row with one dict per stage -> a manifest row (missing stages give nulls)."""
    matched = _get(track, "lyrics", "lyric_id") is not None
    language = (_get(track, "lyrics", "language") if matched else None) or _get(track, "transcribe", "language")
    structure = _get(track, "rhythm", "segments")
    probe_duration = _get(track, "probe", "duration")
    return {
        "track_id": track["track_id"], "uri": track.get("uri"), "partition": track.get("partition"),
        "bytes": track.get("bytes"), "codec": track.get("codec"),
        "source_sample_rate": track.get("sample_rate"), "source_channels": track.get("channels"),
        "duration": probe_duration if probe_duration is not None else track.get("duration"),
        "peak_dbfs": _get(track, "probe", "peak_dbfs"), "rms_dbfs": _get(track, "probe", "rms_dbfs"),
        **{k: _get(track, "aesthetics", k) for k in ("ce", "cu", "pc", "pq")},
        "language": language, "language_prob": _get(track, "transcribe", "language_prob"),
        "transcript": _get(track, "transcribe", "text"),
        "instrumental": _get(track, "transcribe", "instrumental"),
        "lyric_id": _get(track, "lyrics", "lyric_id"), "lyrics_score": _get(track, "lyrics", "score"),
        "lyrics": _get(track, "lyrics", "lyrics") if matched else None,
        "lyrics_lines": _lyrics_lines(_get(track, "lyrics", "alignment")) if matched else None,
        "title": _get(track, "lyrics", "title"), "artist": _get(track, "lyrics", "artist"),
        "bpm": _get(track, "rhythm", "bpm"), "bpm_confidence": _get(track, "rhythm", "bpm_confidence"),
        "meter": _get(track, "rhythm", "meter"), "key": _get(track, "rhythm", "key"),
        "scale": _get(track, "rhythm", "scale"), "key_confidence": _get(track, "rhythm", "key_confidence"),
        "structure": [{"start": s.get("start"), "end": s.get("end"), "label": s.get("label")}
                      for s in structure] if structure else None,
        "caption": _get(track, "caption", "description"), "tags": _get(track, "caption", "tags"),
        "caption_finish_reason": _get(track, "caption", "finish_reason"),
        "recaption": _recaption(_get(track, "caption", "recaption")), "overridden": [],
        "shard": None, "flac_bytes": None,
    }


def filter_reason(row: dict, f: PackFilter) -> str | None:
    """None when the row enters the dataset, else a reason string."""
    for name in REQUIRED:
        if row.get(name) is None:
            return f"missing_field: {name} is null (the catalog or probe row lacks it; re-run curate)"
    dur = row["duration"]
    if f.min_duration_s is not None and dur < f.min_duration_s:
        return f"filtered: duration {dur:.1f} s < pack.filter.min_duration_s {f.min_duration_s}"
    if f.max_duration_s is not None and dur > f.max_duration_s:
        return f"filtered: duration {dur:.1f} s > pack.filter.max_duration_s {f.max_duration_s}"
    for axis in ("ce", "cu", "pc", "pq"):
        threshold = getattr(f, f"min_{axis}")
        if threshold is None:
            continue
        if row.get(axis) is None:
            return f"missing_field: {axis} is null but pack.filter.min_{axis} is set (run aesthetics)"
        if row[axis] < threshold:
            return f"filtered: {axis} {row[axis]:.2f} < pack.filter.min_{axis} {threshold}"
    if f.require_lyrics:
        if row.get("lyric_id") is None:
            return "filtered: no matched lyrics and pack.filter.require_lyrics is set"
        if not row.get("lyrics"):
            return f"missing_field: lyrics is null for matched lyric_id {row['lyric_id']}"
    if f.min_lyrics_score is not None and row.get("lyric_id") is not None:
        if row.get("lyrics_score") is None:
            return "missing_field: lyrics_score is null but pack.filter.min_lyrics_score is set"
        if row["lyrics_score"] < f.min_lyrics_score:
            return (f"filtered: lyrics score {row['lyrics_score']:.2f} < "
                    f"pack.filter.min_lyrics_score {f.min_lyrics_score}")
    if f.languages is not None and not row.get("instrumental"):
        if row.get("language") is None:
            return "missing_field: language is null but pack.filter.languages is set (run transcribe)"
        if row["language"] not in f.languages:
            return f"filtered: language {row['language']} not in pack.filter.languages {f.languages}"
    if f.require_caption and not row.get("caption"):
        return "filtered: no caption and pack.filter.require_caption is set"
    if f.require_bpm and row.get("bpm") is None:
        return "filtered: no tempo and pack.filter.require_bpm is set"
    return None


def _present(store: StageStore, path: str, wanted: list[str]) -> list[str]:
    """The wanted columns the file has (reading one it lacks would fail, and quarantine a good
    file); all of them when its footer does not read (the read that follows quarantines it)."""
    try:
        with store.fs.open(path, "rb") as fh:
            names = set(pq.read_schema(fh).names)
    except (OSError, pa.ArrowException, ValueError):
        return wanted
    return [c for c in wanted if c in names]


def input_stamps(store: StageStore, cfg: Config) -> dict[int, str]:
    """Per catalog partition, a digest of the files its candidates derive from: its catalog file
    and its output of each configured stage under the current keys (sizes and modification
    times, one listing per directory). Equal stamps, config and overrides: equal candidates."""
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    listings = [store.partition_stamps(store.path("catalog"))]
    listings += [store.partition_stamps(posixpath.dirname(store.stage_path(n, keys[n], 0))) for n in order]
    return {p: hashlib.blake2b(json.dumps([listing.get(p) for listing in listings]).encode(),
                               digest_size=12).hexdigest() for p in sorted(listings[0])}


def candidates(store: StageStore, cfg: Config, overrides: dict[str, dict] | None = None,
               waiting: set[str] | None = None, per_partition: dict | None = None,
               ) -> tuple[list[tuple[dict, dict]], list[dict], dict]:
    """(manifest row, catalog row) of every track kept by all stages and the filter, in
    track_id order; the rows left out by the filter; counts of tracks not kept upstream (see
    `partition_candidates`, which this collects: a full pack orders the whole dataset);
    `per_partition`, when given, receives those counts per partition."""
    kept: list[tuple[dict, dict]] = []
    rejects: list[dict] = []
    upstream: dict = {}
    for part_kept, part_rejects in partition_candidates(store, cfg, overrides, waiting, upstream):
        kept.extend(part_kept)
        rejects.extend(part_rejects)
    kept.sort(key=lambda pair: pair[0]["track_id"])
    counts = upstream.pop("per_partition")
    if per_partition is not None:
        per_partition.update(counts)
    return kept, rejects, upstream


def partition_candidates(store: StageStore, cfg: Config, overrides: dict[str, dict] | None = None,
                         waiting: set[str] | None = None, upstream: dict | None = None,
                         skip: Container[int] = (),
                         ) -> Iterator[tuple[list[tuple[dict, dict]], list[dict]]]:
    """Per catalog partition, in order: the (manifest row, catalog row) of its tracks kept by all
    stages and the filter, in track_id order, and its rows left out, with reasons. Only one
    partition's rows are held at a time. `overrides` ({track_id: {field: value}},
    tasks/overrides.py) replace stage values before the filter looks at them. `waiting`, when
    given, receives the ids of tracks whose partition lacks a stage output (curate has not
    reached it under the current stage keys); `upstream`, when given, receives the stage keys
    and the counts of tracks not kept upstream, also per partition (`per_partition`). Partitions
    in `skip` are not read (pack carries their previous rows)."""
    overrides = overrides or {}
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    counts = upstream if upstream is not None else {}
    counts.update(keys=keys, catalog_tracks=0, not_ok_upstream=0, stage_missing=0, per_partition={})
    for p in store.catalog_partitions():
        if p in skip:
            continue
        before = {k: counts[k] for k in COUNTS}
        yield _partition(store, cfg, order, keys, p, overrides, waiting, counts)
        counts["per_partition"][p] = [counts[k] - before[k] for k in COUNTS]


COUNTS = ("catalog_tracks", "not_ok_upstream", "stage_missing")


def _partition(store: StageStore, cfg: Config, order: list[str], keys: dict[str, str], p: int,
               overrides: dict[str, dict], waiting: set[str] | None, counts: dict,
               ) -> tuple[list[tuple[dict, dict]], list[dict]]:
    """One partition's kept candidates (track_id order) and rejects; counts what it leaves out."""
    catalog = store.read_catalog(p).to_pylist()
    counts["catalog_tracks"] += len(catalog)
    rows = {r["track_id"]: r for r in catalog if r["status"] == STATUS_OK}
    counts["not_ok_upstream"] += len(catalog) - len(rows)
    rejects: list[dict] = []
    for name in order:
        path = store.stage_path(name, keys[name], p)
        if not store.exists(path):  # curate has not reached this partition yet
            counts["stage_missing"] += len(rows)
            if waiting is not None:
                waiting.update(rows)
            rows = {}
            break
        columns = _present(store, path, ["track_id", "status", *STAGE_COLUMNS.get(name, [])])
        table = store.read_table_or_quarantine(path, columns=columns)
        if table is None:   # quarantined: its tracks lack this stage's columns until curate reruns
            reason = (f"stage_unreadable: {posixpath.relpath(path, store.root)} did not read and was "
                      "moved to quarantine/; run `acepipe run` (curate recomputes it), then pack again")
            rejects.extend({"track_id": t["track_id"], "uri": t["uri"], "reason": reason, "partition": p}
                           for t in rows.values())
            rows = {}
            break
        found = {r["track_id"]: r for r in table.to_pylist()}
        for tid in list(rows):
            up = found.get(tid)
            if up is None or up["status"] != STATUS_OK:
                counts["not_ok_upstream"] += 1
                del rows[tid]
            else:
                rows[tid][name] = up
    kept: list[tuple[dict, dict]] = []
    for track in rows.values():
        row = apply_overrides(manifest_row(track), overrides.get(track["track_id"]))
        reason = filter_reason(row, cfg.pack.filter)
        if reason is None and not track.get("uri_raw"):
            reason = "missing_field: uri_raw is null (the catalog row has no path to open)"
        if reason:
            rejects.append({"track_id": row["track_id"], "uri": row["uri"], "reason": reason,
                            "partition": p})
        else:
            kept.append((row, track))
    kept.sort(key=lambda pair: pair[0]["track_id"])
    return kept, rejects
