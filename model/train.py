"""Training entry point: `python -m model.train --config configs/train/tiny.yaml --out DIR [--resume]`.

Also `acepipe train ...` and, as a subprocess (under torchrun for several GPUs), the Prefect
flow in flows/train.py. Writes under DIR: checkpoints/ (last.ckpt and step-*.ckpt), csv/
metrics.csv, tb/ (TensorBoard), samples/ (validation images), config.yaml and, at the end,
final.json (last metrics and checkpoint path, which the flow publishes as artifacts).
Lightning's DDP comes from the strategy setting; under torchrun it sees the external launcher.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from schemas.train import TrainConfig, load_train_config


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes metrics.csv it finds; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class LogLines(Callback):
    """One plain line per `every` steps on stdout (the flow streams these into Prefect)."""

    def __init__(self, every: int):
        self.every, self.t0, self.step0 = every, time.time(), 0

    def on_train_start(self, trainer, module):
        self.t0, self.step0 = time.time(), trainer.global_step
        print(f"train: start at step {trainer.global_step} of {trainer.max_steps}", flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if trainer.is_global_zero and (step % self.every == 0 or step == trainer.max_steps):
            rate = (step - self.step0) / max(1e-9, time.time() - self.t0)
            metrics = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                               if k.startswith("train/") and not k.endswith("_epoch"))
            print(f"step {step} {metrics} steps/s={rate:.2f}", flush=True)

    def on_validation_end(self, trainer, module):
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                               if k.startswith("val/"))
            print(f"validation at step {trainer.global_step} {metrics}", flush=True)


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    return "bf16-mixed" if on_gpu else "32-true"


def build(cfg: TrainConfig, out: Path):
    """The LightningModule and DataModule of a config (frozen encoders loaded once here)."""
    from model.data import LatentDataModule
    from model.lit import AceDiTModule
    from model.lyric_encoder import load_lyric_tokenizer
    from model.text_encoder import load_text_encoder

    text_encoder = load_text_encoder(cfg.text_encoder.checkpoint, cfg.tiny_dir, cfg.text_encoder.max_length)
    tokenizer = load_lyric_tokenizer(cfg.lyric_encoder.tokenizer, cfg.tiny_dir, cfg.lyric_encoder.max_tokens)
    data = LatentDataModule(cfg, tokenizer)
    data.setup("fit")
    cfg = data.cfg   # REPA target sizes left null in the config are now read from the shards
    module = AceDiTModule(cfg, text_encoder, tokenizer.vocab_size, out_dir=out)
    return module, data


def make_trainer(cfg: TrainConfig, out: Path, callbacks=()) -> L.Trainer:
    t = cfg.trainer
    checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", filename="step-{step:07d}",
                                  auto_insert_metric_name=False, every_n_train_steps=t.checkpoint_every,
                                  save_last=True, save_top_k=t.keep_checkpoints, monitor="step", mode="max")
    return L.Trainer(
        default_root_dir=out, max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=resolve_precision(cfg),
        gradient_clip_val=cfg.optim.grad_clip or None, log_every_n_steps=t.log_every,
        val_check_interval=t.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        logger=[ResumableCSVLogger(out, name="csv", version=""), TensorBoardLogger(out, name="tb", version="")],
        callbacks=[checkpoints, LearningRateMonitor("step"), LogLines(t.log_every), *callbacks],
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )


def fit(cfg: TrainConfig, out: str | Path, resume: bool = False, callbacks=()) -> dict:
    """Train (or resume) a run in `out`; returns what final.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    last = out / "checkpoints" / "last.ckpt"
    ckpt_path = None
    if resume:
        if last.is_file():
            ckpt_path = str(last)
            print(f"train: resuming from {last}", flush=True)
        else:
            print(f"train: --resume but no {last}; starting from scratch", flush=True)
    module, data = build(cfg, out)
    trainer = make_trainer(cfg, out, callbacks)
    if trainer.is_global_zero:   # under DDP every rank runs this function; one writes
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    final = {"step": trainer.global_step,
             "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items())},
             "checkpoint": str(last) if last.is_file() else None, "out": str(out)}
    if trainer.is_global_zero:
        (out / "final.json").write_text(json.dumps(final, indent=1))
    return final


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training YAML or a name under configs/train/")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, samples)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--shards", help="latents dir (overrides data.shards)")
    p.add_argument("--max-steps", type=int, help="overrides trainer.max_steps")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. optim.lr=3e-4")
    return p


def main(argv: list[str] | None = None) -> int:
    from model.data import ShardError
    from schemas.config import ConfigError
    from tasks.models import ModelLoadError

    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.max_steps is not None:
        overrides.append(f"trainer.max_steps={args.max_steps}")
    try:
        cfg = load_train_config(args.config, overrides)
        final = fit(cfg, args.out, resume=args.resume)
    except ConfigError as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    except (ShardError, FileNotFoundError, ModelLoadError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    print(f"train: done at step {final['step']}; checkpoint {final['checkpoint']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
