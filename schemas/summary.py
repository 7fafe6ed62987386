"""Arrow schema of the curate run's rejects table, `reports/curate-rejects.parquet`.

tasks/summary.py rewrites it on every curate run: one row per catalog track that ingest or a
stage rejected or failed, with the stage that stopped it and its reason ("code: detail", codes
in schemas/common.py REASONS and the stages' docstrings). The "curate-rejects" artifact shows
its first rows with the same columns.
"""
import pyarrow as pa

REJECTS_SCHEMA = pa.schema([
    pa.field("uri", pa.string()),                      # the file, as the catalog prints it
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("partition", pa.int32()),
    pa.field("stage", pa.string()),                    # "ingest" or the stage that stopped it
    pa.field("status", pa.string()),                   # rejected or error
    pa.field("reason", pa.string()),                   # "code: detail"
])
