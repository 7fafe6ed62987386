"""Deterministic, atomic WebDataset tar shards: the writer the pack stage (and any stage that
writes shards) uses, and an ordered thread map that keeps encoders ahead of it.

A sample is `<key>.<ext>` members in extension order, with ustar headers that carry no clock
or owner, so the same samples give the same bytes. A shard is written under a hidden
`.tmp-…` name in its directory and renamed to `shard-NNNNNN.tar` once complete: a reader
never sees a partial shard, and a killed writer leaves only a temporary to clean up. Each
shard's size and blake2b are taken from the bytes as they are written (no second read), for
the index that names it; `file_digest` computes the same from a file on disk (acepipe verify).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from tasks.store import StageStore, stream_digest

SHARD_NAME = "shard-{:06d}.tar"
TMP_PREFIX = ".tmp-"
BLOCK = tarfile.BLOCKSIZE      # 512: tar's header and padding unit
RECORD = tarfile.RECORDSIZE    # 10240: an archive is padded to whole records, as tar does


class DigestingWriter:
    """A binary file handle that counts and hashes what goes through it."""

    def __init__(self, fh):
        self.fh, self.size, self._hash = fh, 0, hashlib.blake2b(digest_size=16)

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    def flush(self) -> None:
        self.fh.flush()

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()


def file_digest(store: StageStore, path: str, chunk_mb: int = 4) -> tuple[int, str]:
    """(size, blake2b) of a file on disk: what DigestingWriter recorded when it was written."""
    with store.fs.open(path, "rb") as fh:
        return stream_digest(fh, chunk_mb)


def tar_header(name: str, size: int) -> bytes:
    """A ustar header that depends only on the name and size (no clock, no owner)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def sample_tar_bytes(files: dict[str, bytes]) -> int:
    """What a sample adds to a tar: a header per file plus its data padded to whole blocks."""
    return sum(BLOCK + _padded(len(b)) for b in files.values())


class ShardWriter:
    """Writes samples into `<directory>/shard-NNNNNN.tar`, closing a shard before the sample
    that would take its file past `target_bytes` (a sample bigger than that gets a shard of
    its own). A shard is visible only once complete.

    Headers and data go to the file in one write each (tarfile's addfile copies through a
    16 KiB loop); the bytes are what `tarfile` would write for the same members. Shards are
    numbered from `first` (pack rewrites one damaged shard under its own number); `digests`
    holds (size, blake2b) of each finished shard."""

    def __init__(self, store: StageStore, directory: str, target_bytes: int, first: int = 0):
        self.store, self.directory, self.target_bytes = store, directory, target_bytes
        self.first = first
        self.shards: list[str] = []
        self.digests: dict[str, tuple[int, str]] = {}
        self._fh = None
        self._file = None
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
        size = sample_tar_bytes(files)
        if self._fh is not None and self._bytes > 0 and \
                _padded_archive(self._bytes + size) > self.target_bytes:
            self._finish()
        if self._fh is None:
            self._open()
        for ext in sorted(files):
            data = files[ext]
            self._fh.write(tar_header(f"{key}.{ext}", len(data)))
            self._fh.write(data)
            if len(data) % BLOCK:
                self._fh.write(bytes(BLOCK - len(data) % BLOCK))
        self._bytes += size
        return self.shards[-1]

    def _open(self) -> None:
        name = SHARD_NAME.format(self.first + len(self.shards))
        self._tmp = posixpath.join(self.directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        self._file = self.store.fs.open(self._tmp, "wb")
        self._fh = DigestingWriter(self._file)
        self.shards.append(name)
        self._bytes = 0

    def _finish(self) -> None:
        if self._fh is None:
            return
        self._fh.write(bytes(_padded_archive(self._bytes) - self._bytes))  # end-of-archive blocks
        if self.store.local:
            # On disk before the rename (and before any index that names it): after a power
            # cut the name never points at data that was not written.
            self._file.flush()
            os.fsync(self._file.fileno())
        self._file.close()
        self.store.fs.mv(self._tmp, posixpath.join(self.directory, self.shards[-1]))
        self.digests[self.shards[-1]] = (self._fh.size, self._fh.checksum)
        self._fh = self._file = None

    def _abandon(self) -> None:
        if self._fh is None:
            return
        try:
            self._file.close()
        finally:
            if self.store.fs.exists(self._tmp):
                self.store.fs.rm(self._tmp)
            self.shards.pop()
            self._fh = self._file = None


def damaged_shards(store: StageStore, directory: str, sizes: dict[str, int]) -> dict[str, str]:
    """Shards (name -> recorded size) that are missing or of another size, with why: one stat
    each, cheap enough before every skip (acepipe verify also compares checksums)."""
    damaged = {}
    for shard, size in sorted(sizes.items()):
        try:
            actual = store.fs.size(posixpath.join(directory, shard))
        except FileNotFoundError:
            damaged[shard] = "missing"
            continue
        if actual != size:
            damaged[shard] = f"{actual} bytes, {size} recorded"
    return damaged


def rewrite_shard(store: StageStore, directory: str, shard: str, target_bytes: int,
                  samples: Iterable[tuple[str, dict[str, bytes]]], expected: tuple[int, str]) -> str | None:
    """Write `shard` again under its own number from `samples` ((key, files) in their packed
    order), in a scratch directory, and move it into place only when it has the `expected`
    (size, blake2b): a damaged shard is replaced by the file its index describes or not at all.
    None on success, else why not."""
    scratch = posixpath.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-rewrite")
    number = int(shard.removeprefix("shard-").removesuffix(".tar"))
    try:
        with ShardWriter(store, scratch, target_bytes, first=number) as writer:
            for key, files in samples:
                writer.add(key, files)
        if writer.shards != [shard] or writer.digests[shard] != tuple(expected):
            return "its tracks no longer give the bytes the index recorded"
        store.fs.mv(posixpath.join(scratch, shard), posixpath.join(directory, shard))
        return None
    finally:
        if store.fs.exists(scratch):
            store.fs.rm(scratch, recursive=True)


def _padded_archive(member_bytes: int) -> int:
    """Size of a finished archive: members, two zero blocks, padded to whole records."""
    return -(-(member_bytes + 2 * BLOCK) // RECORD) * RECORD


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


