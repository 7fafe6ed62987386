"""Flow parameters as pydantic models, so the Prefect UI shows a form with defaults."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.config import Config, load_config, profiles

PROFILES = profiles()


class RunParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str = Field("default", examples=PROFILES,
                        description=f"profile under configs/, one of: {', '.join(PROFILES)} (default: the "
                                    "real checkpoints; tiny: offline twins), or a YAML path on the worker")
    work_root: str | None = Field(None, description="overrides work_root: local path or fsspec URL")
    sources: list[str] | None = Field(None, description="overrides sources: dirs, URLs or .txt lists")
    overrides: list[str] = Field(default_factory=list, description="extra key.path=value overrides")

    def load(self) -> Config:
        extra = list(self.overrides)
        if self.work_root:
            extra.append(f"work_root={self.work_root}")
        cfg = load_config(self.config, extra)
        if self.sources is not None:
            cfg = cfg.model_copy(update={"sources": list(self.sources)})
        return cfg


class DatasetParams(RunParams):
    """Parameters of the pack and latents flows: a run's config plus the dataset name."""
    dataset: str = Field("default", description="dataset name under manifest/, shards/ and latents/")


class PackParams(DatasetParams):
    """Parameters of the pack flow."""
    rebuild: bool = Field(False, description="pack every kept track again in track_id order and drop the "
                          "tombstones (compaction); by default a pack appends new and changed tracks to new "
                          "shards and leaves the others byte-identical, so their latents are not encoded again")
