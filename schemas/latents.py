"""Config model and output schemas of the latents stage (see tasks/latents.py).

Per dataset, under `latents/<dataset>/`:
  shard-NNNNNN.tar            one latent shard per audio shard (WebDataset, same number)
  records/shard-NNNNNN.parquet  every track of that audio shard: ok or rejected, with reason;
                              its schema metadata: fingerprint, encoder_id, revision, and the
                              latent tar's tar_bytes and tar_blake2b (blake2b-128 hex) as written
  index.parquet               ok tracks only (shard, track_id, frames, ...), written last
  rejects.parquet             the rejected tracks of all shards, with reasons
"""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import stage_schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class MelConfig(_Strict):
    """ACE-Step's vocoder log-mel (music_vocoder LogMelSpectrogram) and the DCAE input scaling."""
    sample_rate: int = Field(44100, gt=0, description="audio rate the mel is computed at")
    n_fft: int = Field(2048, gt=0, description="FFT size (no centring: frames = samples // hop_length)")
    win_length: int = Field(2048, gt=0, description="periodic Hann window length")
    hop_length: int = Field(512, gt=0, description="samples per mel frame")
    n_mels: int = Field(128, gt=0, description="Slaney-scale, area-normalised triangular filters")
    f_min: float = Field(40.0, ge=0, description="lowest filter edge, Hz")
    f_max: float = Field(16000.0, gt=0, description="highest filter edge, Hz")
    magnitude_eps: float = Field(1e-6, gt=0, description="|X| = sqrt(re^2 + im^2 + eps)")
    log_clamp: float = Field(1e-5, gt=0, description="log(max(mel, log_clamp))")
    min_value: float = Field(-11.0, description="log-mel mapped to -1")
    max_value: float = Field(3.0, description="log-mel mapped to +1")


class DcaeConfig(_Strict):
    checkpoint: str = Field("ACE-Step/ACE-Step-v1-3.5B",
                            description="hub id, local dir, or tiny:dcae (AutoencoderDC.from_pretrained)")
    subfolder: str | None = Field("music_dcae_f8c8", description="folder of the AutoencoderDC in checkpoint")
    revision: str | None = Field(None, description="hub revision (commit or tag); null: main")
    scale: float = Field(0.1786, description="latent = (encoder(mel) - shift) * scale")
    shift: float = Field(-1.9091, description="ACE-Step's latent shift (see scale)")
    time_multiple: int = Field(8, gt=0, description="mel frames per latent frame (f8); audio is padded "
                                                    "to a multiple of hop_length * time_multiple")
    vocoder: str | None = Field(None, description="'module:callable' taking (mel, sample_rate) and "
                                "returning audio; only decode-to-audio needs it")


class SslTargetConfig(_Strict):
    """A REPA target encoder: hidden states of one layer, mono, chunked, pooled to latent frames."""
    enabled: bool = Field(True, description="compute and store <name>.npy for REPA")
    checkpoint: str = Field(..., description="hub id, local dir or tiny:<name> (transformers AutoModel)")
    revision: str | None = Field(None, description="hub revision (commit or tag); null: main")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint "
                                    "(MERT's MERTModel needs it; HuBERT does not)")
    layer: int = Field(-1, description="index into hidden_states (0 = conv features, -1 = last layer)")
    chunk_s: float = Field(..., gt=0, description="long audio is encoded in chunks of this many seconds")
    batch_size: int = Field(8, ge=1, description="chunks per forward pass")


class LatentsConfig(_Strict):
    enabled: bool = Field(True, description="false: the latents flow does nothing")
    mel: MelConfig = MelConfig()
    dcae: DcaeConfig = DcaeConfig()
    mert: SslTargetConfig = SslTargetConfig(checkpoint="m-a-p/MERT-v1-330M", trust_remote_code=True,
                                            chunk_s=5.0)
    mhubert: SslTargetConfig = SslTargetConfig(checkpoint="utter-project/mHuBERT-147", chunk_s=30.0)
    batch_size: int = Field(4, ge=1, description="tracks per DCAE forward (sorted by duration)")
    max_batch_frames: int = Field(8192, ge=1, description="latent frames per DCAE forward, padding "
                                  "included (a longer track goes alone)")
    compute_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="dtype of every model of the stage (DCAE, MERT, mHuBERT) on a GPU; a CPU "
                                "always computes in float32 (bench/latents_dtype.py: what bfloat16 moves)")
    storage_dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="bfloat16 rounds to bf16 precision, stored in float16 .npy (numpy has no bf16)")
    decode_workers: int = Field(2, ge=1, description="threads decoding FLAC ahead of the encoder")


def output_config(cfg: LatentsConfig) -> dict:
    """The part of the config that decides what the latent shards hold (not how fast)."""
    data = cfg.model_dump(mode="json")
    for key in ("enabled", "batch_size", "max_batch_frames", "decode_workers"):
        data.pop(key)
    for name in ("mert", "mhubert"):
        data[name].pop("batch_size")
        if not data[name]["enabled"]:
            data[name] = {"enabled": False}
    data["dcae"].pop("vocoder")
    return data


# One row per track of an audio shard: latents/<dataset>/records/shard-NNNNNN.parquet.
LATENT_RECORD_SCHEMA = stage_schema(
    pa.field("shard", pa.string()),
    pa.field("frames", pa.int32()),          # latent frames stored (last axis of latent.npy)
    pa.field("valid_length", pa.int32()),    # frames wholly covered by audio
    pa.field("duration", pa.float64()),      # seconds of decoded audio
    pa.field("audio_sha", pa.string()),      # sha256 of the FLAC bytes encoded
    pa.field("targets", pa.list_(pa.string())),   # REPA features stored (mert, mhubert)
)

# latents/<dataset>/index.parquet: ok tracks only; what the trainer's DataModule reads.
LATENT_INDEX_SCHEMA = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("frames", pa.int32()),
    pa.field("valid_length", pa.int32()),
    pa.field("duration", pa.float64()),
])

LATENT_REJECTS_SCHEMA = pa.schema([
    pa.field("shard", pa.string()),
    pa.field("track_id", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
])
