"""Config model and output schema of the caption stage (see tasks/caption.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
