"""Config model and output schema of the rhythm stage (see tasks/rhythm.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RhythmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
