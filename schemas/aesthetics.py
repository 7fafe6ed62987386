"""Config model and output schema of the aesthetics stage (see tasks/aesthetics.py)."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import stage_schema

AXES = ("CE", "CU", "PC", "PQ")  # content enjoyment, content usefulness, production complexity, production quality


class AestheticsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    checkpoint: str = Field(
        "facebook/audiobox-aesthetics",
        description="local checkpoint.pt (or a directory holding it), a hub id, or tiny:aesthetics",
    )
    batch_size: int = Field(16, ge=1, description="10 s windows per forward pass (size it for the device)")
    window_s: float = Field(10.0, gt=0, description="window length; the released model was trained on 10 s")
    hop_s: float = Field(10.0, gt=0, description="hop between windows (the reference inference uses 10 s)")
    precision: Literal["checkpoint", "32", "16", "bf16"] = Field(
        "checkpoint", description="autocast precision; 'checkpoint' behaves as the reference inference "
                      "(float32 in practice: the package never turns its autocast flag on)")
    min_ce: float | None = Field(None, description="reject tracks whose content enjoyment is below this")
    min_cu: float | None = Field(None, description="reject tracks whose content usefulness is below this")
    min_pc: float | None = Field(None, description="reject tracks whose production complexity is below this")
    min_pq: float | None = Field(5.0, description="reject tracks whose production quality is below this")
    reject_live: bool = Field(False, description="reject tracks whose path matches live_pattern")
    live_pattern: str = Field(
        r"(?i)(\blive (?:at|in|from|on)\b|[(\[\-_ ]live[)\]]|[\-_]live\.\w+$|\bunplugged\b|\bin concert\b)",
        description="regex over the track's path/URI that marks a live recording (the only signal "
                    "available here; the model has no live/studio output)",
    )

    def thresholds(self) -> dict[str, float]:
        """axis -> minimum, for the axes that have one."""
        values = {"CE": self.min_ce, "CU": self.min_cu, "PC": self.min_pc, "PQ": self.min_pq}
        return {axis: v for axis, v in values.items() if v is not None}


AESTHETICS_SCHEMA = stage_schema(
    pa.field("ce", pa.float32()),
    pa.field("cu", pa.float32()),
    pa.field("pc", pa.float32()),
    pa.field("pq", pa.float32()),
    pa.field("windows", pa.int32()),   # 10 s windows scored (the length weighting's support)
)
