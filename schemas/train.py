"""Pydantic models of a training config (configs/train/*.yaml), and its loader.

Defaults are the real-size model, with ACE-Step v1's public numbers; configs/train/tiny.yaml
overrides them for a CPU run on the synthetic corpus. Read by model/train.py and flows/train.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TRAIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "train"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class DiTConfig(Strict):
    """The linear DiT over DCAE latents (model/dit.py)."""
    in_channels: int = Field(8, description="DCAE latent channels")
    mel_bins: int = Field(16, description="latent mel bins (height of the latent)")
    patch_mel: int = Field(16, description="patch height: 16 = all mel bins in one token")
    patch_time: int = Field(1, description="patch width in latent frames")
    width: int = Field(2560, description="hidden size; must equal heads * head_dim")
    depth: int = Field(24, description="transformer blocks")
    heads: int = Field(20, description="attention heads")
    head_dim: int = Field(128, description="size of one head")
    mlp_ratio: float = Field(2.5, description="GLU feed-forward hidden size / width")
    conv_kernel: int = Field(3, description="depthwise conv kernel of the feed-forward (odd)")
    rope_theta: float = Field(1.0e6, description="rotary embedding base")

    @model_validator(mode="after")
    def _shapes(self):
        if self.width != self.heads * self.head_dim:
            raise ValueError(f"dit.width ({self.width}) must equal heads*head_dim "
                             f"({self.heads}*{self.head_dim})")
        if self.mel_bins % self.patch_mel:
            raise ValueError(f"dit.patch_mel ({self.patch_mel}) must divide mel_bins ({self.mel_bins})")
        if self.conv_kernel % 2 == 0:
            raise ValueError("dit.conv_kernel must be odd (same-length depthwise conv)")
        return self


class TextEncoderConfig(Strict):
    checkpoint: str = Field("google/umt5-base", description="mT5/UMT5 encoder: path, hub id or tiny:mt5")
    max_length: int = Field(256, description="prompt tokens kept")


class LyricEncoderConfig(Strict):
    tokenizer: str = Field("checkpoints/lyric_tokenizer.json",
                           description="tokenizers JSON file (or a dir holding tokenizer.json), "
                                       "or tiny:lyric_tokenizer")
    width: int = Field(1024, description="Conformer width")
    layers: int = Field(6, description="Conformer blocks")
    heads: int = Field(16, description="Conformer attention heads")
    conv_kernel: int = Field(15, description="Conformer depthwise conv kernel (odd)")
    max_tokens: int = Field(2048, description="lyric tokens kept (the rest is cut)")


class ConditionConfig(Strict):
    text_dropout: float = Field(0.15, description="P(prompt dropped) per sample, for CFG")
    lyric_dropout: float = Field(0.15, description="P(lyrics dropped) per sample, independent of text")
    speaker_dropout: float = Field(0.5, description="P(speaker embedding zeroed) per sample")
    speaker_dim: int = Field(512, description="speaker embedding size in the shards")


class FlowConfig(Strict):
    logit_mean: float = Field(0.0, description="logit-normal timestep mean")
    logit_std: float = Field(1.0, description="logit-normal timestep std")
    shift: float = Field(3.0, description="timestep shift (>1 spends more steps near noise)")


class RepaTargetConfig(Strict):
    name: Literal["mert", "mhubert"] = Field(..., description="shard feature <name>.npy")
    dim: int | None = Field(..., description="feature size (MERT-v1-330M 1024, mHuBERT-147 768); "
                                              "null = read from the shards")
    weight: float = Field(1.0, description="weight of 1 - cos in the loss")
    checkpoint: str | None = Field(None, description="the encoder (for reference / online targets)")
    sample_rate: int | None = Field(None, description="encoder input rate")
    fps: float | None = Field(None, description="encoder frame rate")


class RepaConfig(Strict):
    enabled: bool = True
    depth: int = Field(8, description="0-based block whose output is aligned")
    projector_layers: int = Field(3, description="MLP layers (SiLU between)")
    projector_mult: float = Field(2.0, description="projector hidden = mult * DiT width")
    targets: list[RepaTargetConfig] = Field(default_factory=lambda: [
        RepaTargetConfig(name="mert", dim=1024, weight=1.0, checkpoint="m-a-p/MERT-v1-330M",
                         sample_rate=24000, fps=75.0),
        RepaTargetConfig(name="mhubert", dim=768, weight=1.0,
                         checkpoint="utter-project/mHuBERT-147", sample_rate=16000, fps=50.0),
    ])


class OptimConfig(Strict):
    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.8, 0.9)
    weight_decay: float = 1.0e-2
    eps: float = 1.0e-8
    grad_clip: float = Field(0.5, description="gradient norm clip (0 = off)")
    schedule: Literal["constant", "cosine"] = Field("constant", description="after warm-up")
    warmup_steps: int = 4000
    min_lr_ratio: float = Field(0.1, description="cosine floor as a fraction of lr")
    ema_decay: float = Field(0.9999, description="EMA of the DiT and condition weights (0 = off)")


class DataConfig(Strict):
    shards: str = Field("work/latents/default", description="latents dir with index.parquet and tars")
    batch_size: int = Field(1, description="per device")
    num_workers: int = 4
    max_frames: int = Field(2584, description="random crop length in latent frames (240 s)")
    shuffle_buffer: int = 256
    val_fraction: float = Field(0.01, description="tracks held out by track_id hash")
    val_samples: int = Field(4, description="validation tracks used (from train if none held out)")


class TrainerConfig(Strict):
    max_steps: int = 500_000
    accelerator: str = Field("auto", description="auto | cpu | gpu")
    devices: int | str = Field("auto", description="devices per node")
    num_nodes: int = 1
    strategy: str = Field("auto", description="auto picks ddp when more than one device")
    precision: str = Field("auto", description="auto = bf16-mixed on GPU, 32-true on CPU")
    log_every: int = 50
    val_every: int = Field(2000, description="validation every N training steps")
    checkpoint_every: int = Field(2000, description="checkpoint every N training steps")
    keep_checkpoints: int = Field(3, description="step checkpoints kept besides last.ckpt")


class ValidationConfig(Strict):
    samples: int = Field(4, description="latents sampled per validation")
    steps: int = Field(60, description="Euler steps")
    guidance: float = Field(15.0, description="classifier-free guidance scale")
    dcae_profile: str | None = Field("default", description="pipeline profile (or YAML) whose latents "
                                     "section names the DCAE that decodes samples to mel images "
                                     "(tasks.latents.load_dcae); null = draw the latents themselves")


class TrainConfig(Strict):
    name: str = "ace-dit"
    seed: int = 0
    tiny_dir: str = Field(".cache/tiny-models", description="where tiny:* twins are built")
    latent_fps: float = Field(44100 / 512 / 8, description="latent frames per second (10.77)")
    dit: DiTConfig = DiTConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    lyric_encoder: LyricEncoderConfig = LyricEncoderConfig()
    conditions: ConditionConfig = ConditionConfig()
    flow: FlowConfig = FlowConfig()
    repa: RepaConfig = RepaConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    validation: ValidationConfig = ValidationConfig()

    @model_validator(mode="after")
    def _repa_depth(self):
        if self.repa.enabled and not 0 <= self.repa.depth < self.dit.depth:
            raise ValueError(f"repa.depth ({self.repa.depth}) must be a block index below "
                             f"dit.depth ({self.dit.depth})")
        return self


def resolve_train_config(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = TRAIN_CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    from schemas.config import ConfigError, profiles

    raise ConfigError(f"training config {str(name_or_path)!r} not found (a YAML path or one of: "
                      + ", ".join(profiles(TRAIN_CONFIG_DIR)) + ")")


def load_train_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training YAML, apply `a.b=value` overrides, validate (errors name file and key)."""
    from schemas.config import ConfigError, _parse_override, _set_path

    path = resolve_train_config(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        _set_path(tree, *_parse_override(item))
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
