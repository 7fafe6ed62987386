"""Config model of the pack stage and the schemas of its outputs (see tasks/pack.py).

The manifest (`manifest/<dataset>.parquet`) is one row per packed track: the join of every
configured stage's output for tracks kept by all of them and by the pack filter. Columns of
a stage that is not configured are null. Its schema metadata carries the stage keys it was
built from. The shard index (`shards/<dataset>/index.parquet`) lists each sample's shard;
it is written last, so its presence says the shards, manifest and rejects beside it are
complete, and it records each shard's size and blake2b as written (a pack rerun compares
sizes, acepipe verify checksums). Shards are append-only: the index lists every sample the
shards hold, and a sample that left the dataset keeps its row with `removed` (its tombstone)
set; readers take the rows whose `removed` is null (`live_index`). A sample's JSON holds the manifest row less uri, partition,
shard and flac_bytes (where the file lay, not what it is), plus sample_rate, channels and
lyrics_text. Every label a model or DSP stage produced carries its confidence beside it, and a
field a person corrected (overrides/<dataset>.parquet, tasks/overrides.py) holds the person's
value and is named in the row's `overridden`.
"""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

# The caption stage's recaption (the styles of ACE-Step's Qwen-Omni prompt), carried as it is.
from schemas.caption import RECAPTION, RECAPTION_KEYS  # noqa: F401 - RECAPTION_KEYS: the manifest's too


class PackFilter(BaseModel):
    """Which kept tracks enter the dataset. A null threshold does not filter."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    min_duration_s: float | None = Field(None, description="shorter tracks are left out")
    max_duration_s: float | None = Field(None, description="longer tracks are left out")
    min_ce: float | None = Field(None, description="Audiobox content enjoyment at least this")
    min_cu: float | None = Field(None, description="Audiobox content usefulness at least this")
    min_pc: float | None = Field(None, description="Audiobox production complexity at least this")
    min_pq: float | None = Field(None, description="Audiobox production quality at least this")
    languages: list[str] | None = Field(
        None, description="keep only these transcript languages (ISO 639-1); instrumentals pass "
        "unless require_lyrics is set")
    require_lyrics: bool = Field(False, description="keep only tracks with matched canonical lyrics")
    min_lyrics_score: float | None = Field(None, description="matched lyrics need at least this score")
    require_caption: bool = Field(False, description="keep only tracks with a caption")
    require_bpm: bool = Field(False, description="keep only tracks with a tempo")


class PackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    sample_rate: int = Field(44100, gt=0, description="audio rate in the shards (the DCAE's is 44100)")
    channels: int = Field(2, ge=1, le=2, description="1 mono, 2 stereo")
    flac_subtype: Literal["PCM_16", "PCM_24"] = Field("PCM_16", description="FLAC sample format")
    shard_bytes: int = Field(1_000_000_000, gt=0, description="target shard size; a shard closes before "
                             "the sample that would take it past this (a bigger sample gets a shard alone)")
    workers: int = Field(2, ge=1, description="threads decoding and encoding audio ahead of the writer "
                         "(does not change the shards' bytes)")
    verify_source: bool = Field(True, description="re-hash each source file before packing it, so a file "
                                "modified or replaced after ingest is left out (source_changed) instead of "
                                "packed under the old track_id; reads each file twice")
    filter: PackFilter = PackFilter()
    report: bool = Field(True, description="write the dataset report (markdown + PNG charts) beside the "
                         "shards and as a Prefect artifact")
    review_per_label: int = Field(10, ge=1, description="tracks per label in the lowest-confidence review "
                                  "the pack flow writes as a Prefect table artifact (acepipe review)")


SEGMENT = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("label", pa.string())])
# The lyrics stage's line alignment: when each canonical line is sung (null times: not found).
LYRICS_LINE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("section", pa.string()),
                         ("text", pa.string())])

# The manifest: stable column names, documented here.
MANIFEST_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),   # sha of the file's bytes; the shard __key__
    pa.field("uri", pa.string()),                          # printable source URI
    pa.field("partition", pa.int32()),                     # ingest partition
    pa.field("bytes", pa.int64()),                         # source file size
    pa.field("codec", pa.string()),
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
    pa.field("duration", pa.float64()),                    # seconds
    pa.field("peak_dbfs", pa.float32()),
    pa.field("rms_dbfs", pa.float32()),
    pa.field("ce", pa.float32()),                          # Audiobox Aesthetics
    pa.field("cu", pa.float32()),
    pa.field("pc", pa.float32()),
    pa.field("pq", pa.float32()),
    pa.field("language", pa.string()),                     # matched lyrics' language, else transcript's
    pa.field("language_prob", pa.float32()),               # transcribe's probability of its language
    pa.field("transcript", pa.string()),
    pa.field("instrumental", pa.bool_()),
    pa.field("lyric_id", pa.string()),                     # canonical lyrics match (null: none)
    pa.field("lyrics_score", pa.float32()),
    pa.field("lyrics", pa.string()),                       # canonical lyrics with [verse]/[chorus] tags
    pa.field("lyrics_lines", pa.list_(LYRICS_LINE)),      # each canonical line's time in the track
    pa.field("title", pa.string()),
    pa.field("artist", pa.string()),
    pa.field("bpm", pa.float64()),
    pa.field("bpm_confidence", pa.float64()),              # 0-1: probability bpm is within 4% of the truth
    pa.field("meter", pa.int32()),                         # beats per bar
    pa.field("key", pa.string()),
    pa.field("scale", pa.string()),
    pa.field("key_confidence", pa.float64()),              # 0-1: probability key and scale are right
    pa.field("structure", pa.list_(SEGMENT)),              # rhythm's sections
    pa.field("caption", pa.string()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("caption_finish_reason", pa.string()),        # stop | length (the answer was cut)
    pa.field("recaption", RECAPTION),
    pa.field("overridden", pa.list_(pa.string())),        # fields a person set (overrides/<dataset>.parquet)
    pa.field("shard", pa.string()),                        # shard-NNNNNN.tar holding the sample
    pa.field("flac_bytes", pa.int64()),
])

SHARD_INDEX_SCHEMA = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("bytes", pa.int64()),        # the sample's bytes in the tar (payload of its files)
    pa.field("duration", pa.float64()),
    pa.field("shard_bytes", pa.int64()),   # the whole shard file's size, as written
    pa.field("shard_blake2b", pa.string()),   # blake2b-128 (hex) of the shard file, as written
    pa.field("flac_bytes", pa.int64()),    # the sample's FLAC (the manifest's flac_bytes)
    pa.field("sample_blake2b", pa.string()),  # blake2b-128 of the sample's .json and .txt: its metadata
    pa.field("removed", pa.string()),      # null: live; else the tombstone: why the sample left the dataset
])
SHARD_DIGEST_COLUMNS = ("shard_bytes", "shard_blake2b")
# An index without these (written before they existed) is rebuilt, like one that does not read.
INDEX_REQUIRED_COLUMNS = (*SHARD_DIGEST_COLUMNS, "flac_bytes", "sample_blake2b", "removed")

# Tracks that were candidates but did not make it into the shards, with why.
PACK_REJECTS_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("partition", pa.int32()),     # the track's catalog partition (a pack carries unchanged ones)
])
