"""The stage store: every output of the pipeline under one work root (local path or fsspec URL).

    catalog/part-NNNNN.parquet                 ingest output (append-only partitions)
    catalog/seen.parquet                       (uri, size, mtime) -> track_id memo of ingest
    stages/<stage>/<key>/part-NNNNN.parquet    one file per partition and stage key
    reports/curate-rejects.parquet             every rejected track and why (curate's summary)
    quarantine/<relative path>.<stamp>         outputs that did not read, moved aside (see quarantine())
    manifest/, shards/, latents/, runs/        pack, latents and training outputs

A file exists complete or not at all: writes go to a hidden temporary name in the same
directory and are renamed into place. The store's keys, not Prefect's result cache,
decide what runs. Parquet outputs carry page checksums (Parquet's own CRC32), so a file
damaged after it was written is found by reading it, without a second checksum file; one that
does not read is moved to quarantine/ and treated as missing, so the work that made it reruns.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import socket
import time
import re
import uuid
from pathlib import Path

import logging

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("acepipe.store")
PART_RE = re.compile(r"part-(\d{5,})\.parquet$")


def stream_digest(fh, chunk_mb: int = 4) -> tuple[int, str]:
    """(bytes read, blake2b-128 hex) of an open binary file, streamed: the one content hash of
    the project (track ids, shard and latent-shard checksums)."""
    digest, size = hashlib.blake2b(digest_size=16), 0
    while chunk := fh.read(chunk_mb * 2**20):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class StoreError(RuntimeError):
    """The work root cannot be used; the message says which path and why."""


class StageStore:
    def __init__(self, root: str | Path):
        self.url = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    # -- paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def catalog_path(self, partition: int) -> str:
        return self.path("catalog", f"part-{partition:05d}.parquet")

    def stage_path(self, stage: str, key: str, partition: int) -> str:
        return self.path("stages", stage, key, f"part-{partition:05d}.parquet")

    def check_writable(self) -> None:
        """Fail before any work if the root cannot be created or written."""
        probe = self.path(f".write-test-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as fh:
                fh.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError) as exc:
            raise StoreError(f"work root {self.url!r} is not writable: {exc}") from None

    # -- atomic writes -----------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write to a temporary sibling, then rename: readers never see a partial file."""
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def write_table(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", write_page_checksum=True)
        self.write_bytes(path, buf.getvalue())

    @contextlib.contextmanager
    def table_writer(self, path: str, schema: pa.Schema):
        """A Parquet writer for a table too big to hold in memory (`write_table` takes whole
        tables): row groups stream to a temporary sibling, renamed to `path` when the block
        ends without an error; on an error the temporary is removed."""
        parent = posixpath.dirname(path)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            with self.fs.open(tmp, "wb") as fh:
                with pq.ParquetWriter(fh, schema, compression="zstd", write_page_checksum=True) as writer:
                    yield writer
            self.fs.mv(tmp, path)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns, page_checksum_verification=True)

    # -- damaged outputs -----------------------------------------------------------------
    def unreadable(self, path: str, full: bool = False) -> str | None:
        """Why a Parquet output does not read (None when it does). The default reads only the
        footer (a few KB: catches truncation and garbage, cheap enough before every skip);
        `full` reads every page against its checksum (acepipe verify)."""
        try:
            with self.fs.open(path, "rb") as fh:
                if full:
                    pq.read_table(fh, page_checksum_verification=True)
                else:
                    pq.read_metadata(fh)
        except FileNotFoundError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return None

    def quarantine(self, path: str, why: str) -> str:
        """Move a damaged output to quarantine/<its relative path>.<UTC stamp>, so readers see
        it missing and the run that needs it recomputes it; the file is kept for a person to
        look at. Returns where it went."""
        rel = posixpath.relpath(path, self.root)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest = self.path("quarantine", f"{rel}.{stamp}-{uuid.uuid4().hex[:6]}")
        self.fs.makedirs(posixpath.dirname(dest), exist_ok=True)
        self.fs.mv(path, dest)
        log.warning("quarantined %s (%s) -> %s; it will be recomputed", path, why, dest)
        return dest

    def read_table_or_quarantine(self, path: str, columns: list[str] | None = None) -> pa.Table | None:
        """The table at `path`, or None when it is missing or does not read (then quarantined)."""
        try:
            return self.read_table(path, columns=columns)
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError, ValueError) as exc:
            self.quarantine(path, f"{type(exc).__name__}: {str(exc)[:200]}")
            return None

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as fh:
            return fh.read()

    def listdir(self, directory: str) -> list[str]:
        """Names (not paths) directly under a directory; [] when it does not exist."""
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(directory, detail=False)]
        except FileNotFoundError:
            return []

    def glob_partitions(self, directory: str) -> list[int]:
        try:
            names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        parts = []
        for name in names:
            m = PART_RE.search(posixpath.basename(name))
            if m:
                parts.append(int(m.group(1)))
        return sorted(parts)

    def partition_stamps(self, directory: str) -> dict[int, str]:
        """Per partition file in a directory, what changes when the file is written again: its
        size and modification time (or ETag on an object store), from one listing."""
        try:
            entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        stamps = {}
        for e in entries:
            m = PART_RE.search(posixpath.basename(e["name"]))
            if m:
                when = e.get("mtime") or e.get("LastModified") or e.get("created") or ""
                stamps[int(m.group(1))] = f"{e.get('size')}:{when}:{e.get('ETag', '')}"
        return stamps

    # -- a lock for work that must not overlap (ingest appends partitions) -------------
    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = 600.0, poll_s: float = 0.5):
        """An exclusive lock file under the root, so two runs on one work root never both append
        partition N: an O_EXCL create on a local disk, a conditional create (If-None-Match: *)
        on an object store. A lock left by a dead process on this host is broken."""
        path = self.path(f".lock-{name}")
        self.fs.makedirs(self.root, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        told = False
        while not self._create_exclusive(path, me):
            if self._stale(path):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(path)
                continue
            if time.monotonic() > deadline:
                raise StoreError(f"{self.url}/.lock-{name} is held by another run ({self._owner(path)}) for "
                                 f"over {timeout_s:.0f} s; if no run is active, delete the file")
            if not told:     # a run that waits says for whom, once
                log.warning("waiting for the %s lock of %s, held by %s", name, self.url, self._owner(path))
                told = True
            time.sleep(poll_s)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path)

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists (then False), atomically."""
        try:
            if self.local:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            else:
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError) as exc:   # a filesystem without exclusive create
            raise StoreError(f"work root {self.url!r}: {type(self.fs).__name__} cannot create a file "
                             f"only if it is absent ({exc}), so two runs could both append a partition; "
                             "use a local path or an S3 store that honours If-None-Match") from None
        return True

    def _read_owner(self, path: str) -> dict | None:
        """The lock file's {pid, host, since}; None while it is being written (or just went)."""
        try:
            return json.loads(self.fs.cat_file(path))
        except (OSError, ValueError):
            return None

    def _owner(self, path: str) -> str:
        owner = self._read_owner(path)
        if owner is None:
            return "a run starting right now"
        return f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since', '?')}"

    def _stale(self, path: str) -> bool:
        owner = self._read_owner(path)
        if owner is None:
            return False  # being written right now
        if owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    # -- catalog and stage outputs ---------------------------------------------------------
    def catalog_partitions(self) -> list[int]:
        return self.glob_partitions(self.path("catalog"))

    def read_catalog(self, partition: int | None = None) -> pa.Table:
        parts = self.catalog_partitions() if partition is None else [partition]
        tables = [self.read_table(self.catalog_path(p)) for p in parts]
        if not tables:
            from schemas.common import CATALOG_SCHEMA

            return CATALOG_SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def stage_keys_on_disk(self, stage: str) -> list[str]:
        try:
            return [posixpath.basename(p) for p in self.fs.ls(self.path("stages", stage), detail=False)]
        except FileNotFoundError:
            return []

    def read_stage(self, stage: str, key: str, partition: int,
                   columns: list[str] | None = None) -> pa.Table:
        return self.read_table(self.stage_path(stage, key, partition), columns=columns)

    def joined_rows(self, partition: int, upstream: dict[str, str]) -> list[dict]:
        """Catalog rows of a partition, each with a dict per upstream stage under its name.

        Only tracks whose catalog row and every upstream row have status 'ok' are
        returned: downstream stages run on kept tracks only.
        """
        catalog = self.read_catalog(partition).to_pylist()
        rows = {r["track_id"]: r for r in catalog if r["status"] == "ok"}
        for stage, key in upstream.items():
            found = {r["track_id"]: r for r in self.read_stage(stage, key, partition).to_pylist()}
            for tid in list(rows):
                up = found.get(tid)
                if up is None or up["status"] != "ok":
                    del rows[tid]
                else:
                    rows[tid][stage] = up
        return list(rows.values())
