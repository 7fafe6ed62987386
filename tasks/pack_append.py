"""Pack's incremental path (stage 7, see tasks/pack.py): shards are append-only.

A nightly pack over a corpus that grew by 1% must not rewrite the other 99%: every latent shard
is keyed by its audio shard's contents, so a rewritten audio shard is re-encoded too. So, once a
dataset has an index in the current audio format, a pack compares each candidate with the
sample the shards already hold for it (by the blake2b of the sample's metadata, the .json and
.txt, which derive from the manifest row; the FLAC derives from the track's bytes and the audio
format, both fixed) and:
  - keeps a sample whose metadata is unchanged where it lies (its manifest row is the new one:
    where a file lies, uri and partition, is not in the sample);
  - appends new tracks, and tracks whose metadata changed (a stage output, an override), to new
    shards numbered after the last one, in track_id order;
  - tombstones the old sample of a changed track, and the sample of a track that left the
    dataset (the filter, a stage that no longer keeps it): its index row stays, with `removed`
    set to why. The manifest, the latents index (and so the trainer) and the exports read live
    rows only;
  - leaves a track whose partition waits for a stage output (curate has not reached it under
    the current stage keys) live with its previous manifest row, so a pack between a stage
    version bump and the end of curate does not tombstone the dataset.
Work and memory follow what changed: a partition whose catalog and stage files (their sizes and
times, one listing per directory) are as the last pack saw them, under the same config and
overrides, is not read: its previous manifest rows and rejects are carried over (an empty night
only lists). Other partitions are read one at a time, the manifest rows of kept samples stream
to a spool file, and the index stays an Arrow table looked up by position (one dict of
track_id -> row, no dict per row).
A full pack (`acepipe pack --rebuild`, a changed audio format, an index that does not read)
writes every live track again in track_id order and drops the tombstones: compaction.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.pack import MANIFEST_SCHEMA
from tasks.store import StageStore

SHARD_NUMBER = re.compile(r"^shard-(\d{6})\.tar$")
CHANGED = "changed: its metadata changed since it was packed (a stage output or an override); packed again in {}"
NOT_KEPT = ("not_kept: no longer kept by every stage (rejected or failed upstream, or its catalog row "
            "is gone); see curate's rejects")
WAITING = "stage_missing: its partition waits for a stage output; run `acepipe run`, then pack again"


def sample_digest(files: dict[str, bytes]) -> str:
    """blake2b-128 of a sample's metadata files (.json and .txt), as the index records it."""
    h = hashlib.blake2b(digest_size=16)
    for ext in ("json", "txt"):
        h.update(ext.encode() + b"\0" + files[ext] + b"\0")
    return h.hexdigest()


def live_index(index: pa.Table) -> pa.Table:
    """The index rows of samples in the dataset (no tombstone), in index order."""
    if "removed" not in index.column_names:
        return index
    return index.filter(pc.is_null(index["removed"]))


class TrackSet:
    """An order-independent digest of a set of track ids that holds no id: the sum of their
    blake2b values and the count. Partial sets (one per partition) add up to the whole."""

    def __init__(self, state: list | None = None) -> None:
        self.total, self.count = (int(state[0], 16), int(state[1])) if state else (0, 0)

    def add(self, track_id: str) -> None:
        value = int.from_bytes(hashlib.blake2b(track_id.encode(), digest_size=16).digest(), "big")
        self.total, self.count = (self.total + value) % 2**128, self.count + 1

    def merge(self, other: "TrackSet") -> None:
        self.total, self.count = (self.total + other.total) % 2**128, self.count + other.count

    def state(self) -> list:
        return [f"{self.total:032x}", self.count]


class IndexLookup:
    """The index on disk, kept as Arrow columns; live samples are found by track_id."""

    def __init__(self, index: pa.Table):
        self.table = index.combine_chunks()
        self.n = self.table.num_rows
        self.live = pc.is_null(self.table["removed"]).to_numpy(zero_copy_only=False)
        ids = self.table["track_id"].to_pylist()
        self.pos = {ids[i]: int(i) for i in np.flatnonzero(self.live)}
        self.seen = np.zeros(self.n, dtype=bool)

    def value(self, column: str, pos: int):
        return self.table[column][int(pos)].as_py()

    def shard_sizes(self) -> dict[str, int]:
        sizes = self.table.group_by("shard").aggregate([("shard_bytes", "max")])
        return dict(zip(sizes["shard"].to_pylist(), sizes["shard_bytes_max"].to_pylist()))

    def rows_of(self, shards: set[str]) -> list[dict]:
        """Index rows of these shards, in index order."""
        mask = pc.is_in(self.table["shard"], value_set=pa.array(sorted(shards), pa.string()))
        return self.table.filter(mask).to_pylist()

    def next_shard_number(self) -> int:
        numbers = [int(m.group(1)) for name in self.shard_sizes() if (m := SHARD_NUMBER.match(name))]
        return max(numbers, default=-1) + 1


@dataclass
class Scan:
    """One pass over the candidates, compared with the index."""
    tracks: dict[int, TrackSet] = field(default_factory=dict)       # candidates' ids, per partition
    append: list[tuple[dict, dict]] = field(default_factory=list)   # (manifest row, catalog row)
    tombstones: dict[int, str] = field(default_factory=dict)        # index position -> why
    rejects: list[dict] = field(default_factory=list)
    wanted: dict[str, tuple[dict, dict]] = field(default_factory=dict)   # candidates in damaged shards


def scan(parts: Iterator[tuple[list[tuple[dict, dict]], list[dict]]], lookup: IndexLookup,
         digest_of: Callable[[dict], str], spool, want: set[str]) -> Scan:
    """Walk the candidates a partition at a time: a sample whose metadata digest matches the
    index's live row is kept (its manifest row goes to `spool`, a Parquet writer), any other
    candidate is to append (its old sample, if live, is tombstoned as changed). Candidates whose
    track is in `want` are kept aside (a damaged shard is rewritten from them)."""
    out = Scan()
    for kept, rejects in parts:
        out.rejects.extend(rejects)
        rows = []
        for row, track in kept:
            track_id = row["track_id"]
            out.tracks.setdefault(row["partition"], TrackSet()).add(track_id)
            if track_id in want:
                out.wanted[track_id] = (row, track)
            pos = lookup.pos.get(track_id)
            if pos is not None:
                lookup.seen[pos] = True
                if lookup.value("sample_blake2b", pos) == digest_of(row):
                    rows.append(dict(row, shard=lookup.value("shard", pos),
                                     flac_bytes=lookup.value("flac_bytes", pos)))
                    continue
                out.tombstones[pos] = CHANGED
            out.append.append((row, track))
        if rows:
            spool.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    out.append.sort(key=lambda pair: pair[0]["track_id"])
    return out


def departed(lookup: IndexLookup, result: Scan, waiting: set[str]) -> list[str]:
    """Tombstone the live samples no candidate claimed (why: their reject reason, else not kept);
    returns the ids of those that only wait for a stage output (they stay live, pending)."""
    reasons = {r["track_id"]: r["reason"] for r in result.rejects}
    pending = []
    for pos in np.flatnonzero(lookup.live & ~lookup.seen):
        track_id = lookup.value("track_id", pos)
        if track_id in waiting and track_id not in reasons:
            pending.append(track_id)
        else:
            result.tombstones[int(pos)] = reasons.get(track_id) or NOT_KEPT
    return pending


def carry_partitions(store: StageStore, paths: dict[str, str], carry: set[int], writer,
                     lookup: IndexLookup) -> list[dict]:
    """Partitions whose inputs did not change since the last pack: copy the previous manifest's
    rows of them into `writer` (their samples stay live), streamed; returns their previous rejects."""
    if not carry:
        return []
    parts = pa.array(sorted(carry), pa.int32())
    with store.fs.open(paths["manifest"], "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_in(table["partition"], value_set=parts))
            if table.num_rows:
                writer.write_table(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))
                for track_id in table["track_id"].to_pylist():
                    pos = lookup.pos.get(track_id)
                    if pos is not None:
                        lookup.seen[pos] = True
    rejects = store.read_table(paths["rejects"])
    return rejects.filter(pc.is_in(rejects["partition"], value_set=parts)).to_pylist()


def copy_previous_rows(store: StageStore, manifest_path: str, track_ids: list[str], writer) -> set[str]:
    """Stream the previous manifest's rows of these tracks into `writer`; returns the ids found."""
    if not track_ids or not store.exists(manifest_path):
        return set()
    wanted = pa.array(track_ids, pa.string())
    found: set[str] = set()
    with store.fs.open(manifest_path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
            table = pa.Table.from_batches([batch])
            table = table.filter(pc.is_in(table["track_id"], value_set=wanted))
            if table.num_rows:
                writer.write_table(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))
                found.update(table["track_id"].to_pylist())
    return found


def copy_spool(store: StageStore, spool_path: str, writer) -> None:
    with store.fs.open(spool_path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096):
            writer.write_table(pa.Table.from_batches([batch]))


def spool_path(store: StageStore, dataset: str) -> str:
    return store.path("manifest", f".tmp-spool-{uuid.uuid4().hex}-{dataset}.parquet")


def updated_index(lookup: IndexLookup, tombstones: dict[int, str], appended_to: dict[str, str],
                  new_rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The index with the new tombstones set (a changed track's names its new shard) and the
    appended samples' rows after it."""
    removed = lookup.table["removed"].to_pylist()
    for pos, why in tombstones.items():
        track_id = lookup.value("track_id", pos)
        removed[pos] = why.format(appended_to.get(track_id, "a newer shard"))
    old = lookup.table.set_column(lookup.table.schema.get_field_index("removed"), "removed",
                                  pa.array(removed, pa.string()))
    return pa.concat_tables([old.select(schema.names).cast(schema),
                             pa.Table.from_pylist(new_rows, schema=schema)])

