"""Config model and output schema of the latents stage (see tasks/latents.py)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class LatentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
