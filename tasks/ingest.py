"""Ingest (DAG step 1): discover audio under the sources, hash, probe, partition.

track_id is the blake2b hash of the file's bytes, so a copy or a re-upload is the same
track; exact duplicates collapse to one row that keeps every URI. Partitions are
append-only: new tracks go to new partitions, so existing partitions (and every stage
output keyed on them) stay valid. A memo of (uri, size, mtime) -> track_id means a
rerun hashes only new or changed files. Unreadable files become catalog rows with
status 'rejected' and a reason; they never stop the run. A catalogued track none of whose
URIs holds its bytes any more is marked in its catalog row (`source_missing`, or
`source_changed` when a URI now holds other audio), and ok again once a file with its bytes
is back; only URIs under this run's sources are judged, and only partitions whose rows
change are rewritten (see _source_update).
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
import pyarrow as pa

from schemas.common import CATALOG_SCHEMA, SEEN_SCHEMA, STATUS_OK, STATUS_REJECTED, reason_code
from schemas.config import Config
from tasks import audio
from tasks.store import StageStore, stream_digest


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
    # Catalogued tracks whose source went away or came back in this run (not in `rejected`,
    # which counts this run's new tracks only): reason code -> tracks marked, and tracks ok again.
    marked: dict[str, int] = field(default_factory=dict)
    restored: int = 0


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
                # surrogateescape: a non-UTF-8 name on a local or mounted filesystem becomes a
                # reject row like any unreadable file, not a crash of the whole run
                if _wanted(path.encode("utf-8", "surrogateescape"), cfg):
                    url = fs.unstrip_protocol(path)
                    mtime = info.get("mtime") or info.get("LastModified") or 0
                    mtime_ns = int(getattr(mtime, "timestamp", lambda: mtime)() * 1e9)
                    found.append(Found(url.encode("utf-8", "surrogateescape"), int(info.get("size") or 0),
                                       mtime_ns))
            continue
        local = os.fsencode(source[len("file://"):] if source.startswith("file://") else source)
        if not os.path.exists(local):
            raise SourceError(f"source {source!r} does not exist (a directory, URL or .txt list)")
        if os.path.isfile(local) and local.endswith(b".txt"):
            paths = _listed(local)
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


def _listed(list_file: bytes) -> list[bytes]:
    """The paths a .txt list source names (relative ones are relative to the list)."""
    base = os.path.dirname(list_file)
    entries = [line.strip() for line in Path(os.fsdecode(list_file)).read_bytes().splitlines()]
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries if e]


def content_hash(uri_raw: bytes, chunk_mb: int = 4) -> str:
    """blake2b-128 of the bytes, streamed: a 32-char hex id with no dots."""
    text = audio.display_path(uri_raw)
    opener = fsspec.open(text, "rb") if "://" in text else open(uri_raw, "rb")
    with opener as fh:
        return stream_digest(fh, chunk_mb)[1]


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
    t = store.read_table(path, columns=["uri_raw", "bytes", "mtime_ns", "track_id"])
    keys = zip(*(t.column(c).to_pylist() for c in ("uri_raw", "bytes", "mtime_ns")))
    return dict(zip(keys, t.column("track_id").to_pylist()))   # by column: no dict per file


def ingest(cfg: Config, store: StageStore, sources: list[str] | None = None) -> IngestResult:
    """Catalogue what is new under the sources. Holds the store's ingest lock, so runs that
    overlap on one work root append their partitions one after the other."""
    started = time.perf_counter()
    with store.lock("ingest"):
        result = _ingest(cfg, store, sources)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _ingest(cfg: Config, store: StageStore, sources: list[str] | None) -> IngestResult:
    sources = sources if sources is not None else cfg.sources
    found = discover(sources, cfg)
    seen = _load_seen(store)

    def identify(f: Found) -> tuple[Found, str | None, str | None]:
        try:
            return f, content_hash(f.uri_raw, cfg.ingest.hash_chunk_mb), None
        except OSError as exc:
            return f, None, f"unreadable: cannot read the file ({exc.strerror or exc})"

    # Files the memo knows are looked up here; only the others go to the hashing threads (a
    # thread-pool round trip per file cost more than the lookup on a night with nothing new).
    memos = [seen.get((f.uri_raw, f.size, f.mtime_ns)) for f in found]
    with ThreadPoolExecutor(max_workers=max(2, cfg.runner.max_workers)) as pool:
        hashed = iter(list(pool.map(identify, [f for f, memo in zip(found, memos) if not memo])))
    identified = [(f, memo, None) if memo else next(hashed) for f, memo in zip(found, memos)]
    listing = {f.uri: (f, tid, err) for f, tid, err in identified}
    catalog_ids, catalog_uris, updates = _source_updates(store, listing, source_scope(sources))

    new_rows: dict[str, dict] = {}
    duplicates = known = 0
    to_probe: list[tuple[Found, str]] = []
    for f, track_id, error in identified:
        if error is not None and f.uri in catalog_uris:
            known += 1   # a catalogued file that does not read now: its track's row says so
            continue
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

    marked: dict[str, int] = {}
    restored = 0
    for part, changes in sorted(updates.items()):
        table = store.read_catalog(part)
        rows_now = []
        for r in table.to_pylist():
            change = changes.get(r["track_id"], {})
            code, was = reason_code(change.get("reason")), reason_code(r["reason"])
            if change.get("status") == STATUS_REJECTED and code != was:   # newly missing or changed
                marked[code] = marked.get(code, 0) + 1
            elif change.get("status") == STATUS_OK:
                restored += 1
            rows_now.append(dict(r, **change))
        store.write_table(store.catalog_path(part), pa.Table.from_pylist(rows_now, schema=table.schema))

    memo = [{"uri": f.uri, "uri_raw": f.uri_raw, "bytes": f.size, "mtime_ns": f.mtime_ns,
             "track_id": tid} for f, tid, err in identified if tid is not None]
    old = [{"uri": audio.display_path(k[0]), "uri_raw": k[0], "bytes": k[1], "mtime_ns": k[2],
            "track_id": v} for k, v in seen.items()]
    merged = {(r["uri_raw"], r["bytes"], r["mtime_ns"]): r for r in old + memo}
    if len(merged) != len(seen):   # nothing new hashed: leave the memo's file as it is
        store.write_table(store.path("catalog", "seen.parquet"),
                          pa.Table.from_pylist(list(merged.values()), schema=SEEN_SCHEMA))

    rejected: dict[str, int] = {}
    for r in rows:
        if r["status"] != STATUS_OK:
            code = r["reason"].split(":", 1)[0]
            rejected[code] = rejected.get(code, 0) + 1
    return IngestResult(partitions=existing + new_parts, new_partitions=new_parts,
                        found=len(found), new_tracks=len(rows), duplicates=duplicates,
                        known=known, rejected=rejected, marked=marked, restored=restored)


# -- sources that went away or came back ------------------------------------------------------
SOURCE_CODES = ("source_missing", "source_changed")
Listing = dict[str, tuple[Found, str | None, str | None]]   # uri -> (file, track_id, error)


def source_scope(sources: list[str]) -> Callable[[str], bool]:
    """Whether a catalogued URI lies under one of this run's sources (a directory or URL
    prefix, a single file, or a path a .txt list names). A run over a subset of the sources
    cannot tell whether the others' files still exist, so it judges only its own."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            fs, root = fsspec.core.url_to_fs(source)
            top = fs.unstrip_protocol(root).rstrip("/")
        else:
            local = os.fsencode(source.removeprefix("file://"))
            if os.path.isfile(local) and local.endswith(b".txt"):
                exact.update(audio.display_path(os.path.abspath(p)) for p in _listed(local))
                continue
            top = audio.display_path(os.path.abspath(local)).rstrip("/")
        exact.add(top)
        prefixes.append(top + "/")
    return lambda uri: uri in exact or uri.startswith(tuple(prefixes))


def _source_updates(store: StageStore, listing: Listing, in_scope: Callable[[str], bool]
                    ) -> tuple[set[str], set[str], dict[int, dict[str, dict]]]:
    """One pass over the catalog (a few columns, a partition at a time): every track_id, every
    catalogued URI this run found but could not read, and partition -> track_id -> the catalog
    fields to change, for the partitions that have a change."""
    located: dict[str, str] = {}     # track_id -> a uri of this run that holds its bytes
    for uri, (_, tid, _) in listing.items():
        if tid is not None:
            located.setdefault(tid, uri)
    ids: set[str] = set()
    unread: set[str] = set()
    updates: dict[int, dict[str, dict]] = {}
    columns = ["track_id", "status", "reason", "uri", "aliases"]
    for part in store.catalog_partitions():
        for row in store.read_table(store.catalog_path(part), columns=columns).to_pylist():
            ids.add(row["track_id"])
            uris = [row["uri"], *(row["aliases"] or [])]
            unread.update(u for u in uris if u in listing and listing[u][1] is None)
            change = _source_update(row, uris, listing, located, in_scope)
            if change:
                updates.setdefault(part, {})[row["track_id"]] = change
    return ids, unread, updates


def _source_update(row: dict, uris: list[str], listing: Listing, located: dict[str, str],
                   in_scope: Callable[[str], bool]) -> dict | None:
    """The catalog fields to change for one track, or None. A track is there while any of its
    URIs holds its bytes (or the bytes turn up under a new name: moved); a dead alias stays
    listed in `aliases`, and when the primary `uri` is the dead one, a live one takes its place
    so the stages and pack open a file that exists. Bytes found are proof whatever the scope;
    bytes not found prove nothing while a URI lies under a source this run does not list."""
    tid, status = row["track_id"], row["status"]
    if status != STATUS_OK and reason_code(row["reason"]) not in SOURCE_CODES:
        return None          # rejected when probed: that reject stands whatever the file does
    live = [u for u in uris if listing.get(u, (None, None, None))[1] == tid]
    if not live and tid in located:
        live = [located[tid]]
    if live:
        change = {} if status == STATUS_OK else {"status": STATUS_OK, "reason": None}
        # A primary outside this run's sources may be fine: keep it (alternating subset runs
        # must not swap it back and forth), unless the track was missing until now.
        if row["uri"] not in live and (in_scope(row["uri"]) or status != STATUS_OK):
            f = listing[live[0]][0]
            change.update(uri=f.uri, uri_raw=f.uri_raw, aliases=[u for u in uris if u != f.uri])
        return change or None
    if not all(in_scope(u) for u in uris):
        return None          # (also) under a source this run does not list: nothing to judge
    replaced = [u for u in uris if listing.get(u, (None, None, None))[1] is not None]
    unread = [u for u in uris if u in listing and listing[u][0].size >= 0]   # -1: a listed path not there
    if replaced:
        reason = (f"source_changed: {replaced[0]} now holds other audio "
                  f"(new track {listing[replaced[0]][1]})")
    elif unread:
        detail = listing[unread[0]][2].split("(", 1)[-1].removesuffix(")")   # a cause may hold "(...)"
        reason = f"source_missing: {unread[0]} cannot be read ({detail})"
    else:
        others = {1: "", 2: " (nor does its alias)"}.get(len(uris), f" (nor do its {len(uris) - 1} aliases)")
        reason = f"source_missing: {row['uri']} no longer exists{others}"
    if status == STATUS_REJECTED and row["reason"] == reason:
        return None
    return {"status": STATUS_REJECTED, "reason": reason}
