"""The whole pipeline as one Prefect run: curate -> pack -> latents -> train on the synthetic
corpus with the tiny profile, then a rerun that finds everything done."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.params import RunParams
from flows.pipeline import PipelineParams

pytestmark = pytest.mark.slow


def test_pipeline_runs_every_flow_and_a_rerun_redoes_nothing(prefect_harness, synth_corpus, tmp_path,
                                                              tiny_models_dir):
    from prefect.artifacts import Artifact

    from flows.pipeline import pipeline

    work = tmp_path / "work"
    params = PipelineParams(
        run=RunParams(config="tiny", work_root=str(work), sources=[str(synth_corpus / "audio")],
                      overrides=[f"models.tiny_dir={tiny_models_dir}",
                                 f"lyrics_db={synth_corpus / 'lyrics.parquet'}"]),
        train_config="tiny", max_steps=3,
        train_overrides=[f"tiny_dir={tiny_models_dir}", "trainer.val_every=1000", "trainer.log_every=1"])
    first = pipeline(params)

    kept = first["curate"]["ok"]
    assert kept > 0 and first["pack"]["packed"] == kept
    manifest = pq.read_table(work / "manifest" / "default.parquet")
    assert manifest.num_rows == kept and all(manifest.column("caption").to_pylist())
    latent_index = pq.read_table(work / "latents" / "default" / "index.parquet")
    assert sorted(latent_index.column("track_id").to_pylist()) == sorted(manifest.column("track_id").to_pylist())
    final = first["train"]
    assert final["step"] == 3 and Path(final["checkpoint"]).is_file()
    assert (work / "runs" / "ace-dit-tiny" / "csv" / "metrics.csv").is_file()
    for key in ("curate-summary", "train-metrics", "train-checkpoint"):
        assert Artifact.get(key) is not None, key

    second = pipeline(params)
    assert all(s["partitions_run"] == 0 for s in second["curate"]["stages"] if s["stage"] != "ingest")
    assert second["pack"]["skipped"] and second["latents"]["shards_run"] == 0
    assert second["train"]["step"] == 3       # resumed from last.ckpt, nothing left to train
    assert json.loads((work / "runs" / "ace-dit-tiny" / "final.json").read_text())["step"] == 3
