"""Pydantic models of the pipeline config, and the one config loader.

Config is YAML (configs/default.yaml: real models; configs/tiny.yaml: offline twins),
validated here. Unknown keys are an error naming the key. Overrides come from
`--set a.b=value` on the CLI and `ACEPIPE__A__B=value` environment variables, applied
by `load_config` only: stages never read the environment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from schemas.stages import (
    AestheticsConfig,
    CaptionConfig,
    LatentsConfig,
    LyricsConfig,
    PackConfig,
    RhythmConfig,
    TranscribeConfig,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AudioConfig(Strict):
    """Guards of the one audio loader (tasks/audio.py)."""
    min_duration_s: float = Field(1.0, description="shorter tracks are rejected as too_short")
    max_duration_s: float = Field(1200.0, description="longer tracks are rejected as too_long")
    silence_dbfs: float = Field(-70.0, description="a peak below this is digital silence")
    allowed_channels: list[int] = Field([1, 2, 6], description="1 mono, 2 stereo, 6 = 5.1 (down-mixed)")
    ffmpeg: str = Field("ffmpeg", description="ffmpeg binary for formats soundfile cannot read")
    cache_mb: int = Field(512, description="per-process cache of decoded audio shared by stages")


class IngestConfig(Strict):
    partition_size: int = Field(500, ge=1, description="tracks per partition (append-only)")
    extensions: list[str] = Field(
        [".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif"],
        description="file suffixes to discover (case-insensitive)",
    )
    hash_chunk_mb: int = Field(4, ge=1, description="read size while hashing")


class RunnerConfig(Strict):
    kind: Literal["threads", "dask", "ray"] = "threads"
    max_workers: int = Field(2, ge=1, description="threads (or dask workers for a local cluster)")
    address: str | None = Field(None, description="existing Dask scheduler / Ray cluster address")
    gpu_concurrency: int = Field(1, ge=1, description="the Prefect tag concurrency limit `gpu` is created "
                                 "with this value when missing; it caps stage tasks running on CUDA")


class ModelsConfig(Strict):
    tiny_dir: str = Field(".cache/tiny-models", description="where tiny twins are built on first use")


class Config(Strict):
    profile: str = "default"
    work_root: str = Field("work", description="local path or fsspec URL of the stage store")
    sources: list[str] = Field(default_factory=list, description="dirs, fsspec URLs or .txt file lists")
    lyrics_db: str | None = Field(None, description="Parquet/JSONL canonical lyrics database")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    stages: list[str] = Field(
        ["probe"],
        description="stages the curate flow runs, in DAG order",
    )
    audio: AudioConfig = AudioConfig()
    ingest: IngestConfig = IngestConfig()
    runner: RunnerConfig = RunnerConfig()
    models: ModelsConfig = ModelsConfig()
    aesthetics: AestheticsConfig = AestheticsConfig()
    transcribe: TranscribeConfig = TranscribeConfig()
    lyrics: LyricsConfig = LyricsConfig()
    caption: CaptionConfig = CaptionConfig()
    rhythm: RhythmConfig = RhythmConfig()
    pack: PackConfig = PackConfig()
    latents: LatentsConfig = LatentsConfig()

    _skipped: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _lyrics_runs_when_there_is_a_database(self):
        # The profiles list every stage; the lyrics stage needs a database an operator brings,
        # so without one the run goes on without it (the curate flow says so) rather than refusing.
        if "lyrics" in self.stages and not self.lyrics_db:
            self.stages = [s for s in self.stages if s != "lyrics"]
            self._skipped["lyrics"] = (
                "lyrics_db is not set. Set lyrics_db to a Parquet/JSONL lyrics database (`--set "
                "lyrics_db=PATH`, see `acepipe lyrics index`) to align transcripts to canonical lyrics")
        return self

    @property
    def skipped_stages(self) -> dict[str, str]:
        """Stages the profile lists that this config cannot run, and why (the curate flow logs them)."""
        return dict(self._skipped)


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and the key."""


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def profiles(directory: Path = CONFIG_DIR) -> list[str]:
    """The profile names shipped in a config directory ('default', 'tiny', ...)."""
    return sorted(q.stem for q in directory.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path, or a profile name under configs/ ('tiny' -> configs/tiny.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"config {str(name_or_path)!r} not found (a YAML path or one of: "
                      + ", ".join(profiles()) + ")")


def load_config(name_or_path: str | Path = "default", overrides: list[str] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """Read YAML, apply ACEPIPE__* environment and `key=value` overrides, validate."""
    path = resolve_config_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if name.startswith("ACEPIPE__"):
            dotted = name[len("ACEPIPE__"):].lower().replace("__", ".")
            _set_path(tree, dotted, yaml.safe_load(raw) if raw else "")
    for item in overrides or []:
        _set_path(tree, *_parse_override(item))
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def section_dump(model: BaseModel) -> dict:
    """A section as plain JSON-able data (what stage keys hash)."""
    return model.model_dump(mode="json")


def describe(model: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf key of a config as (dotted key, value, description): `acepipe config --explain`."""
    rows: list[tuple[str, Any, str]] = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows += describe(value, key + ".")
        else:
            rows.append((key, value.model_dump(mode="json") if isinstance(value, BaseModel) else value,
                         field.description or ""))
    return rows
