"""The train flow: launch `python -m model.train` as a subprocess and report on it.

Never `trainer.fit` inside the flow process: Lightning's DDP launcher would re-execute the
flow runner's argv once per extra device. With several GPUs (or nodes) the flow runs the
entry point under torchrun, where Lightning sees an external launcher and spawns nothing.
The run's log lines stream into the Prefect run; its final metrics and checkpoint path
(DIR/final.json) become artifacts.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import flows  # noqa: F401 - sets Prefect's offline environment before prefect is imported
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from schemas.config import profiles
from schemas.train import TRAIN_CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_PROFILES = profiles(TRAIN_CONFIG_DIR)


class TrainParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str = Field("default", examples=TRAIN_PROFILES,
                        description=f"training config under configs/train/, one of: {', '.join(TRAIN_PROFILES)} "
                                    "(default: the full-size DiT; tiny: the CPU twin), or a YAML path on the worker")
    out: str | None = Field(None, description="run directory; default <work root>/runs/<run name>, where the "
                                                "work root is the one whose latents/ the run trains on")
    work_root: str | None = Field(None, description="work root whose runs/ holds the run directory; default: "
                                                    "the one holding the latents/ folder of the shards")
    shards: str | None = Field(None, description="latents dir (overrides data.shards)")
    max_steps: int | None = Field(None, ge=1, description="overrides trainer.max_steps")
    resume: bool = Field(True, description="continue from the run directory's last.ckpt when there is one")
    gpus: int | None = Field(None, ge=0, description="GPUs per node; default: all visible ones")
    nodes: int = Field(1, ge=1, description="nodes; more than one needs rdzv_endpoint and this flow on each")
    rdzv_endpoint: str | None = Field(None, description="host:port of torchrun's rendezvous (multi-node)")
    overrides: list[str] = Field(default_factory=list, description="extra key.path=value config overrides")

    def run_dir(self, name: str, shards: str) -> Path:
        """One rule for the train deployment and the pipeline: runs/ sits beside the latents/
        the run reads (shards = <work root>/latents/<dataset>), so both resume the same run."""
        if self.out:
            return Path(self.out).absolute()
        if self.work_root:
            return Path(self.work_root).absolute() / "runs" / name
        latents = Path(shards).absolute().parent
        root = latents.parent if latents.name == "latents" else latents
        return root / "runs" / name


def _abs_if_path(value: str) -> str:
    return str(Path(value).absolute()) if Path(value).exists() else value


def training_command(params: TrainParams, out: Path, gpus: int) -> list[str]:
    """The command line: plain python for one device, torchrun for several devices or nodes."""
    args = ["-m", "model.train", "--config", _abs_if_path(params.config), "--out", str(out)]
    if params.shards:
        args += ["--shards", str(Path(params.shards).absolute())]
    if params.max_steps:
        args += ["--max-steps", str(params.max_steps)]
    if params.resume:
        args.append("--resume")
    for item in params.overrides:
        args += ["--set", item]
    if gpus <= 1 and params.nodes == 1:
        return [sys.executable, *args]
    args += ["--set", f"trainer.devices={max(gpus, 1)}", "--set", f"trainer.num_nodes={params.nodes}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={max(gpus, 1)}"]
    if params.nodes == 1:
        launcher.append("--standalone")
    else:
        if not params.rdzv_endpoint:
            raise ValueError("nodes > 1 needs rdzv_endpoint (host:port reachable from every node)")
        launcher += [f"--nnodes={params.nodes}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={params.rdzv_endpoint}"]
    return [*launcher, *args]


@task(name="train-subprocess", cache_policy=NONE)
def run_training(cmd: list[str]) -> tuple[int, list[str]]:
    """Run the command, streaming each output line into the Prefect log; (exit code, last lines)."""
    logger = get_run_logger()
    logger.info("launching: %s", " ".join(cmd))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, errors="replace") as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
        rc = proc.wait()
    return rc, list(tail)


@flow(name="train", log_prints=True)
def train(params: TrainParams = TrainParams()) -> dict:
    """Train the DiT on latent shards (resuming the run directory's last checkpoint)."""
    from schemas.train import load_train_config

    overrides = list(params.overrides)
    if params.shards:
        overrides.append(f"data.shards={Path(params.shards).absolute()}")
    cfg = load_train_config(params.config, overrides)        # a bad config fails here, not in the child
    out = params.run_dir(cfg.name, cfg.data.shards)
    gpus = params.gpus
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if cfg.trainer.accelerator != "cpu" else 0
    rc, tail = run_training(training_command(params, out, gpus))
    if rc != 0:
        raise RuntimeError(f"training exited with code {rc}; last lines:\n" + "\n".join(tail[-15:]))
    final = json.loads((out / "final.json").read_text())
    create_table_artifact([{"metric": k, "value": round(v, 6)} for k, v in final["metrics"].items()],
                          key="train-metrics", description=f"final metrics at step {final['step']}")
    create_markdown_artifact(f"# Training run `{cfg.name}`\n\nstep {final['step']}\n\n"
                             f"checkpoint: `{final['checkpoint']}`\n\nrun directory: `{out}`",
                             key="train-checkpoint", description="checkpoint of the last step")
    return final
