"""Config model and output schema of the transcribe stage (see tasks/transcribe.py)."""
from __future__ import annotations

import pyarrow as pa
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.common import stage_schema


class TranscribeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    model: str = Field("large-v3", description="an openai-whisper model name, a local .pt checkpoint "
                       "(or a directory holding model.pt), or tiny:whisper")
    download_root: str | None = Field(None, description="where named models are cached "
                                      "(whisper's default: ~/.cache/whisper)")
    fp16: bool = Field(True, description="half-precision compute on GPU (ignored on CPU)")
    batch_size: int = Field(16, ge=1, description="30 s windows per encoder/decoder batch")
    max_windows: int = Field(8, ge=1, description="the most vocal 30 s windows of a track (lowest no-speech "
                             "probability in the scan) that are transcribed: the vocal part of long tracks. "
                             "seek=fixed decodes exactly these windows; seek=timestamps seeks through them "
                             "as whisper's clip_timestamps (adjacent windows form one clip), which takes "
                             "about as many decode rounds, and stops a track after 2 x max_windows rounds")
    seek: Literal["timestamps", "fixed"] = Field(
        "timestamps", description="timestamps: as whisper.transcribe, each track's next window starts at the "
        "last complete segment's end timestamp (or last word end), so a line cut by the window edge is "
        "decoded whole in the next window; fixed: independent 30 s windows (a line at the edge is cut)")
    mel: Literal["track", "window"] = Field(
        "track", description="track: the log-mel of the whole track, cut into windows (as whisper.transcribe; "
        "its max-8 clamp sees the whole track); window: each window's own log-mel (older behaviour)")
    beam_size: int | None = Field(5, ge=1, description="beams at temperature 0 (whisper's CLI default 5); "
                                  "null decodes greedily. Fallback temperatures > 0 always sample one path")
    patience: float | None = Field(None, gt=0, description="beam search patience (null: 1.0, plain beam search)")
    condition_on_previous_text: bool = Field(
        False, description="prompt each window with the track's previous text, as whisper.transcribe's "
        "default; off here because on songs a repeated chorus or a hallucination then carries into the "
        "next windows (the prompt is also reset after a fallback above temperature 0.5, as in whisper)")
    language: str | None = Field(None, description="force a language code; null detects it per track")
    temperatures: list[float] = Field(
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        description="decode at the first; re-decode windows that fail compression_ratio_threshold or "
                    "logprob_threshold at the next (whisper's fallback)")
    sample_len: int | None = Field(None, ge=1, description="max tokens decoded per window "
                                   "(null: the model's n_text_ctx // 2)")
    word_timestamps: bool = Field(True, description="align words to audio (one extra forward per window)")
    # The instrumental rule. A window is speech when its no-speech probability is below
    # no_speech_threshold, or its transcript is confident (avg_logprob >= logprob_threshold);
    # its text is kept when it is also sane (compression ratio and repetition below the limits).
    # A track is instrumental when fewer than min_words words survive.
    no_speech_threshold: float = Field(0.6, ge=0, le=1, description="no-speech probability above which "
                                       "an unconfident window is silence/music")
    logprob_threshold: float = Field(-1.0, description="average token log-probability below which a "
                                     "decode is unconfident")
    compression_ratio_threshold: float = Field(2.4, gt=0, description="gzip compression ratio of the "
                                               "text above which it is a repetition loop")
    max_repetition: float = Field(0.5, gt=0, le=1, description="share of the words taken by the most "
                                  "frequent one above which the text is a hallucinated loop (with >= 6 words)")
    min_words: int = Field(3, ge=0, description="a track with fewer kept words is instrumental")


SEGMENT = pa.struct([
    pa.field("start", pa.float32()),
    pa.field("end", pa.float32()),
    pa.field("text", pa.string()),
    pa.field("avg_logprob", pa.float32()),
    pa.field("no_speech_prob", pa.float32()),
    pa.field("compression_ratio", pa.float32()),
])

WORD = pa.struct([
    pa.field("word", pa.string()),
    pa.field("start", pa.float32()),
    pa.field("end", pa.float32()),
    pa.field("probability", pa.float32()),
])

TRANSCRIBE_SCHEMA = stage_schema(
    pa.field("language", pa.string()),
    pa.field("language_prob", pa.float32()),
    pa.field("text", pa.string()),
    pa.field("segments", pa.list_(SEGMENT)),      # times in seconds from the track start
    pa.field("words", pa.list_(WORD)),
    pa.field("instrumental", pa.bool_()),
    pa.field("instrumental_reason", pa.string()),
    pa.field("no_speech_prob", pa.float32()),     # of the most vocal window (low = voice somewhere)
    pa.field("windows", pa.int32()),              # 30 s windows decoded
)
