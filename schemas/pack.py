"""Config model and output schema of the pack stage (see tasks/pack.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
