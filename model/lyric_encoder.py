"""The trainable lyric encoder: a Conformer over tokenised lyrics, and its tokenizer.

The tokenizer is a `tokenizers` JSON file (ACE-Step ships a BPE one with language tokens);
lyrics are encoded as [<language token>] + BPE ids of the text, structure tags such as
[verse]/[chorus] being single tokens. `tiny:lyric_tokenizer` resolves (tasks.models) to a
small byte-level BPE trained here on a few lines. The encoder's output (width of the DiT)
joins the prompt and the speaker in the condition sequence (model/conditions.py).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNK, START = "[PAD]", "[UNK]", "[START]"
STRUCTURE_TAGS = ["[verse]", "[chorus]", "[bridge]", "[intro]", "[outro]", "[pre-chorus]",
                  "[hook]", "[instrumental]", "[inst]"]
LANGUAGES = ["en", "de", "fr", "es", "it", "pt", "pl", "tr", "ru", "cs", "nl", "ar", "zh", "ja",
             "hu", "ko", "hi", "uk", "sv"]


class LyricTokenizer:
    def __init__(self, path: str | Path, max_tokens: int = 2048):
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"lyric tokenizer {path} not found: set lyric_encoder.tokenizer to a "
                                    "tokenizers JSON file (or tiny:lyric_tokenizer)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.max_tokens = max_tokens
        vocab = self.tokenizer.get_vocab()
        self.pad_id = vocab.get(PAD, 0)
        self.start_id = vocab.get(START, self.pad_id)
        self.language_ids = {lang: vocab[f"[{lang}]"] for lang in LANGUAGES if f"[{lang}]" in vocab}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, lyrics: str, language: str | None = None) -> list[int]:
        """Never empty: a leading language (or start) token, so instrumentals have one token."""
        first = self.language_ids.get((language or "").lower()[:2], self.start_id)
        ids = self.tokenizer.encode(lyrics or "", add_special_tokens=False).ids if lyrics else []
        return [first, *ids][: self.max_tokens]

    def batch(self, lyrics: list[str], languages: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, L) long padded with pad_id, mask (B, L) bool."""
        seqs = [self.encode(text, lang) for text, lang in zip(lyrics, languages)]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        return ids, mask


def load_lyric_tokenizer(ref: str, tiny_dir: str | Path, max_tokens: int = 2048) -> LyricTokenizer:
    from tasks.models import loading, resolve_checkpoint

    with loading("lyric_encoder.tokenizer", ref, "point it at a directory holding tokenizer.json "
                 "or use tiny:lyric_tokenizer"):
        return LyricTokenizer(resolve_checkpoint(ref, tiny_dir), max_tokens)


_TINY_LYRICS = [
    "[verse]\nwalking down the empty street tonight\nall the city lights are shining bright",
    "[chorus]\nsing it loud, sing it clear\nevery heartbeat brings you near",
    "[bridge]\nje marche seul dans la nuit\nbailando bajo la luna",
    "[verse]\n夜空の星が光る\n我们一起唱歌\n사랑해 오늘 밤",
    "[outro]\nauf wiedersehen mein freund\nadeus meu amor",
]


def build_tiny_tokenizer(path: Path) -> None:
    """Train a byte-level BPE (a few hundred tokens) on a few lines; write path/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, UNK, START] + [f"[{lang}]" for lang in LANGUAGES] + STRUCTURE_TAGS
    tok.train_from_iterator(_TINY_LYRICS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(Path(path) / "tokenizer.json"))


# --- the Conformer -------------------------------------------------------------------------

def sinusoidal_positions(n: int, dim: int, device) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return table                                                   # (n, dim)


class FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int = 4):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.SiLU(),
                         nn.Linear(mult * width, width))


class ConvModule(nn.Module):
    """Conformer conv module; padding is zeroed before the depthwise conv so it cannot leak."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.pointwise_in = nn.Linear(width, 2 * width)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.norm_mid = nn.LayerNorm(width)   # LayerNorm, not BatchNorm: no dependence on batch padding
        self.pointwise_out = nn.Linear(width, width)

    def forward(self, x, mask):
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1) * mask[..., None]   # (B, L, W)
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_out(F.silu(self.norm_mid(h)))


class ConformerBlock(nn.Module):
    def __init__(self, width: int, heads: int, kernel: int):
        super().__init__()
        self.heads = heads
        self.ff1, self.ff2 = FeedForward(width), FeedForward(width)
        self.norm_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.conv = ConvModule(width, kernel)
        self.norm_out = nn.LayerNorm(width)

    def forward(self, x, mask):
        B, L, W = x.shape
        x = x + 0.5 * self.ff1(x)
        q, k, v = self.qkv(self.norm_attn(x)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])   # (B, H, L, d)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, W))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x)


class LyricEncoder(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, kernel: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.blocks = nn.ModuleList(ConformerBlock(width, heads, kernel) for _ in range(layers))
        self.out = nn.Linear(width, out_dim)

    def forward(self, ids, mask):
        """ids (B, L) long, mask (B, L) bool -> (B, L, out_dim); padded positions zeroed."""
        x = self.embed(ids) * math.sqrt(self.embed.embedding_dim)
        x = x + sinusoidal_positions(ids.shape[1], x.shape[-1], x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x) * mask[..., None].to(x.dtype)
