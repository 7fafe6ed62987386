"""Output schema of the probe stage (tasks/probe.py): a full decode with the loader's guards."""
import pyarrow as pa

from schemas.common import stage_schema

PROBE_SCHEMA = stage_schema(
    pa.field("duration", pa.float64()),
    pa.field("sample_rate", pa.int32()),
    pa.field("channels", pa.int32()),
    pa.field("peak_dbfs", pa.float32()),
    pa.field("rms_dbfs", pa.float32()),
)
