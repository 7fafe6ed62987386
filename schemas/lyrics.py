"""Config model and output schema of the lyrics stage (see tasks/lyrics.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class LyricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
