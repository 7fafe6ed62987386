"""The packed audio an export reads: each shard of the index, streamed once, its FLAC checked.

The shard index says which shard holds a track (readers go by the index, never by a directory
listing); the manifest says what the track is. A shard is read in one pass: its FLAC members
are decoded as they stream by and handed to the export (which writes them into its staging
directory), while the bytes are hashed; when the shard's size or blake2b differs from what the
index recorded, what was written from it is taken back and its tracks become rejects, since a
changed byte may sit inside audio that still decodes. Memory holds one shard's manifest rows
and one sample at a time.

Reason codes (the rejects file of an export):
  shard_missing       the index names a shard that is not on disk
  shard_damaged       the shard's size or blake2b differs from the index's record
  shard_unreadable    the shard does not read as a tar (truncated, not a tar, I/O error)
  sample_missing      the shard holds no <track_id>.flac for a track the index puts there
  audio_undecodable   the sample's FLAC does not decode, or decodes to fewer frames than its header
  not_in_index        a manifest row whose track the shard index does not list
  not_in_manifest     an index row whose track the manifest does not describe
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import soundfile as sf

from schemas.pack import SHARD_DIGEST_COLUMNS
from tasks.pack_append import live_index
from tasks.store import StageStore, StoreError

REPAIR = "run `acepipe verify --repair`, then `acepipe pack`, then export again"
# A sample that fails to decode in a shard whose checksum matches was written so by pack.
REPACK = ("the shard holds it as pack wrote it: remove the dataset's shards/<dataset>/index.parquet and "
          "run `acepipe pack` to pack it again (pack leaves out audio it cannot encode), then export again")


@dataclass
class Audio:
    """What a sample's FLAC decodes to (the bytes go straight to the export, not kept here)."""
    duration: float
    sample_rate: int
    channels: int


@dataclass
class ShardGroup:
    """One shard and the manifest rows of the tracks the index puts in it, in index order."""
    shard: str
    rows: list[dict]
    size: int | None          # as the index recorded it (None: an index without digests)
    blake2b: str | None


def reject(track_id: str, shard: str | None, reason: str) -> dict:
    return {"track_id": track_id, "shard": shard, "reason": reason}


# -- which tracks lie in which shard ---------------------------------------------------------
def read_index(store: StageStore, dataset: str) -> pa.Table:
    path = store.path("shards", dataset, "index.parquet")
    if not store.exists(path):
        raise StoreError(f"no shard index at {path}: run `acepipe pack --dataset {dataset}` first "
                         "(an index is written last, so none means no complete pack)")
    return live_index(store.read_table(path))   # tombstoned samples are not in the dataset


def shard_groups(manifest: pa.Table, index: pa.Table, rejects: list[dict]) -> Iterator[ShardGroup]:
    """The index's shards in order, each with its tracks' manifest rows. Tracks that only one of
    the two lists go to `rejects`. Joins on Arrow columns: no Python object per track."""
    index = index.append_column("_index_pos", pa.array(range(index.num_rows), pa.int64()))
    positions = manifest.select(["track_id"]).append_column(
        "_manifest_pos", pa.array(range(manifest.num_rows), pa.int64()))
    joined = index.select(["track_id", "shard", "_index_pos"]).join(positions, "track_id", join_type="left outer")
    joined = joined.sort_by([("shard", "ascending"), ("_index_pos", "ascending")])
    for row in joined.filter(pc.is_null(joined["_manifest_pos"])).select(["track_id", "shard"]).to_pylist():
        rejects.append(reject(row["track_id"], row["shard"], "not_in_manifest: the shard index lists the "
                              "track but the manifest does not describe it; run `acepipe pack` again"))
    unlisted = positions.join(index.select(["track_id"]), "track_id", join_type="left anti")
    for track_id in sorted(unlisted["track_id"].to_pylist()):
        rejects.append(reject(track_id, None, "not_in_index: the manifest lists the track but the shard "
                              "index does not; run `acepipe pack` again"))
    joined = joined.filter(pc.is_valid(joined["_manifest_pos"]))
    digests = _shard_digests(index)
    shards = joined["shard"]
    start = 0
    for run in pc.value_counts(shards).to_pylist():   # in order of first appearance: sorted
        shard, count = run["values"], run["counts"]
        taken = manifest.take(joined["_manifest_pos"][start:start + count]).to_pylist()
        start += count
        yield ShardGroup(shard, taken, *digests.get(shard, (None, None)))


def _shard_digests(index: pa.Table) -> dict[str, tuple[int, str]]:
    if not all(c in index.column_names for c in SHARD_DIGEST_COLUMNS):
        return {}
    # Every row of a shard carries the same size and checksum: any one will do.
    unique = index.select(["shard", *SHARD_DIGEST_COLUMNS]).group_by("shard").aggregate(
        [(c, "max") for c in SHARD_DIGEST_COLUMNS])
    return {r["shard"]: (r["shard_bytes_max"], r["shard_blake2b_max"]) for r in unique.to_pylist()}


# -- reading one shard ---------------------------------------------------------------------------
class HashingReader:
    """A read-only file handle that counts and hashes what is read through it (the blake2b-128 the
    shard writer recorded)."""

    def __init__(self, fh):
        self.fh, self.size, self._hash = fh, 0, hashlib.blake2b(digest_size=16)

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(4 * 2**20):
            pass

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()


def check_flac(flac: bytes) -> Audio:
    """Decode the whole FLAC (block by block); raises ValueError saying what is wrong."""
    try:
        with sf.SoundFile(io.BytesIO(flac)) as f:
            frames = sum(len(block) for block in f.blocks(blocksize=2**16, dtype="float32"))
            header_frames, sample_rate, channels = f.frames, f.samplerate, f.channels
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    if frames == 0 or frames < header_frames:
        raise ValueError(f"decoded {frames} of the {header_frames} frames its header promises")
    return Audio(frames / sample_rate, sample_rate, channels)


def read_shard(store: StageStore, shard_dir: str, group: ShardGroup,
               write_audio: Callable[[dict, bytes], object],
               take_back: Callable[[object], None]) -> tuple[list[tuple[dict, Audio]], list[dict]]:
    """Stream one shard: each wanted track's FLAC is checked and its bytes passed to `write_audio`,
    whose return value `take_back` undoes. Returns (row, audio) of the tracks written and the
    rejects."""
    path = posixpath.join(shard_dir, group.shard)
    problem = _stat_problem(store, path, group)
    if problem:
        return [], [reject(r["track_id"], group.shard, problem) for r in group.rows]
    wanted = {r["track_id"]: r for r in group.rows}
    written: list[tuple[dict, Audio, object]] = []
    rejects: list[dict] = []
    try:
        with store.fs.open(path, "rb") as fh:
            reader = HashingReader(fh)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if ext != "flac" or key not in wanted:
                        continue
                    row = wanted.pop(key)
                    flac = tar.extractfile(member).read()
                    try:
                        audio = check_flac(flac)
                    except ValueError as exc:
                        rejects.append(reject(key, group.shard, f"audio_undecodable: {key}.flac in "
                                              f"{path} does not decode ({exc}); {REPACK}"))
                        continue
                    try:
                        handle = write_audio(row, flac)
                    except OSError as exc:   # the export's own disk, not the shard: stop the export
                        raise StoreError(f"cannot write the export's audio for {key}: {exc}") from exc
                    written.append((row, audio, handle))
            reader.drain()
    except (tarfile.TarError, OSError, EOFError) as exc:
        _take_back_all(written, take_back)
        why = f"shard_unreadable: {path} does not read as a tar ({type(exc).__name__}: {exc}); {REPAIR}"
        return [], [reject(r["track_id"], group.shard, why) for r in group.rows]
    if group.blake2b is not None and (reader.size, reader.checksum) != (group.size, group.blake2b):
        _take_back_all(written, take_back)
        why = (f"shard_damaged: {path} has blake2b {reader.checksum}, the index recorded {group.blake2b} "
               f"(its bytes changed after pack); {REPAIR}")
        return [], [reject(r["track_id"], group.shard, why) for r in group.rows]
    for key in wanted:   # listed in the index for this shard but not in it
        rejects.append(reject(key, group.shard, f"sample_missing: {path} holds no {key}.flac though the "
                              f"index lists it there; {REPAIR}"))
    return [(row, audio) for row, audio, _ in written], rejects


def _stat_problem(store: StageStore, path: str, group: ShardGroup) -> str | None:
    try:
        size = store.fs.size(path)
    except FileNotFoundError:
        return f"shard_missing: {path} is not on disk though the shard index names it; {REPAIR}"
    if group.size is not None and size != group.size:
        return (f"shard_damaged: {path} is {size} bytes, the index recorded {group.size} "
                f"(truncated or overwritten after pack); {REPAIR}")
    return None


def _take_back_all(written: list[tuple[dict, Audio, object]], take_back: Callable[[object], None]) -> None:
    for _, _, handle in written:
        take_back(handle)
