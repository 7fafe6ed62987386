"""Config model and output schema of the caption stage (see tasks/caption.py)."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.common import stage_schema

# Qwen2.5-Omni's own system prompt: the model was tuned with it, and its processor warns
# when it is changed.
QWEN_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                      "perceiving auditory and visual inputs, as well as generating text and speech.")

# One answer holds the stage's own fields and ACE-Step's description variants, the keys its
# trainer reads as `recaption` (acestep/text2music_dataset.py picks one non-empty variant or
# the joined tags per step). The variants' definitions and the rule to ignore the lyrics are
# quoted from the Qwen-Omni prompt in ACE-Step's TRAIN_INSTRUCTION.md (sys_prompt_without_tag);
# its `analysis` lists are our genre/instruments/mood lists; its analysis.tempo and
# lyrical_rap_check are not asked for (the rhythm stage measures tempo; nothing reads the check).
RECAPTION_KEYS = ("simplified", "expanded", "descriptive", "synonyms", "use_cases")

CAPTION_PROMPT = (
    "Analyze the input audio and caption it for a music dataset. Strictly ignore any information derived "
    "solely from the lyrics: describe only the audible musical elements. Reply with one JSON object and "
    "nothing else, with these keys:\n"
    '"description": two or three sentences on what is heard (instruments, vocals, arrangement) and its mood;\n'
    '"genre": a list of genres; "instruments": a list of the instruments actually heard playing (not those '
    'merely mentioned or sung about in the lyrics); "vocals": a list describing the voices (e.g. "female vocals", '
    '"choir"), or ["instrumental"] if there are none; "mood": a list of mood words; "tags": a list of any '
    "other short descriptive phrases;\n"
    "and five description variants of those tags (genre, instruments, vocals, mood, tags), each one "
    "string of under 200 characters:\n"
    '"simplified": Use only one most representative tag from the valid set.\n'
    '"expanded": Broaden valid tags to include related sub-genres/techniques.\n'
    '"descriptive": Convert tags into a sensory-rich sentence based only on the sound. '
    "Do not transcribe or reference the lyrics.\n"
    "\"synonyms\": Replace tags with equivalent terms (e.g., 'strings' -> 'orchestral').\n"
    '"use_cases": Suggest practical applications based on audio characteristics.\n'
    'Example: {"description": "An upbeat pop song with bright synths and a female singer.", '
    '"genre": ["pop"], "instruments": ["synthesizer", "drums"], "vocals": ["female vocals"], '
    '"mood": ["happy", "energetic"], "tags": ["dance"], "simplified": "pop", '
    '"expanded": "synth-pop, dance pop, electropop, four-on-the-floor beat", '
    '"descriptive": "Bright shimmering synths over a punchy dance beat, a clear female voice soaring above.", '
    '"synonyms": "electronic pop, keyboards, percussion, upbeat", '
    '"use_cases": "workout playlists, party background, upbeat commercials"}'
)

TAG_SYNONYMS = {
    "hip hop": "hip-hop", "hiphop": "hip-hop", "rap music": "rap",
    "rnb": "r&b", "r and b": "r&b", "rhythm and blues": "r&b",
    "edm": "electronic dance music", "electronica": "electronic",
    "drum kit": "drums", "drum set": "drums", "drumkit": "drums",
    "synth": "synthesizer", "synths": "synthesizer", "keys": "keyboard",
    "e-guitar": "electric guitar", "acoustic guitars": "acoustic guitar", "guitars": "guitar",
    "vocal": "vocals", "vox": "vocals", "male vocal": "male vocals", "female vocal": "female vocals",
    "male voice": "male vocals", "female voice": "female vocals", "male singer": "male vocals",
    "female singer": "female vocals",
    "no vocals": "instrumental", "none": "instrumental", "no vocal": "instrumental",
    "sad mood": "sad", "melancholic": "melancholy",
}


class CaptionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    enabled: bool = True
    backend: Literal["transformers", "openai"] = Field(
        "transformers", description="transformers: the Qwen2.5-Omni thinker in this process; openai: an "
        "OpenAI-compatible chat-completions server with audio input (e.g. vLLM serving Qwen2.5-Omni)")
    # transformers backend
    checkpoint: str = Field("Qwen/Qwen2.5-Omni-7B", description="Qwen2.5-Omni checkpoint: local directory, "
                            "hub id, or tiny:qwen_omni. Only the thinker (text output) is loaded")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    attn_implementation: str | None = Field(None, description="transformers attention kernel "
                                            "(null: sdpa; flash_attention_2 if installed)")
    batch_size: int = Field(8, ge=1, description="tracks per generate() call (or concurrent requests)")
    # both backends
    clip_s: float = Field(30.0, gt=0, description="seconds of audio the model hears, from the middle "
                          "of the track (the whole track when shorter)")
    system_prompt: str = Field(QWEN_SYSTEM_PROMPT, description="system message")
    prompt: str = Field(CAPTION_PROMPT, description="user instruction after the audio; it must ask for JSON "
                        "or Description:/Genre:/Instruments:/Vocals:/Mood:/Tags: lines (what the parser reads), "
                        "with ACE-Step's variants (simplified, expanded, descriptive, synonyms, use_cases) as "
                        "string keys or lines: the recaption column")
    max_new_tokens: int = Field(512, ge=1, description="generation cap per track (the default prompt's answer: "
                                "about 900-1,800 characters of JSON, some 250-450 Qwen2 tokens)")
    retry_max_new_tokens: int | None = Field(
        None, ge=1, description="an answer cut at max_new_tokens (it ran out of tokens before its end "
        "token; OpenAI finish_reason 'length') is generated once more with this cap; null = twice "
        "max_new_tokens; equal to max_new_tokens = no retry. Still cut: a truncated_caption reject")
    on_malformed: Literal["reject", "keep_raw"] = Field(
        "reject", description="an answer with no usable description or tags, or still cut after the "
        "retry: reject the track (malformed_caption / truncated_caption, raw kept), or keep it as far "
        "as it parses, else with the raw text as its description and only the BPM/key tags (the tiny "
        "profile: a random twin never writes JSON nor ends its answer)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy (reproducible); >0 samples")
    # openai backend
    url: str = Field("http://127.0.0.1:8000/v1", description="base URL of the chat-completions server")
    served_model: str = Field("Qwen/Qwen2.5-Omni-7B", description="model name sent in requests")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout; a timeout or 5xx retries the "
                             "partition (Prefect back-off)")
    api_key: str | None = Field(None, description="bearer token for the server, if it wants one")
    # parsing
    synonyms: dict[str, str] = Field(default_factory=lambda: dict(TAG_SYNONYMS),
                                     description="tag phrase -> canonical phrase, applied after lower-casing")
    max_tags: int = Field(32, ge=1, description="keep at most this many tags per track")
    max_tag_words: int = Field(4, ge=1, description="longer phrases are dropped from the tags")

    @model_validator(mode="after")
    def _retry_budget_is_not_smaller(self) -> "CaptionConfig":
        if self.retry_max_new_tokens is not None and self.retry_max_new_tokens < self.max_new_tokens:
            raise ValueError(f"caption.retry_max_new_tokens={self.retry_max_new_tokens} is below "
                             f"caption.max_new_tokens={self.max_new_tokens}; set it higher (or null for "
                             "twice max_new_tokens, or equal to max_new_tokens for no retry)")
        return self

    @property
    def retry_budget(self) -> int:
        """max_new_tokens of the one retry of a cut answer (max_new_tokens itself: no retry)."""
        return self.retry_max_new_tokens or 2 * self.max_new_tokens


# ACE-Step's description variants as one column; a variant the answer lacks (or gave as a
# non-string) is null, and the whole struct is null when the answer has none.
RECAPTION = pa.struct([(k, pa.string()) for k in RECAPTION_KEYS])

CAPTION_SCHEMA = stage_schema(
    pa.field("description", pa.string()),
    pa.field("tags", pa.list_(pa.string())),         # every phrase below, normalised, plus BPM/key words
    pa.field("genre", pa.list_(pa.string())),
    pa.field("instruments", pa.list_(pa.string())),
    pa.field("vocals", pa.list_(pa.string())),       # e.g. ["female vocals"] or ["instrumental"]
    pa.field("mood", pa.list_(pa.string())),
    pa.field("recaption", RECAPTION),
    pa.field("finish_reason", pa.string()),          # stop | length (cut at the token cap), as the backend
                                                     # said; null when no answer came (bad audio, 4xx)
    pa.field("clip_start", pa.float32()),            # seconds: where the heard clip starts
    pa.field("clip_s", pa.float32()),                # seconds heard
    pa.field("raw", pa.string()),                    # the model's text, always kept for debugging
    pa.field("backend", pa.string()),                # transformers | openai
    pa.field("model", pa.string()),                  # checkpoint or served model name
)
