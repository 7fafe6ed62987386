"""Config model and output schema of the rhythm stage (see tasks/rhythm.py)."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import stage_schema


class RhythmConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    beat_tracker: Literal["beat_this", "essentia", "onset"] = Field(
        "beat_this", description="who gives beats and BPM: Beat This; Essentia's RhythmExtractor2013 (no "
        "weights, ~15x real time per core); or onset, the stage's own comb tempogram with a metrical-level "
        "classifier (tasks/tempo.py; no weights, ~1000x real time)")
    cross_check: Literal["onset", "essentia", "none"] = Field(
        "onset", description="a second tempo recorded beside the tracker's (cross_check_bpm): onset, the "
        "comb tempogram the stage computes anyway (~1 ms per audio second); essentia, RhythmExtractor2013 "
        "(40-80 ms per audio second, too slow for 50x real time per core); none. Skipped when it names "
        "the tracker itself")
    checkpoint: str = Field("final0", description="Beat This checkpoint: a local .ckpt (or a directory "
                            "holding one), a released name (final0, small0, ...), or tiny:beat_this")
    batch_size: int = Field(4, ge=1, description="Beat This chunks per forward pass")
    chunk_frames: int = Field(1500, ge=64, description="Beat This chunk length in frames (50 fps), as the reference")
    border_frames: int = Field(6, ge=0, description="frames discarded at each chunk edge, as the reference")
    float16: bool = Field(False, description="autocast Beat This to float16 on CUDA")
    min_bpm: float = Field(40.0, gt=0, description="slowest tempo reported")
    max_bpm: float = Field(250.0, gt=0, description="fastest tempo reported")
    min_tempo_s: float = Field(6.0, ge=0, description="shorter tracks get no tempo (too few beats to trust)")
    min_tempo_confidence: float = Field(
        0.3, ge=0, le=1, description="below this bpm_confidence (0-1, the calibrated probability that the BPM "
        "is within 4%) the track gets no tempo, with the reason")
    key_method: Literal["evidence", "essentia"] = Field(
        "evidence", description="evidence: tasks/key.py (profiles, bass, cadence and chord evidence, a fitted "
        "conditional logit; key exact 0.9+ on the bench's minor keys); essentia: KeyExtractor with key_profile")
    key_profile: str = Field("edma", description="Essentia KeyExtractor profileType with key_method=essentia "
                             "(edma, bgate, krumhansl, temperley, shaath, ...)")
    min_key_confidence: float = Field(
        0.3, ge=0, le=1, description="with key_method=evidence: below this key_confidence (0-1) there is no key")
    min_key_s: float = Field(5.0, ge=0, description="shorter tracks get no key")
    min_key_strength: float = Field(0.6, ge=0, le=1, description="with key_method=essentia: below this "
                                    "KeyExtractor strength there is no key")
    min_tonalness: float = Field(
        0.1, ge=0, le=1, description="share of spectral energy in peaks (100-5000 Hz) below which the track "
        "is too noisy for a key (noise scores ~0.02, tonal music 0.15-0.9: drum-heavy mixes go below 0.25)")
    structure: bool = Field(True, description="segment the track into sections")
    segment_kernel_beats: int = Field(6, ge=2, description="half-width of the checkerboard novelty kernel, in beats")
    min_segment_beats: int = Field(6, ge=1, description="shortest section, in beats")
    same_section: float = Field(0.6, ge=0, le=1, description="segment similarity above which two segments "
                                "are the same section (repetition -> verse/chorus)")


SEGMENT = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("label", pa.string())])

RHYTHM_SCHEMA = stage_schema(
    pa.field("bpm", pa.float64()),
    pa.field("bpm_confidence", pa.float64()),         # 0-1: calibrated P(bpm within 4% of the true tempo)
    pa.field("tempo_source", pa.string()),            # beat_this | essentia | onset
    pa.field("cross_check", pa.string()),             # onset | essentia | null: who gave cross_check_bpm
    pa.field("cross_check_bpm", pa.float64()),        # the second opinion (Essentia's octave-checked)
    pa.field("cross_check_confidence", pa.float64()),  # onset: calibrated 0-1; essentia: its own 0-5.32
    pa.field("beats", pa.list_(pa.float64())),
    pa.field("downbeats", pa.list_(pa.float64())),
    pa.field("meter", pa.int32()),
    pa.field("key", pa.string()),
    pa.field("scale", pa.string()),
    pa.field("key_strength", pa.float64()),           # the method's own score (softmax p or KeyExtractor strength)
    pa.field("key_confidence", pa.float64()),         # 0-1: calibrated P(key and scale right)
    pa.field("tonalness", pa.float64()),
    pa.field("segments", pa.list_(SEGMENT)),
    pa.field("tempo_phrase", pa.string()),
    pa.field("key_phrase", pa.string()),
    pa.field("no_tempo_reason", pa.string()),
    pa.field("no_key_reason", pa.string()),
)
