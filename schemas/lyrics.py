"""Config model and output schema of the lyrics stage (see tasks/lyrics.py)."""
from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.common import stage_schema


class LyricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    num_perm: int = Field(128, description="MinHash permutations")
    shingle_k: int = Field(4, description="IPA character shingle length")
    window_lines: int = Field(2, description="database lines per indexed window")
    lsh_threshold: float = Field(0.3, description="LSH Jaccard threshold for candidate windows")
    min_score: float = Field(0.5, description="containment of the transcript in the song to accept a match")
    min_shingles: int = Field(12, description="transcripts with fewer phoneme shingles are not matched")
    max_chars: int = Field(20000, description="longer lyrics/transcripts are cut (50k-word texts)")
    retry_languages: int = Field(20, description="on no match, re-phonemise with up to N other database languages (a wrong language tag)")
    fallback_voice: str = Field("en-us", description="espeak voice for languages without a mapping")
    redis_url: str | None = Field(None, description="redis://host:port for an LSH too large for one process")


LYRICS_SCHEMA = stage_schema(
    pa.field("lyric_id", pa.string()),
    pa.field("score", pa.float32()),
    pa.field("match_reason", pa.string()),
    pa.field("title", pa.string()),
    pa.field("artist", pa.string()),
    pa.field("language", pa.string()),
    pa.field("lyrics", pa.string()),
    pa.field("alignment", pa.list_(pa.struct([
        ("line", pa.string()), ("section", pa.string()), ("start", pa.float64()),
        ("end", pa.float64()), ("score", pa.float32())]))),
)
