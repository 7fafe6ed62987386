"""Config model and output schema of the aesthetics stage (see tasks/aesthetics.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class AestheticsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
