"""Config model and output schema of the transcribe stage (see tasks/transcribe.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TranscribeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
