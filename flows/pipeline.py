"""The whole pipeline as one run: curate -> pack -> latents -> train, each a subflow.

Every subflow is the same flow its own deployment runs, so a `pipeline/full` run shows
four child runs in the UI, each with its own artifacts, and a rerun skips what the stage
store, the shard fingerprints and the run directory's last checkpoint say is done.
"""
from __future__ import annotations

import posixpath

import flows  # noqa: F401 - sets Prefect's offline environment before prefect is imported
from prefect import flow
from prefect.states import Failed
from pydantic import BaseModel, ConfigDict, Field

from flows.curate import CurateFailed, curate
from flows.latents import latents
from flows.pack import pack
from flows.params import DatasetParams, PackParams, RunParams
from flows.train import TRAIN_PROFILES, TrainParams, train


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: RunParams = Field(default_factory=RunParams,
                           description="curation config, work root, sources and overrides (shared by "
                                       "curate, pack and latents)")
    dataset: str = Field("default", description="dataset name under manifest/, shards/ and latents/")
    train: bool = Field(True, description="train after the latents are written")
    train_config: str = Field("default", examples=TRAIN_PROFILES,
                              description=f"training config under configs/train/, one of: "
                                          f"{', '.join(TRAIN_PROFILES)}, or a YAML path on the worker")
    max_steps: int | None = Field(None, ge=1, description="overrides trainer.max_steps")
    train_overrides: list[str] = Field(default_factory=list, description="training key.path=value overrides")


@flow(name="pipeline", log_prints=True)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Curate the sources, pack a dataset, encode its latents, then train on them."""
    dataset = DatasetParams(**params.run.model_dump(), dataset=params.dataset)
    try:
        result: dict = {"curate": curate(params.run)}
    except CurateFailed as exc:
        # Packing a catalog with failed partitions would ship a partial dataset: stop here. A
        # returned Failed state ends the run without a second traceback; the caller gets `exc`.
        return Failed(message=str(exc), data=exc)
    result["pack"] = pack(PackParams(**dataset.model_dump()))
    result["latents"] = latents(dataset)
    if params.train:
        work_root = params.run.load().work_root
        result["train"] = train(TrainParams(
            config=params.train_config, max_steps=params.max_steps,
            shards=posixpath.join(work_root, "latents", params.dataset), overrides=params.train_overrides))
    print(f"pipeline: {result['pack']['packed']} tracks packed into dataset {params.dataset}"
          + (f", trained to step {result['train']['step']}" if "train" in result else ""))
    return result
