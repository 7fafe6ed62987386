"""Stage 7, pack: the manifest and the WebDataset audio shards of one dataset.

Reads the catalog and every configured stage's output (the current config's stage keys),
keeps tracks that are ok everywhere and pass `pack.filter`, and writes

    shards/<dataset>/shard-NNNNNN.tar   WebDataset: <track_id>.flac, .json (metadata), .txt (lyrics)
    shards/<dataset>/index.parquet      shard, track_id, bytes, duration (written last)
    shards/<dataset>/rejects.parquet    candidates left out at pack time, with reasons
    manifest/<dataset>.parquet          one row per packed track (schemas/pack.py)

Tracks go in track_id order and tar headers carry fixed mtime/owner, so the same inputs and
config give byte-identical shards. Each shard is written under a hidden temporary name and
renamed when complete; the old index is removed before any shard changes, so an index on
disk always describes the shards beside it. Reason codes added here: `filtered` (the pack
filter; detail names the field and threshold), `missing_field` (a required or filtered-on
value is null), and the audio loader's codes for audio that fails to decode at pack time.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import soundfile as sf

from schemas.common import STATUS_OK
from schemas.config import Config, section_dump
from schemas.pack import MANIFEST_SCHEMA, PACK_REJECTS_SCHEMA, SHARD_INDEX_SCHEMA, PackFilter
from tasks.audio import load_track
from tasks.stage import dag_order, stage_keys
from tasks.store import StageStore

SHARD_NAME = "shard-{:06d}.tar"


# -- deterministic, atomic tar shards ---------------------------------------------------------
def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header that depends only on the name and size (no clock, no owner)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples into `<directory>/shard-NNNNNN.tar`, closing a shard before the sample
    that would take it past `target_bytes`. A shard is visible only once complete."""

    def __init__(self, store: StageStore, directory: str, target_bytes: int):
        self.store, self.directory, self.target_bytes = store, directory, target_bytes
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._fh = None
        self._tmp = ""
        self._bytes = 0

    def __enter__(self) -> "ShardWriter":
        self.store.fs.makedirs(self.directory, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finish()
        else:
            self._abandon()

    def add(self, key: str, files: dict[str, bytes]) -> str:
        """Add one sample (`files`: extension -> bytes); returns the shard it went into."""
        if "." in key:
            raise ValueError(f"WebDataset key {key!r} contains a dot (the key ends at the first dot)")
        size = sum(len(b) for b in files.values())
        if self._tar is not None and self._bytes + size > self.target_bytes and self._bytes > 0:
            self._finish()
        if self._tar is None:
            self._open()
        for ext in sorted(files):
            data = files[ext]
            self._tar.addfile(tar_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self._bytes += size
        return self.shards[-1]

    def _open(self) -> None:
        name = SHARD_NAME.format(len(self.shards))
        self._tmp = posixpath.join(self.directory, f".tmp-{uuid.uuid4().hex}-{name}")
        self._fh = self.store.fs.open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append(name)
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._fh.close()
        self.store.fs.mv(self._tmp, posixpath.join(self.directory, self.shards[-1]))
        self._tar = self._fh = None

    def _abandon(self) -> None:
        if self._tar is None:
            return
        try:
            self._fh.close()
        finally:
            if self.store.fs.exists(self._tmp):
                self.store.fs.rm(self._tmp)
            self.shards.pop()
            self._tar = self._fh = None


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """fn over items on `workers` threads, results in input order, at most 2*workers ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, x) for x in islice(it, 2 * workers))
        while pending:
            result = pending.popleft().result()
            for x in islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result


# -- the manifest: join and filter ------------------------------------------------------------
def _get(row: dict, stage: str, field: str):
    return (row.get(stage) or {}).get(field)


def manifest_row(track: dict) -> dict:
    """A catalog row with one dict per stage -> a manifest row (missing stages give nulls)."""
    matched = _get(track, "lyrics", "lyric_id") is not None
    language = (_get(track, "lyrics", "language") if matched else None) or _get(track, "transcribe", "language")
    structure = _get(track, "rhythm", "segments")
    return {
        "track_id": track["track_id"], "uri": track.get("uri"), "partition": track.get("partition"),
        "bytes": track.get("bytes"), "codec": track.get("codec"),
        "source_sample_rate": track.get("sample_rate"), "source_channels": track.get("channels"),
        "duration": _get(track, "probe", "duration") or track.get("duration"),
        "peak_dbfs": _get(track, "probe", "peak_dbfs"), "rms_dbfs": _get(track, "probe", "rms_dbfs"),
        **{k: _get(track, "aesthetics", k) for k in ("ce", "cu", "pc", "pq")},
        "language": language, "transcript": _get(track, "transcribe", "text"),
        "instrumental": _get(track, "transcribe", "instrumental"),
        "lyric_id": _get(track, "lyrics", "lyric_id"), "lyrics_score": _get(track, "lyrics", "score"),
        "lyrics": _get(track, "lyrics", "lyrics") if matched else None,
        "title": _get(track, "lyrics", "title"), "artist": _get(track, "lyrics", "artist"),
        "bpm": _get(track, "rhythm", "bpm"), "key": _get(track, "rhythm", "key"),
        "scale": _get(track, "rhythm", "scale"),
        "structure": [{"start": s.get("start"), "end": s.get("end"), "label": s.get("label")}
                      for s in structure] if structure else None,
        "caption": _get(track, "caption", "description"), "tags": _get(track, "caption", "tags"),
        "shard": None, "flac_bytes": None,
    }


def filter_reason(row: dict, f: PackFilter) -> str | None:
    """None when the row enters the dataset, else a reason string."""
    if row.get("duration") is None:
        return "missing_field: duration is null (neither probe nor the catalog gave one)"
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
    if f.require_lyrics and row.get("lyric_id") is None:
        return "filtered: no matched lyrics and pack.filter.require_lyrics is set"
    if f.min_lyrics_score is not None and row.get("lyric_id") is not None and \
            (row.get("lyrics_score") or 0.0) < f.min_lyrics_score:
        return f"filtered: lyrics score {row.get('lyrics_score') or 0:.2f} < pack.filter.min_lyrics_score"
    if f.languages is not None and not row.get("instrumental"):
        if row.get("language") is None:
            return "missing_field: language is null but pack.filter.languages is set (run transcribe)"
        if row["language"] not in f.languages:
            return f"filtered: language {row['language']} not in pack.filter.languages"
    if f.require_caption and not row.get("caption"):
        return "filtered: no caption and pack.filter.require_caption is set"
    if f.require_bpm and row.get("bpm") is None:
        return "filtered: no tempo and pack.filter.require_bpm is set"
    return None


def candidates(store: StageStore, cfg: Config) -> tuple[list[tuple[dict, dict]], list[dict], dict]:
    """(manifest row, catalog row) of every track kept by all stages and the filter, in
    track_id order; the rows left out by the filter; counts of tracks not kept upstream."""
    order = dag_order(cfg.stages)
    keys = stage_keys(cfg, order)
    kept: list[tuple[dict, dict]] = []
    rejects: list[dict] = []
    upstream = {"catalog_tracks": 0, "not_ok_upstream": 0, "stage_missing": 0}
    for p in store.catalog_partitions():
        catalog = store.read_catalog(p).to_pylist()
        upstream["catalog_tracks"] += len(catalog)
        rows = {r["track_id"]: r for r in catalog if r["status"] == STATUS_OK}
        upstream["not_ok_upstream"] += len(catalog) - len(rows)
        for name in order:
            path = store.stage_path(name, keys[name], p)
            if not store.exists(path):
                upstream["stage_missing"] += len(rows)
                rows = {}
                break
            found = {r["track_id"]: r for r in store.read_table(path).to_pylist()}
            for tid in list(rows):
                up = found.get(tid)
                if up is None or up["status"] != STATUS_OK:
                    upstream["not_ok_upstream"] += 1
                    del rows[tid]
                else:
                    rows[tid][name] = up
        for track in rows.values():
            row = manifest_row(track)
            reason = filter_reason(row, cfg.pack.filter)
            if reason:
                rejects.append({"track_id": row["track_id"], "uri": row["uri"], "reason": reason})
            else:
                kept.append((row, track))
    kept.sort(key=lambda pair: pair[0]["track_id"])
    return kept, rejects, {"keys": keys, **upstream}


# -- samples ----------------------------------------------------------------------------------
def sample_metadata(row: dict, sample_rate: int, channels: int) -> dict:
    """The sample's JSON: the manifest row (minus shard bookkeeping) and the audio format."""
    meta = {k: v for k, v in row.items() if k not in ("shard", "flac_bytes")}
    meta.update(sample_rate=sample_rate, channels=channels, lyrics_text=sample_lyrics(row))
    return meta


def sample_lyrics(row: dict) -> str:
    """Canonical lyrics if matched, else the transcript, else ''."""
    return row.get("lyrics") or row.get("transcript") or ""


def encode_flac(audio: np.ndarray, sr: int, subtype: str) -> bytes:
    """(channels, samples) float32 -> FLAC bytes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.T, -1.0, 1.0), sr, format="FLAC", subtype=subtype)
    return buf.getvalue()


def encode_sample(pair: tuple[dict, dict], cfg: Config) -> tuple[dict, dict[str, bytes] | None, str | None]:
    """Decode the source at the pack rate, encode FLAC; (row, files, None) or (row, None, reason)."""
    row, track = pair
    pc = cfg.pack
    try:
        audio = load_track(track, pc.sample_rate, pc.channels, cfg.audio)
        flac = encode_flac(audio, pc.sample_rate, pc.flac_subtype)
    except Exception as exc:  # noqa: BLE001 - one bad file is a reject row, not a failed pack
        return row, None, getattr(exc, "reason", None) or f"exception: {type(exc).__name__}: {exc}"[:300]
    meta = sample_metadata(row, pc.sample_rate, pc.channels)
    files = {"flac": flac,
             "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=float).encode(),
             "txt": sample_lyrics(row).encode()}
    return row, files, None


def fingerprint(cfg: Config, dataset: str, keys: dict[str, str], track_ids: list[str]) -> str:
    """What decides the shards' bytes: the pack and audio config, the stage keys, the tracks."""
    blob = json.dumps({"dataset": dataset, "pack": section_dump(cfg.pack), "audio": section_dump(cfg.audio),
                       "keys": keys, "tracks": track_ids}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- the whole pack -----------------------------------------------------------------------------
def pack(cfg: Config, dataset: str = "default", store: StageStore | None = None) -> dict:
    """Build manifest, shards, index and rejects for `dataset`. Returns a summary dict."""
    if not dataset or "/" in dataset or dataset.startswith("."):
        raise ValueError(f"dataset name {dataset!r} must be a plain name (no '/', not hidden)")
    started = time.perf_counter()
    store = store or StageStore(cfg.work_root)
    shard_dir = store.path("shards", dataset)
    index_path = posixpath.join(shard_dir, "index.parquet")
    pairs, rejects, upstream = candidates(store, cfg)
    fp = fingerprint(cfg, dataset, upstream["keys"], [r["track_id"] for r, _ in pairs])
    summary = {"dataset": dataset, "work_root": cfg.work_root, "fingerprint": fp, **upstream}

    if store.exists(index_path):
        meta = store.read_table(index_path).schema.metadata or {}
        index = store.read_table(index_path)
        shards = sorted(set(index.column("shard").to_pylist()))
        if meta.get(b"fingerprint", b"").decode() == fp and \
                all(store.exists(posixpath.join(shard_dir, s)) for s in shards):
            manifest = store.read_table(store.path("manifest", f"{dataset}.parquet"))
            return {**summary, "skipped": True, "packed": index.num_rows, "shards": len(shards),
                    "rejected": store.read_table(posixpath.join(shard_dir, "rejects.parquet")).num_rows,
                    "bytes": int(sum(index.column("bytes").to_pylist())),
                    "hours": round(sum(manifest.column("duration").to_pylist()) / 3600, 3),
                    "seconds": round(time.perf_counter() - started, 2)}
        store.fs.rm(index_path)  # from here on no index describes shards that are changing
    _remove_temporaries(store, shard_dir)

    packed: list[dict] = []
    index_rows: list[dict] = []
    with ShardWriter(store, shard_dir, cfg.pack.shard_bytes) as writer:
        for row, files, reason in ordered_map(lambda p: encode_sample(p, cfg), pairs, cfg.pack.workers):
            if reason:
                rejects.append({"track_id": row["track_id"], "uri": row["uri"], "reason": reason})
                continue
            shard = writer.add(row["track_id"], files)
            packed.append(dict(row, shard=shard, flac_bytes=len(files["flac"])))
            index_rows.append({"shard": shard, "track_id": row["track_id"],
                               "bytes": sum(len(b) for b in files.values()), "duration": row["duration"]})
        shards = list(writer.shards)
    _remove_stale_shards(store, shard_dir, set(shards))

    manifest = pa.Table.from_pylist(packed, schema=MANIFEST_SCHEMA).replace_schema_metadata(
        {"stage_keys": json.dumps(upstream["keys"], sort_keys=True), "dataset": dataset, "fingerprint": fp})
    rejects.sort(key=lambda r: r["track_id"])
    store.write_table(store.path("manifest", f"{dataset}.parquet"), manifest)
    store.write_table(posixpath.join(shard_dir, "rejects.parquet"),
                      pa.Table.from_pylist(rejects, schema=PACK_REJECTS_SCHEMA))
    index = pa.Table.from_pylist(index_rows, schema=SHARD_INDEX_SCHEMA).replace_schema_metadata(
        {"fingerprint": fp, "dataset": dataset})
    store.write_table(index_path, index)
    return {**summary, "skipped": False, "packed": len(packed), "shards": len(shards),
            "rejected": len(rejects), "bytes": int(sum(r["bytes"] for r in index_rows)),
            "hours": round(sum(r["duration"] for r in packed) / 3600, 3),
            "seconds": round(time.perf_counter() - started, 2)}


def _list(store: StageStore, directory: str) -> list[str]:
    try:
        return [posixpath.basename(p) for p in store.fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return []


def _remove_temporaries(store: StageStore, shard_dir: str) -> None:
    """Temporaries a killed run left behind (a live run's are never older than this run)."""
    for name in _list(store, shard_dir):
        if name.startswith(".tmp-"):
            store.fs.rm(posixpath.join(shard_dir, name))


def _remove_stale_shards(store: StageStore, shard_dir: str, keep: set[str]) -> None:
    for name in _list(store, shard_dir):
        if name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            store.fs.rm(posixpath.join(shard_dir, name))


def read_manifest(store: StageStore, dataset: str) -> pa.Table:
    path = store.path("manifest", f"{dataset}.parquet")
    if not store.exists(path):
        raise FileNotFoundError(f"{path} not found: run `acepipe pack --dataset {dataset}` first")
    return store.read_table(path)
