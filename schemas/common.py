"""Arrow columns shared by every stage output, and the catalog (ingest output) schema.

Every stage writes one Parquet file per partition keyed by `track_id`, with `status`
(`ok`, `rejected`, `error`) and `reason` on every row. A reason is a short code from
REASONS, optionally followed by `: detail` for a person to act on.
"""
from __future__ import annotations

import pyarrow as pa

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_ERROR = "error"

# The documented reason codes. Stages add their own in their module docstring; the code
# before the first ':' is what summaries group by.
REASONS = {
    "unreadable": "no decoder could open the file (not audio, or an unknown container)",
    "empty": "the file has zero bytes or zero frames",
    "truncated": "the header promises more audio than the file holds",
    "too_short": "shorter than audio.min_duration_s",
    "too_long": "longer than audio.max_duration_s",
    "silent": "digital silence: peak below audio.silence_dbfs",
    "non_finite": "NaN or Inf samples",
    "unsupported_channels": "channel count not in audio.allowed_channels",
    "duplicate": "same bytes as another track (kept under the first track_id)",
    "source_missing": "none of the track's URIs holds its bytes any more (deleted or unreadable "
                      "since ingest); ingest sets the track ok again when the file is back",
    "source_changed": "a URI of the track now holds other audio (replaced under the same name); "
                      "the new audio is a new track, and this one stays out unless its bytes return",
    "upstream": "an upstream stage rejected the track",
    "exception": "the stage raised on this track; detail holds the error",
}

COMMON_FIELDS = [
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
]


def stage_schema(*fields: pa.Field) -> pa.Schema:
    """The full output schema of a stage: the common columns, then the stage's own."""
    return pa.schema(COMMON_FIELDS + list(fields))


def reason_code(reason: str | None) -> str:
    """The code part of a reason string ('too_short: 0.2 s < 1.0 s' -> 'too_short')."""
    if not reason:
        return ""
    return reason.split(":", 1)[0].strip()


CATALOG_SCHEMA = stage_schema(
    pa.field("uri", pa.string()),            # printable (non-UTF-8 bytes backslash-escaped)
    pa.field("uri_raw", pa.binary()),        # exact path/URL bytes, used to open the file
    pa.field("aliases", pa.list_(pa.string())),  # other URIs with the same bytes
    pa.field("bytes", pa.int64()),
    pa.field("duration", pa.float64()),
    pa.field("sample_rate", pa.int32()),
    pa.field("channels", pa.int32()),
    pa.field("codec", pa.string()),
    pa.field("partition", pa.int32()),
)

# Ingest's memo of files already hashed: (uri, size, mtime) -> track_id, so a rerun
# over 1.8M files hashes only what is new or changed.
SEEN_SCHEMA = pa.schema([
    pa.field("uri", pa.string()),
    pa.field("uri_raw", pa.binary()),
    pa.field("bytes", pa.int64()),
    pa.field("mtime_ns", pa.int64()),
    pa.field("track_id", pa.string()),
])
