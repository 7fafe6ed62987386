"""The condition sequence the DiT cross-attends to: [speaker | prompt | lyrics], at DiT width.

The prompt arrives already encoded by the frozen mT5 (model/text_encoder.py) and is projected;
the lyrics go through the trainable Conformer (model/lyric_encoder.py); the 512-d speaker
embedding is projected to one token (zeros for instrumentals). Dropping a condition for
classifier-free guidance zeroes it and shortens it to one masked-in token, so the "null"
condition is the same at training and sampling time and always leaves a key to attend to.
"""
from __future__ import annotations

import torch
from torch import nn

from model.lyric_encoder import LyricEncoder
from schemas.train import ConditionConfig, LyricEncoderConfig


def draw_keep(batch: int, drop_p: float, device, generator=None) -> torch.Tensor:
    """(B,) bool: True where the condition is kept this step."""
    return torch.rand(batch, device=device, generator=generator) >= drop_p


class ConditionEncoder(nn.Module):
    def __init__(self, width: int, text_dim: int, lyric_vocab: int, lyric: LyricEncoderConfig,
                 conditions: ConditionConfig):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, width)
        self.lyric_encoder = LyricEncoder(lyric_vocab, lyric.width, lyric.layers, lyric.heads,
                                          lyric.conv_kernel, out_dim=width)
        self.speaker_proj = nn.Linear(conditions.speaker_dim, width)

    @staticmethod
    def _drop(seq, mask, keep):
        """Zero a dropped sequence and leave only its first position masked in."""
        seq = seq * keep[:, None, None].to(seq.dtype)
        first = torch.zeros_like(mask)
        first[:, 0] = True
        return seq, torch.where(keep[:, None], mask, first)

    def forward(self, text, text_mask, lyric_ids, lyric_mask, speaker,
                keep_text=None, keep_lyrics=None, keep_speaker=None):
        """text (B, Lt, text_dim), lyric_ids (B, Ll), speaker (B, 512) -> cond (B, 1+Lt+Ll, W), mask."""
        B = text.shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=text.device)
        keep_text = ones if keep_text is None else keep_text
        keep_lyrics = ones if keep_lyrics is None else keep_lyrics
        keep_speaker = ones if keep_speaker is None else keep_speaker

        text, text_mask = self._drop(text.to(self.text_proj.weight.dtype), text_mask, keep_text)
        text_tokens = self.text_proj(text)                                         # (B, Lt, W)
        lyric_tokens = self.lyric_encoder(lyric_ids, lyric_mask)                   # (B, Ll, W)
        lyric_tokens, lyric_mask = self._drop(lyric_tokens, lyric_mask, keep_lyrics)
        speaker = speaker.to(self.speaker_proj.weight.dtype) * keep_speaker[:, None].to(self.speaker_proj.weight.dtype)
        speaker_token = self.speaker_proj(speaker)[:, None]                        # (B, 1, W)
        cond = torch.cat([speaker_token, text_tokens, lyric_tokens], dim=1)
        mask = torch.cat([ones[:, None], text_mask, lyric_mask], dim=1)
        return cond, mask
