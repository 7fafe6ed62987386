"""Tiny twin of Qwen2.5-Omni-7B for the caption stage (random weights, real classes, real layout).

Written like the released checkpoint so tasks.caption loads it through the same code:
  config.json               Qwen2_5OmniConfig, enable_audio_output false (no talker weights)
  model.safetensors         thinker.* weights: 2 text layers of width 64, a 1-layer audio tower
  tokenizer.json, ...       a byte-level BPE Qwen2TokenizerFast built here
  preprocessor_config.json  WhisperFeatureExtractor (128 mel bins) with processor_class
  chat_template.jinja       ChatML with <|audio_bos|><|AUDIO|><|audio_eos|> for audio parts
The vocabulary keeps its real size (151,936 rows): the special tokens the thinker's config
names sit at ids 151643-151656, so the BPE vocabulary is filled up to there with letter
n-grams (reachable by merges, so words encode to few tokens and decoded ids read as text).
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from tasks.caption import PROCESSOR_TOKENS  # tokenizer attributes Qwen2_5OmniProcessor reads

VOCAB_SIZE = 151936          # rows of the released embedding (more than the tokenizer has: padding)
FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS = [           # in id order from 151643, as in the released tokenizer
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]
# Qwen2's pre-tokenizer split (words, single digits, punctuation runs, newlines, spaces).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE Qwen2TokenizerFast whose special tokens have the released ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    space, letters = byte_chars[ord(" ")], string.ascii_lowercase
    level = []
    for first in [space + c for c in letters] + [a + b for a in letters for b in letters]:
        vocab[first] = len(vocab)
        merges.append((first[:-1], first[-1]))
        level.append(first)
    while len(vocab) < FIRST_SPECIAL_ID:  # ' a' 'ab' -> ' ab' 'abc' -> ...: n-grams a word can merge into
        longer = []
        for piece in level:
            for c in letters:
                if len(vocab) == FIRST_SPECIAL_ID:
                    break
                vocab[piece + c] = len(vocab)
                merges.append((piece, c))
                longer.append(piece + c)
        level = longer
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert bpe.token_to_id("<|AUDIO|>") == 151646 and bpe.token_to_id("<|vision_bos|>") == 151652
    return Qwen2TokenizerFast(tokenizer_object=bpe, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", model_max_length=32768,
                              extra_special_tokens=PROCESSOR_TOKENS, chat_template=CHAT_TEMPLATE)


def tiny_config():
    """Qwen2_5OmniConfig with a small thinker; talker/token2wav stay default configs, never built."""
    from transformers import Qwen2_5OmniConfig

    width = 64
    thinker = {
        "text_config": {"vocab_size": VOCAB_SIZE, "hidden_size": width, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "max_position_embeddings": 32768,
                        # mrope sections split head_dim/2 = 16 over (time, height, width)
                        "rope_scaling": {"mrope_section": [4, 6, 6], "rope_type": "default", "type": "default"}},
        "audio_config": {"num_mel_bins": 128, "encoder_layers": 1, "encoder_attention_heads": 2,
                         "encoder_ffn_dim": 64, "d_model": 32, "output_dim": width, "n_window": 100,
                         "max_source_positions": 1500},
        "vision_config": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                          "out_hidden_size": width, "fullatt_block_indexes": [0]},
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    }
    return Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)


def write_twin(path: Path) -> None:
    from transformers import Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

    path = Path(path)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2_5OmniForConditionalGeneration(tiny_config())  # thinker only: audio output off
    model.save_pretrained(path)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(path)
    # The released preprocessor_config.json holds the feature extractor (and the image
    # processor, which audio captioning does not use) under processor_class.
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                       chunk_length=300, n_fft=400, return_attention_mask=True)
    config = {**features.to_dict(), "processor_class": "Qwen2_5OmniProcessor"}
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2, default=list))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
