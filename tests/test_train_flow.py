"""The train flow: the launch command (torchrun for several devices, never an in-process DDP
fit) and a real run of the tiny config whose log lines and artifacts reach Prefect."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from latent_shards import make_track, write_latent_shards  # noqa: E402

from flows.train import TrainParams, training_command  # noqa: E402


def test_one_device_runs_the_entry_point_directly(tmp_path):
    cmd = training_command(TrainParams(config="tiny", max_steps=5, shards=str(tmp_path)), tmp_path / "run", 1)
    assert cmd[:3] == [sys.executable, "-m", "model.train"]
    assert "--resume" in cmd and cmd[cmd.index("--max-steps") + 1] == "5"
    assert cmd[cmd.index("--shards") + 1] == str(tmp_path)


def test_several_gpus_go_through_torchrun():
    cmd = training_command(TrainParams(config="default"), Path("/runs/x"), 4)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in cmd and "--standalone" in cmd
    i = cmd.index("-m", 3)
    assert cmd[i + 1] == "model.train"
    assert "trainer.devices=4" in cmd


def test_multi_node_needs_a_rendezvous():
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        training_command(TrainParams(nodes=2), Path("/runs/x"), 8)
    cmd = training_command(TrainParams(nodes=2, rdzv_endpoint="head:29400"), Path("/runs/x"), 8)
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=head:29400" in cmd and "trainer.num_nodes=2" in cmd


def test_params_are_a_form_with_defaults():
    schema = TrainParams.model_json_schema()
    assert {"config", "shards", "max_steps", "resume"} <= set(schema["properties"])
    with pytest.raises(ValueError):
        TrainParams(max_steps=0)


@pytest.mark.slow
def test_flow_trains_tiny_and_publishes_artifacts(prefect_harness, tmp_path, tiny_models_dir):
    from prefect.artifacts import Artifact

    from flows.train import train

    shards = write_latent_shards(tmp_path / "latents", [make_track(i, 30 + i) for i in range(4)])
    params = TrainParams(config="tiny", out=str(tmp_path / "run"), shards=str(shards), max_steps=4,
                         overrides=[f"tiny_dir={tiny_models_dir}", "trainer.val_every=1000", "trainer.log_every=1"])
    final = train(params)
    assert final["step"] == 4 and Path(final["checkpoint"]).is_file()
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()
    assert Artifact.get("train-metrics") is not None and Artifact.get("train-checkpoint") is not None


def test_train_deployment_and_pipeline_share_one_run_directory(tmp_path):
    """train/default (shards from the config) and pipeline/full (shards under the profile's
    work root) must resume the same run: runs/ sits beside the latents/ they read."""
    from schemas.config import load_config
    from schemas.train import load_train_config

    cfg = load_train_config("tiny")
    work_root = load_config("tiny").work_root                     # what pipeline/full passes on
    from_form = TrainParams(config="tiny").run_dir(cfg.name, cfg.data.shards)
    from_pipeline = TrainParams(config="tiny", shards=f"{work_root}/latents/default").run_dir(
        cfg.name, f"{work_root}/latents/default")
    assert from_form == from_pipeline == Path(work_root).absolute() / "runs" / "ace-dit-tiny"
    assert TrainParams(out=str(tmp_path / "x")).run_dir("n", "s") == tmp_path / "x"
    assert TrainParams(work_root=str(tmp_path)).run_dir("n", "/a/latents/b") == tmp_path / "runs" / "n"


def test_forms_list_the_profiles():
    from flows.params import RunParams

    for model, field in ((TrainParams, "config"), (RunParams, "config")):
        prop = model.model_json_schema()["properties"][field]
        assert {"default", "tiny"} <= set(prop["examples"])
        assert "default" in prop["description"] and "tiny" in prop["description"]


def test_acepipe_train_takes_the_entry_points_options_with_and_without_dashes(tmp_path, capsys):
    """`acepipe train --config X --out Y` (the README's form) and `acepipe train -- ...` both reach
    model.train's parser; a config that does not exist is its clear error, not argparse's."""
    from flows.cli import main

    for argv in (["train", "--config", "no-such", "--out", str(tmp_path)],
                 ["train", "--", "--config", "no-such", "--out", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "training config 'no-such' not found" in err and "unrecognized" not in err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out
