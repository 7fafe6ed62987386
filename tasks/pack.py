"""Stage 7, pack: the manifest and the WebDataset audio shards of one dataset.

Reads the catalog and every configured stage's output (the current config's stage keys),
puts a person's corrections (overrides/<dataset>.parquet, tasks/overrides.py) in place of the
stage values they correct, keeps tracks that are ok everywhere and pass `pack.filter`, and writes

    shards/<dataset>/shard-NNNNNN.tar   WebDataset: <track_id>.flac, .json (metadata), .txt (lyrics)
    shards/<dataset>/index.parquet      shard, track_id, sizes, digests, tombstone (written last)
    shards/<dataset>/rejects.parquet    candidates left out at pack time, with reasons
    manifest/<dataset>.parquet          one row per packed track (schemas/pack.py)

A first pack (or `--rebuild`) writes the tracks in track_id order (a hash: shards mix sources
evenly); later packs append (tasks/pack_append.py): new and changed tracks go to new shards,
departed ones are tombstoned in the index, and every other shard stays byte-identical, so its
latent shard is not encoded again. Tar headers carry no clock or owner (tasks/shards.py), and a
sample holds only what derives from the track's bytes and stage outputs (not where the file
lies), so the same inputs, overrides and config give byte-identical shards; the overrides'
digest is part of the fingerprint, so a changed override packs again and an unchanged one does
not. A shard is written under a hidden temporary name and renamed when complete. The index is
written last and readers go by it, never by a directory listing: a full pack removes the
previous index, manifest and rejects before any shard changes; an append writes only shards
the index does not name yet (and removes such shards a killed append left). The index records
each shard's size and blake2b as written; a rerun stats every shard, and writes a missing or
resized shard again from its own tracks (kept only if it comes out with the recorded checksum;
else the whole dataset is packed again). Reason codes added here: `filtered` (the pack filter; detail
names the field and threshold), `missing_field` (a required or filtered-on value is null),
`stage_unreadable` (a stage output of the track's partition does not read: it is moved to
quarantine/ and curate recomputes it), `source_missing` and `source_changed` (the file is
gone, or its bytes are no longer the ones ingested), and the audio loader's codes for audio
that fails to decode at pack time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.common import reason_code
from schemas.config import Config, ConfigError, section_dump
from schemas.pack import INDEX_REQUIRED_COLUMNS, MANIFEST_SCHEMA, PACK_REJECTS_SCHEMA, SHARD_INDEX_SCHEMA
from tasks.manifest import COUNTS, candidates, input_stamps, partition_candidates
from tasks.overrides import load_overrides
from tasks.pack_append import (WAITING, IndexLookup, Scan, TrackSet, carry_partitions, copy_previous_rows, copy_spool,
                               departed, live_index, sample_digest, scan, spool_path, updated_index)
from tasks.pack_samples import encode_sample, metadata_files
from tasks.pack_samples import rewrite_damaged as _rewrite_shards
from tasks.shards import TMP_PREFIX, ShardWriter, damaged_shards, ordered_map
from tasks.stage import dag_order, stage_keys
from tasks.store import StageStore, StoreError

log = logging.getLogger("acepipe.pack")

def audio_format(cfg: Config, dataset: str) -> str:
    """What decides a sample's FLAC and the form of its JSON, beside the track's own bytes: the
    dataset, the pack's audio format, the audio config and the manifest's columns. Shards packed
    in another format are not appended to: the dataset is packed whole again."""
    pc = cfg.pack
    blob = json.dumps({"dataset": dataset, "sample_rate": pc.sample_rate, "channels": pc.channels,
                       "flac_subtype": pc.flac_subtype, "audio": section_dump(cfg.audio),
                       "manifest": MANIFEST_SCHEMA.to_string(show_schema_metadata=False)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(cfg: Config, dataset: str, keys: dict[str, str], tracks: str, overrides: str = "") -> str:
    """What decides the pack's outcome: the audio format, the pack config (not the thread count
    or the report switches), the stage keys, the overrides' digest, the tracks (a `TrackSet`
    digest of their ids, no list of 1.8M ids). The index on disk carries it. With no `tracks`,
    the fingerprint of the config alone: with the stamps of the catalog and stage files (one
    listing per directory, `input_stamps`), it tells which partitions a pack need not read."""
    pack_cfg = section_dump(cfg.pack)
    for knob in ("workers", "report", "review_per_label", "enabled"):
        pack_cfg.pop(knob, None)
    blob = json.dumps({"format": audio_format(cfg, dataset), "pack": pack_cfg, "keys": keys,
                       "overrides": overrides, "tracks": tracks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the whole pack -----------------------------------------------------------------------------
def check_dataset_name(dataset: str) -> None:
    if not dataset or "/" in dataset or "\\" in dataset or dataset.startswith("."):
        raise ConfigError(f"dataset name {dataset!r} must be a plain name (no '/', not hidden)")


def require_catalog(store: StageStore) -> None:
    if not store.catalog_partitions():
        raise StoreError(f"no catalog under {store.path('catalog')}: run `acepipe run` on this work "
                         "root before packing")


def pack(cfg: Config, dataset: str = "default", store: StageStore | None = None,
         expect_fingerprint: str | None = None, rebuild: bool = False) -> dict:
    """Build or extend manifest, shards, index and rejects for `dataset`; returns a summary dict.
    Appends to the shards on disk unless `rebuild` (or their audio format changed): see
    tasks/pack_append.py. With `expect_fingerprint` (acepipe verify repairing a pack), refuse
    with a StoreError, before any file changes, when this config and the stage outputs would
    pack other data."""
    check_dataset_name(dataset)
    store = store or StageStore(cfg.work_root)
    require_catalog(store)
    with store.lock(f"pack-{dataset}"):
        return _pack(cfg, dataset, store, expect_fingerprint, rebuild)


def _pack(cfg: Config, dataset: str, store: StageStore, expect_fingerprint: str | None = None,
          rebuild: bool = False) -> dict:
    started = time.perf_counter()
    shard_dir = store.path("shards", dataset)
    paths = {"index": posixpath.join(shard_dir, "index.parquet"),
             "manifest": store.path("manifest", f"{dataset}.parquet"),
             "rejects": posixpath.join(shard_dir, "rejects.parquet")}
    by_track, overrides_digest = load_overrides(store, dataset)
    keys = stage_keys(cfg, dag_order(cfg.stages))
    stamps = input_stamps(store, cfg)
    summary = {"dataset": dataset, "work_root": cfg.work_root, "rewritten": [],
               "overrides": sum(len(f) for f in by_track.values()), "overrides_digest": overrides_digest,
               "mode": "full", "appended": 0, "tombstoned": 0, "removed_now": 0, "new_shards": [], "keys": keys,
               "stamps": stamps, "carried_partitions": 0,
               "config_fingerprint": fingerprint(cfg, dataset, keys, "", overrides_digest)}
    _remove_temporaries(store, shard_dir)
    _remove_temporaries(store, store.path("manifest"), dataset)
    index = None if rebuild else _read_index(store, paths["index"])
    meta = {k.decode(): v.decode() for k, v in (index.schema.metadata or {}).items()} if index is not None else {}
    if index is None or meta.get("format") != audio_format(cfg, dataset):
        return _full(cfg, dataset, store, paths, by_track, expect_fingerprint, summary, started)

    lookup = IndexLookup(index)
    damaged = damaged_shards(store, shard_dir, lookup.shard_sizes())
    complete = meta.get("fingerprint") == _fingerprint_of(store, paths["manifest"]) and \
        _has_partitions(store, paths["rejects"])
    same_config = complete and meta.get("config_fingerprint") == summary["config_fingerprint"]
    previous = json.loads(meta.get("inputs", "{}")) if same_config else {}
    if not damaged and same_config and meta.get("stamps") == _stamps_digest(stamps):   # nothing changed
        summary.update(fingerprint=meta["fingerprint"], inputs={int(p): c[1:] for p, c in previous.items()})
        _before_any_change(dataset, meta["fingerprint"], expect_fingerprint, set())
        summary.update(_counts(summary["inputs"]))
        return _finish(summary, "skip", store.read_table(paths["rejects"]).to_pylist(), lookup.table, started)

    # Partitions whose inputs are as the last pack saw them carry their rows over unread.
    carry = {p for p, stamp in stamps.items() if not damaged and previous.get(str(p), [None])[0] == stamp}
    damaged_rows = lookup.rows_of(set(damaged)) if damaged else []
    waiting: set[str] = set()
    upstream: dict = {}
    unused = set(by_track)
    spool = spool_path(store, dataset)
    try:
        with store.table_writer(spool, MANIFEST_SCHEMA) as writer:
            carried = carry_partitions(store, paths, carry, writer, lookup)
            parts = _claiming(partition_candidates(store, cfg, by_track, waiting, upstream, carry), unused)
            result = scan(parts, lookup, lambda row: sample_digest(metadata_files(row, cfg)), writer,
                          {r["track_id"] for r in damaged_rows})
        result.rejects.extend(carried)
        inputs = {p: previous[str(p)][1:] for p in carry}
        inputs.update({p: [*c, *result.tracks.get(p, TrackSet()).state()]
                       for p, c in upstream.pop("per_partition").items()})
        summary.update(upstream, inputs=inputs, carried_partitions=len(carry), **_counts(inputs),
                       fingerprint=_content_fingerprint(cfg, dataset, keys, inputs, overrides_digest))
        _before_any_change(dataset, summary["fingerprint"], expect_fingerprint, set() if carry else unused)
        problem = _rewrite_shards(cfg, store, shard_dir, damaged, damaged_rows, result.wanted)
        if problem is not None:
            log.warning("pack %s: %s; packing the whole dataset again", dataset, problem)
            return _full(cfg, dataset, store, paths, by_track, None, summary, started)
        summary["rewritten"] = sorted(damaged)
        if meta.get("fingerprint") == summary["fingerprint"] and complete:
            if meta.get("stamps") != _stamps_digest(stamps):   # inputs rewritten with the same content
                _write_index(cfg, dataset, store, paths, lookup.table, summary)
            return _finish(summary, "skip", store.read_table(paths["rejects"]).to_pylist(), lookup.table, started)
        return _append(cfg, dataset, store, paths, lookup, result, waiting, spool, summary, started)
    finally:
        if store.exists(spool):
            store.fs.rm(spool)


def _stamps_digest(stamps: dict[int, str]) -> str:
    return hashlib.sha256(json.dumps({str(p): s for p, s in stamps.items()}, sort_keys=True).encode()).hexdigest()[:16]


def _content_fingerprint(cfg: Config, dataset: str, keys: dict[str, str], inputs: dict[int, list],
                         overrides_digest: str) -> str:
    """The fingerprint over the candidates' ids, from the per-partition TrackSet states in `inputs`."""
    tracks = TrackSet()
    for counts in inputs.values():
        tracks.merge(TrackSet(counts[len(COUNTS):]))
    return fingerprint(cfg, dataset, keys, json.dumps(tracks.state()), overrides_digest)


def _fingerprint_of(store: StageStore, path: str) -> str | None:
    """The fingerprint a table's footer carries (the run that wrote it), or None."""
    if not _reads(store, path):
        return None
    return ((store.read_table(path, columns=[]).schema.metadata or {}).get(b"fingerprint") or b"").decode() or None


def _has_partitions(store: StageStore, path: str) -> bool:
    """The rejects table reads and says each track's partition (an older pack's does not)."""
    if not _reads(store, path):
        return False
    with store.fs.open(path, "rb") as fh:
        return "partition" in pq.read_schema(fh).names


def _counts(inputs: dict[int, list]) -> dict:
    """The summary's upstream counts, summed over the partitions' (`inputs`: counts first)."""
    return {k: sum(c[i] for c in inputs.values()) for i, k in enumerate(COUNTS)}


def _claiming(parts, unused: set[str]):
    """The candidates as they pass, taking each track's id out of `unused` (overrides' tracks)."""
    for kept, rejects in parts:
        for row, _ in kept:
            unused.discard(row["track_id"])
        for r in rejects:
            unused.discard(r["track_id"])
        yield kept, rejects


def _before_any_change(dataset: str, fp: str, expect_fingerprint: str | None, unused: set[str]) -> None:
    if expect_fingerprint is not None and fp != expect_fingerprint:
        raise StoreError(f"dataset {dataset} was packed from other inputs than this config and the stage "
                         f"outputs give now (fingerprint {expect_fingerprint}, now {fp}): if stage outputs "
                         "were quarantined run `acepipe run` first; then `acepipe pack --dataset "
                         f"{dataset}` with the config that packed it")
    if unused:   # set for a track that no stage kept, or not yet processed: said, not silently dropped
        log.warning("pack %s: overrides of %d track(s) not kept upstream apply to nothing: %s", dataset,
                    len(unused), ", ".join(sorted(unused)[:5]))


def _write_samples(cfg: Config, store: StageStore, shard_dir: str, pairs: list[tuple[dict, dict]],
                   rejects: list[dict], first: int) -> tuple[list[dict], list[dict]]:
    """Encode and write `pairs` into shards numbered from `first`; (manifest rows, index rows).
    A track that fails to encode becomes a row of `rejects`."""
    packed: list[dict] = []
    index_rows: list[dict] = []
    with ShardWriter(store, shard_dir, cfg.pack.shard_bytes, first=first) as writer:
        for row, files, reason in ordered_map(lambda p: encode_sample(p, cfg), pairs, cfg.pack.workers):
            if reason:
                rejects.append({"track_id": row["track_id"], "uri": row["uri"], "reason": reason,
                                "partition": row.get("partition")})
                continue
            shard = writer.add(row["track_id"], files)
            packed.append(dict(row, shard=shard, flac_bytes=len(files["flac"])))
            index_rows.append({"shard": shard, "track_id": row["track_id"],
                               "bytes": sum(len(b) for b in files.values()), "duration": row["duration"],
                               "flac_bytes": len(files["flac"]), "sample_blake2b": sample_digest(files),
                               "removed": None})
    for r in index_rows:
        r["shard_bytes"], r["shard_blake2b"] = writer.digests[r["shard"]]
    return packed, index_rows


def _full(cfg: Config, dataset: str, store: StageStore, paths: dict[str, str], by_track: dict[str, dict],
          expect_fingerprint: str | None, summary: dict, started: float) -> dict:
    """Every live track again, in track_id order from shard-000000, no tombstones (compaction)."""
    per_partition: dict = {}
    pairs, rejects, upstream = candidates(store, cfg, by_track, per_partition=per_partition)
    tracks: dict[int, TrackSet] = {}
    for row, _ in pairs:
        tracks.setdefault(row["partition"], TrackSet()).add(row["track_id"])
    inputs = {p: [*c, *tracks.get(p, TrackSet()).state()] for p, c in per_partition.items()}
    summary.update(upstream, inputs=inputs, carried_partitions=0,
                   fingerprint=_content_fingerprint(cfg, dataset, upstream["keys"], inputs, summary["overrides_digest"]))
    unused = set(by_track) - {r["track_id"] for r, _ in pairs} - {r["track_id"] for r in rejects}
    _before_any_change(dataset, summary["fingerprint"], expect_fingerprint, unused)
    # From here on no index, manifest or rejects describes shards that are about to change.
    for path in paths.values():
        if store.exists(path):
            store.fs.rm(path)
    shard_dir = posixpath.dirname(paths["index"])
    packed, index_rows = _write_samples(cfg, store, shard_dir, pairs, rejects, first=0)
    _remove_stale_shards(store, shard_dir, {r["shard"] for r in index_rows})
    store.write_table(paths["manifest"], pa.Table.from_pylist(packed, schema=_manifest_schema(dataset, summary)))
    index = pa.Table.from_pylist(index_rows, schema=SHARD_INDEX_SCHEMA)
    _write_rejects_and_index(cfg, dataset, store, paths, rejects, index, summary)
    summary["appended"] = len(packed)
    return _finish(summary, "full", rejects, index, started)


def _append(cfg: Config, dataset: str, store: StageStore, paths: dict[str, str], lookup: IndexLookup,
            result: Scan, waiting: set[str], spool: str, summary: dict, started: float) -> dict:
    """New and changed tracks into new shards; departed ones tombstoned; the rest untouched."""
    shard_dir = posixpath.dirname(paths["index"])
    # Shards a killed append left beside the index: not in it, so not in the dataset.
    _remove_stale_shards(store, shard_dir, set(lookup.shard_sizes()))
    pending = departed(lookup, result, waiting)
    packed, new_rows = _write_samples(cfg, store, shard_dir, result.append, result.rejects,
                                      first=lookup.next_shard_number())
    with store.table_writer(paths["manifest"], _manifest_schema(dataset, summary)) as writer:
        copy_spool(store, spool, writer)
        found = copy_previous_rows(store, paths["manifest"], pending, writer)
        if packed:
            writer.write_table(pa.Table.from_pylist(packed, schema=MANIFEST_SCHEMA))
    for pos in np.flatnonzero(lookup.live & ~lookup.seen):   # pending without a previous row: it leaves
        if int(pos) not in result.tombstones and lookup.value("track_id", pos) not in found:
            result.tombstones[int(pos)] = WAITING
    appended_to = {r["track_id"]: r["shard"] for r in new_rows}
    index = updated_index(lookup, result.tombstones, appended_to, new_rows, SHARD_INDEX_SCHEMA)
    _write_rejects_and_index(cfg, dataset, store, paths, result.rejects, index, summary)
    summary.update(appended=len(packed), removed_now=len(result.tombstones),
                   new_shards=sorted({r["shard"] for r in new_rows}))
    return _finish(summary, "append", result.rejects, index, started)


def _manifest_schema(dataset: str, summary: dict) -> pa.Schema:
    return MANIFEST_SCHEMA.with_metadata({"stage_keys": json.dumps(summary["keys"], sort_keys=True),
                                          "dataset": dataset, "fingerprint": summary["fingerprint"],
                                          "overrides": summary["overrides_digest"]})


def _write_rejects_and_index(cfg: Config, dataset: str, store: StageStore, paths: dict[str, str],
                             rejects: list[dict], index: pa.Table, summary: dict) -> None:
    """Rejects, then the index: last, its presence says the shards and manifest are complete."""
    rejects.sort(key=lambda r: r["track_id"])
    store.write_table(paths["rejects"], pa.Table.from_pylist(rejects, schema=PACK_REJECTS_SCHEMA))
    _write_index(cfg, dataset, store, paths, index, summary)


def _write_index(cfg: Config, dataset: str, store: StageStore, paths: dict[str, str], index: pa.Table,
                 summary: dict) -> None:
    """The index with what the next pack compares: fingerprints, the stamps of the inputs, and per
    partition [stamp, upstream counts, TrackSet state]."""
    stamps = summary["stamps"]
    inputs = {str(p): [stamps.get(p), *c] for p, c in summary["inputs"].items()}
    store.write_table(paths["index"], index.replace_schema_metadata(
        {"fingerprint": summary["fingerprint"], "config_fingerprint": summary["config_fingerprint"],
         "stamps": _stamps_digest(stamps), "dataset": dataset, "format": audio_format(cfg, dataset),
         "inputs": json.dumps(inputs, sort_keys=True)}))


def _finish(summary: dict, mode: str, rejects: list[dict], index: pa.Table, started: float) -> dict:
    live = live_index(index)
    summary = {k: v for k, v in summary.items() if k not in ("stamps", "inputs")}   # per partition: for the index
    return {**summary, "mode": mode, "skipped": mode == "skip" and not summary["rewritten"],
            "packed": live.num_rows, "shards": len(pc.unique(index["shard"])),
            "tombstoned": index.num_rows - live.num_rows,
            "rejected": len(rejects), "reasons": dict(Counter(reason_code(r["reason"]) for r in rejects)),
            "bytes": int(pc.sum(live["bytes"]).as_py() or 0),
            "hours": round((pc.sum(live["duration"]).as_py() or 0.0) / 3600, 3),
            "seconds": round(time.perf_counter() - started, 2)}


def _read_index(store: StageStore, index_path: str) -> pa.Table | None:
    """The index on disk, or None when there is none, it does not read (a power cut can
    leave a renamed file without its data) or it lacks the shard sizes and checksums (an
    older version wrote it): in each case the pack is rebuilt."""
    if not store.exists(index_path):
        return None
    try:
        index = store.read_table(index_path)
    except (OSError, pa.ArrowInvalid):
        return None
    return index if all(c in index.column_names for c in INDEX_REQUIRED_COLUMNS) else None


def _reads(store: StageStore, path: str) -> bool:
    return store.exists(path) and store.unreadable(path) is None


def _remove_temporaries(store: StageStore, directory: str, dataset: str | None = None) -> None:
    """Temporaries a killed run left behind (the pack lock keeps live runs out): every one in a
    shard directory; in the shared manifest directory, only this dataset's."""
    own = re.compile(rf"^\.tmp-(spool-)?[0-9a-f]{{32}}-{re.escape(dataset)}\.parquet$") if dataset else None
    for name in store.listdir(directory):
        if name.startswith(TMP_PREFIX) and (own is None or own.match(name)):
            store.fs.rm(posixpath.join(directory, name), recursive=True)


def _remove_stale_shards(store: StageStore, shard_dir: str, keep: set[str]) -> None:
    for name in store.listdir(shard_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            store.fs.rm(posixpath.join(shard_dir, name))


def read_manifest(store: StageStore, dataset: str, columns: list[str] | None = None) -> pa.Table:
    path = store.path("manifest", f"{dataset}.parquet")
    if not store.exists(path):
        raise FileNotFoundError(f"{path} not found: run `acepipe pack --dataset {dataset}` first")
    return store.read_table(path, columns=columns)
