"""The frozen prompt encoder: an mT5/UMT5 encoder (ACE-Step uses UMT5-base, 768-d).

Loaded from a path or hub id with transformers; `tiny:mt5` resolves (tasks.models) to a
twin built here: a small UMT5 encoder with random weights and a small tokenizer trained on a
few sentences, both saved with save_pretrained so the same loading code reads them. The
encoder is kept out of the LightningModule's state (see model/lit.py): frozen, never saved.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# model_type in config.json -> the encoder-only class to load.
_ENCODERS = {"umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel", "t5": "T5EncoderModel"}


class TextEncoder(nn.Module):
    def __init__(self, checkpoint: str, max_length: int = 256):
        super().__init__()
        import transformers

        config = transformers.AutoConfig.from_pretrained(checkpoint)
        if config.model_type not in _ENCODERS:
            raise ValueError(f"text encoder {checkpoint!r} is a {config.model_type!r} model; "
                             f"expected one of {sorted(_ENCODERS)} (an mT5/UMT5 checkpoint)")
        cls = getattr(transformers, _ENCODERS[config.model_type])
        self.model = cls.from_pretrained(checkpoint).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.max_length = max_length
        self.dim = int(config.d_model)

    @torch.no_grad()
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> hidden (B, L, dim) and mask (B, L) bool, on the encoder's device."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(texts), padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(device)
        hidden = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return hidden, batch.attention_mask.bool()


def load_text_encoder(ref: str, tiny_dir: str | Path, max_length: int = 256) -> TextEncoder:
    from tasks.models import loading, resolve_checkpoint

    with loading("text_encoder.checkpoint", ref, "point it at a local copy of an mT5/UMT5 checkpoint "
                 "(google/mt5-base as ACE-Step uses) or use tiny:mt5"):
        return TextEncoder(resolve_checkpoint(ref, tiny_dir), max_length)


_TINY_TEXT = [
    "an upbeat pop song with bright synths and a female vocal, 120 bpm in c major",
    "melancholic piano ballad, slow tempo, male voice, a minor",
    "energetic rock with distorted guitars, drums and bass, 140 bpm",
    "lo-fi hip hop beat, mellow, vinyl crackle, jazzy chords",
    "chanson française douce avec guitare acoustique",
    "canción alegre de reggaetón con percusión y voz",
    "电子舞曲 节奏 强劲 合成器", "明るいポップス 女性ボーカル", "신나는 케이팝 댄스 음악",
    "instrumental ambient, pads, no vocals, e flat major, 80 bpm",
]


def build_tiny(path: Path) -> None:
    """Write a tiny UMT5 encoder and its tokenizer into `path` (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    path = Path(path)
    # T5 ids: pad 0, eos 1, unk 2 (the special tokens are trained in that order).
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_TINY_TEXT, trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    UMT5EncoderModel(config).save_pretrained(path)
