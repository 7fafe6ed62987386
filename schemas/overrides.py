"""The overrides table: a person's corrections of manifest fields (see tasks/overrides.py).

`overrides/<dataset>.parquet` under the work root, one row per (track_id, field). `value` is
the corrected value as JSON text (a number, true/false, a string in quotes, a list, an
object, or null); pack reads it back in the manifest column's type. The file lives apart
from every stage output, so a curate rerun or a stage version bump never touches it.
"""
from __future__ import annotations

import pyarrow as pa

OVERRIDES_SCHEMA = pa.schema([
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("field", pa.string(), nullable=False),   # a manifest column (schemas/pack.py)
    pa.field("value", pa.string()),                    # JSON text of the corrected value
    pa.field("who", pa.string()),                      # the person (or tool) who set it
    pa.field("when", pa.string()),                     # UTC, ISO 8601, when it was set
])

# Manifest columns that say which file a track is, where it lies or where it was packed: the
# pack computes them and a correction of them would misdescribe the audio in the shards.
NOT_OVERRIDABLE = frozenset({"track_id", "uri", "partition", "bytes", "codec", "source_sample_rate",
                             "source_channels", "duration", "peak_dbfs", "rms_dbfs", "shard",
                             "flac_bytes", "overridden"})
