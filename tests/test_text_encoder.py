"""The prompt encoder: the tiny mT5 twin is built on disk in the real format and loaded by the
same code as a real checkpoint; batches are masked; it is frozen."""
from __future__ import annotations

import pytest
import torch

from model.text_encoder import load_text_encoder


@pytest.fixture(scope="module")
def encoder(tiny_models_dir):
    return load_text_encoder("tiny:mt5", tiny_models_dir, max_length=16)


def test_twin_is_saved_like_a_real_checkpoint(encoder, tiny_models_dir):
    files = {p.name for p in (tiny_models_dir / "mt5").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert encoder.model.config.model_type == "umt5"


def test_padding_does_not_change_a_prompt_and_is_masked(encoder):
    short, long_ = "pop song", "a long melancholic piano ballad with a male voice and strings, 70 bpm"
    alone, mask_alone = encoder([short])
    batch, mask = encoder([short, long_])
    n = int(mask_alone.sum())
    assert mask.shape[1] == 16 and mask[0].sum() == n     # truncated to max_length; short one padded
    torch.testing.assert_close(batch[0, :n], alone[0, :n], rtol=1e-4, atol=1e-5)


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())


def test_other_model_types_are_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    from tasks.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"^text_encoder.checkpoint=.*a 'bert' model; expected .*mT5/UMT5"):
        load_text_encoder(str(tmp_path), tmp_path)
