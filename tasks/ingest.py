"""Ingest (DAG step 1): discover audio under the sources, hash, probe, partition.

track_id is the blake2b hash of the file's bytes, so a copy or a re-upload is the same
track; exact duplicates collapse to one row that keeps every URI. Partitions are
append-only: new tracks go to new partitions, so existing partitions (and every stage
output keyed on them) stay valid. A memo of (uri, size, mtime) -> track_id means a
rerun hashes only new or changed files. Unreadable files become catalog rows with
status 'rejected' and a reason; they never stop the run.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pyarrow as pa

from schemas.common import CATALOG_SCHEMA, SEEN_SCHEMA, STATUS_OK, STATUS_REJECTED
from schemas.config import Config
from tasks import audio
from tasks.store import StageStore


class SourceError(ValueError):
    """A source that does not exist or cannot be listed."""


@dataclass
class Found:
    uri_raw: bytes           # exact bytes of the local path or URL
    size: int
    mtime_ns: int

    @property
    def uri(self) -> str:
        return audio.display_path(self.uri_raw)


@dataclass
class IngestResult:
    partitions: list[int]
    new_partitions: list[int]
    found: int
    new_tracks: int
    duplicates: int
    known: int
    rejected: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0     # wall time of the ingest, waiting for the lock included


def _wanted(name: bytes, cfg: Config) -> bool:
    lower = name.lower()
    return any(lower.endswith(ext.lower().encode()) for ext in cfg.ingest.extensions)


def check_sources(sources: list[str]) -> None:
    """Fail at once, naming the source, if one does not exist."""
    if not sources:
        raise SourceError("no sources configured: pass --source DIR or set `sources` in the config")
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            fs, root = fsspec.core.url_to_fs(source)
            exists = fs.exists(root)
        else:
            exists = os.path.exists(os.fsencode(source.removeprefix("file://")))
        if not exists:
            raise SourceError(f"source {source!r} does not exist (a directory, URL or .txt list)")


def discover(sources: list[str], cfg: Config) -> list[Found]:
    """Every audio file under the sources: directories, fsspec URLs, or .txt file lists."""
    found: list[Found] = []
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            fs, root = fsspec.core.url_to_fs(source)
            if not fs.exists(root):
                raise SourceError(f"source {source!r} does not exist")
            for path, info in sorted(fs.find(root, detail=True).items()):
                if _wanted(path.encode(), cfg):
                    url = fs.unstrip_protocol(path)
                    mtime = info.get("mtime") or info.get("LastModified") or 0
                    mtime_ns = int(getattr(mtime, "timestamp", lambda: mtime)() * 1e9)
                    found.append(Found(url.encode(), int(info.get("size") or 0), mtime_ns))
            continue
        local = os.fsencode(source[len("file://"):] if source.startswith("file://") else source)
        if not os.path.exists(local):
            raise SourceError(f"source {source!r} does not exist (a directory, URL or .txt list)")
        if os.path.isfile(local) and local.endswith(b".txt"):
            base = os.path.dirname(local)
            entries = [line.strip() for line in Path(os.fsdecode(local)).read_bytes().splitlines()]
            paths = [e if os.path.isabs(e) else os.path.join(base, e) for e in entries if e]
        elif os.path.isfile(local):
            paths = [local]
        else:
            paths = []
            for dirpath, dirnames, filenames in os.walk(local):  # bytes: non-UTF-8 names survive
                dirnames.sort()
                paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _wanted(f, cfg))
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                found.append(Found(os.path.abspath(p), -1, 0))
                continue
            found.append(Found(os.path.abspath(p), st.st_size, st.st_mtime_ns))
    return found


def content_hash(uri_raw: bytes, chunk_mb: int = 4) -> str:
    """blake2b-128 of the bytes, streamed: a 32-char hex id with no dots."""
    digest = hashlib.blake2b(digest_size=16)
    text = audio.display_path(uri_raw)
    opener = fsspec.open(text, "rb") if "://" in text else open(uri_raw, "rb")
    with opener as fh:
        while chunk := fh.read(chunk_mb * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _probe_row(f: Found, track_id: str, cfg: Config) -> dict:
    row = {"track_id": track_id, "uri": f.uri, "uri_raw": f.uri_raw, "aliases": [],
           "bytes": f.size, "status": STATUS_OK, "reason": None}
    try:
        info = audio.probe(f.uri_raw, cfg.audio)
        row.update(duration=info.duration, sample_rate=info.sample_rate,
                   channels=info.channels, codec=info.codec)
    except audio.AudioError as exc:
        row.update(status=STATUS_REJECTED, reason=exc.reason)
    return row


def _load_seen(store: StageStore) -> dict[tuple[bytes, int, int], str]:
    path = store.path("catalog", "seen.parquet")
    if not store.exists(path):
        return {}
    t = store.read_table(path).to_pylist()
    return {(r["uri_raw"], r["bytes"], r["mtime_ns"]): r["track_id"] for r in t}


def ingest(cfg: Config, store: StageStore, sources: list[str] | None = None) -> IngestResult:
    """Catalogue what is new under the sources. Holds the store's ingest lock, so runs that
    overlap on one work root append their partitions one after the other."""
    started = time.perf_counter()
    with store.lock("ingest"):
        result = _ingest(cfg, store, sources)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _ingest(cfg: Config, store: StageStore, sources: list[str] | None) -> IngestResult:
    found = discover(sources if sources is not None else cfg.sources, cfg)
    seen = _load_seen(store)
    catalog_ids = set(store.read_catalog().column("track_id").to_pylist())

    def identify(f: Found) -> tuple[Found, str | None, str | None]:
        memo = seen.get((f.uri_raw, f.size, f.mtime_ns))
        if memo:
            return f, memo, None
        try:
            return f, content_hash(f.uri_raw, cfg.ingest.hash_chunk_mb), None
        except OSError as exc:
            return f, None, f"unreadable: cannot read the file ({exc.strerror or exc})"

    with ThreadPoolExecutor(max_workers=max(2, cfg.runner.max_workers)) as pool:
        identified = list(pool.map(identify, found))

    new_rows: dict[str, dict] = {}
    duplicates = known = 0
    to_probe: list[tuple[Found, str]] = []
    for f, track_id, error in identified:
        if error is not None:
            # No bytes, no content hash: key the reject by its path so it is still counted.
            track_id = hashlib.blake2b(f.uri_raw, digest_size=16).hexdigest()
            if track_id in catalog_ids:   # rejected by an earlier run: one row, not one per run
                known += 1
                continue
            new_rows.setdefault(track_id, {"track_id": track_id, "uri": f.uri, "uri_raw": f.uri_raw,
                                           "aliases": [], "bytes": f.size,
                                           "status": STATUS_REJECTED, "reason": error})
            continue
        if track_id in catalog_ids:
            known += 1
            continue
        if track_id in new_rows:
            duplicates += 1
            new_rows[track_id]["aliases"].append(f.uri)
            continue
        new_rows[track_id] = {"aliases": []}
        to_probe.append((f, track_id))

    with ThreadPoolExecutor(max_workers=max(2, cfg.runner.max_workers)) as pool:
        for row in pool.map(lambda ft: _probe_row(ft[0], ft[1], cfg), to_probe):
            aliases = new_rows[row["track_id"]].get("aliases", [])
            row["aliases"] = aliases
            new_rows[row["track_id"]] = row

    existing = store.catalog_partitions()
    next_part = (existing[-1] + 1) if existing else 0
    rows = list(new_rows.values())
    new_parts = []
    size = cfg.ingest.partition_size
    for start in range(0, len(rows), size):
        part = next_part + start // size
        chunk = [dict(r, partition=part) for r in rows[start:start + size]]
        store.write_table(store.catalog_path(part), pa.Table.from_pylist(chunk, schema=CATALOG_SCHEMA))
        new_parts.append(part)

    memo = [{"uri": f.uri, "uri_raw": f.uri_raw, "bytes": f.size, "mtime_ns": f.mtime_ns,
             "track_id": tid} for f, tid, err in identified if tid is not None]
    old = [{"uri": audio.display_path(k[0]), "uri_raw": k[0], "bytes": k[1], "mtime_ns": k[2],
            "track_id": v} for k, v in seen.items()]
    merged = {(r["uri_raw"], r["bytes"], r["mtime_ns"]): r for r in old + memo}
    store.write_table(store.path("catalog", "seen.parquet"),
                      pa.Table.from_pylist(list(merged.values()), schema=SEEN_SCHEMA))

    rejected: dict[str, int] = {}
    for r in rows:
        if r["status"] != STATUS_OK:
            code = r["reason"].split(":", 1)[0]
            rejected[code] = rejected.get(code, 0) + 1
    return IngestResult(partitions=existing + new_parts, new_partitions=new_parts,
                        found=len(found), new_tracks=len(rows), duplicates=duplicates,
                        known=known, rejected=rejected)
