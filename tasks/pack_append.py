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
    rows only.
  - leaves a track whose partition waits for a stage output (curate has not reached it under
    the current stage keys) live with its previous manifest row, so a pack between a stage
    version bump and the end of curate does not tombstone the dataset.
A full pack (`acepipe pack --rebuild`, a changed audio format, an index that does not read)
writes every live track again in track_id order and drops the tombstones: compaction.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from tasks.store import StageStore

SHARD_NUMBER = re.compile(r"^shard-(\d{6})\.tar$")
CHANGED = "changed: its metadata changed since it was packed (a stage output or an override); packed again in {}"
NOT_KEPT = ("not_kept: no longer kept by every stage (rejected or failed upstream, or its catalog row "
            "is gone); see curate's rejects")


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


def next_shard_number(index_rows: list[dict]) -> int:
    numbers = [int(m.group(1)) for r in index_rows if (m := SHARD_NUMBER.match(r["shard"]))]
    return max(numbers, default=-1) + 1


@dataclass
class Increment:
    """What an append pack does: rows kept where they lie, pairs to append, tombstones to add."""
    keep: dict[str, dict] = field(default_factory=dict)          # track_id -> manifest row (with shard)
    append: list[tuple[dict, dict]] = field(default_factory=list)   # (manifest row, catalog row)
    tombstones: dict[tuple[str, str], str] = field(default_factory=dict)   # (shard, track_id) -> why
    pending: list[str] = field(default_factory=list)              # live tracks that wait for a stage


def plan_increment(pairs: list[tuple[dict, dict]], digests: list[str], index_rows: list[dict],
                   rejects: list[dict], waiting: set[str]) -> Increment:
    """Compare the candidates (with their metadata digests) with the index's live rows."""
    live = {r["track_id"]: r for r in index_rows if r["removed"] is None}
    inc = Increment()
    for (row, track), digest in zip(pairs, digests):
        old = live.pop(row["track_id"], None)
        if old is not None and old["sample_blake2b"] == digest:
            inc.keep[row["track_id"]] = dict(row, shard=old["shard"], flac_bytes=old["flac_bytes"])
            continue
        if old is not None:
            inc.tombstones[(old["shard"], old["track_id"])] = CHANGED
        inc.append.append((row, track))
    reasons = {r["track_id"]: r["reason"] for r in rejects}
    for track_id, old in live.items():   # live samples that are no longer candidates
        if track_id in waiting and track_id not in reasons:
            inc.pending.append(track_id)
        else:
            inc.tombstones[(old["shard"], track_id)] = reasons.get(track_id) or NOT_KEPT
    return inc


def previous_rows(store: StageStore, manifest_path: str, track_ids: list[str]) -> dict[str, dict]:
    """The previous manifest's rows of these tracks (read by an Arrow filter, not row by row)."""
    if not track_ids or not store.exists(manifest_path):
        return {}
    table = store.read_table(manifest_path)
    table = table.filter(pc.is_in(table["track_id"], value_set=pa.array(track_ids, pa.string())))
    return {r["track_id"]: r for r in table.to_pylist()}


def with_tombstones(index_rows: list[dict], tombstones: dict[tuple[str, str], str],
                    appended_to: dict[str, str]) -> list[dict]:
    """The index's rows with the new tombstones set (a changed track's names its new shard)."""
    out = []
    for r in index_rows:
        why = tombstones.get((r["shard"], r["track_id"])) if r["removed"] is None else None
        if why is not None:
            r = dict(r, removed=why.format(appended_to.get(r["track_id"], "a newer shard")))
        out.append(r)
    return out
