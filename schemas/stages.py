"""Re-exports every stage's config model so schemas/config.py can assemble the whole config.

Each stage's own Arrow schema and config model live in schemas/<stage>.py.
"""
from schemas.aesthetics import AestheticsConfig
from schemas.caption import CaptionConfig
from schemas.latents import LatentsConfig
from schemas.lyrics import LyricsConfig
from schemas.pack import PackConfig
from schemas.rhythm import RhythmConfig
from schemas.transcribe import TranscribeConfig

__all__ = ["AestheticsConfig", "CaptionConfig", "LatentsConfig", "LyricsConfig",
           "PackConfig", "RhythmConfig", "TranscribeConfig"]
