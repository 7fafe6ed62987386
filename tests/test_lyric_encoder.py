"""The lyric tokenizer (tiny twin trained by the project, loaded from its file) and the Conformer
lyric encoder, whose outputs ignore padding; the condition sequence and its CFG dropping."""
from __future__ import annotations

import pytest
import torch

from model.conditions import ConditionEncoder
from model.lyric_encoder import LyricEncoder, load_lyric_tokenizer
from schemas.train import ConditionConfig, LyricEncoderConfig


@pytest.fixture(scope="module")
def tokenizer(tiny_models_dir):
    return load_lyric_tokenizer("tiny:lyric_tokenizer", tiny_models_dir, max_tokens=64)


def test_tags_and_language_are_single_tokens(tokenizer):
    ids = tokenizer.encode("[verse]\nwalking down the street\n[chorus]\nsing it loud", "en")
    vocab = tokenizer.tokenizer.get_vocab()
    assert ids[0] == vocab["[en]"]
    assert vocab["[verse]"] in ids and vocab["[chorus]"] in ids
    assert tokenizer.tokenizer.token_to_id("[UNK]") not in tokenizer.encode("夜空の星 écoute ✨", "ja")


def test_instrumental_is_one_token_and_long_lyrics_are_cut(tokenizer):
    assert len(tokenizer.encode("", None)) == 1
    assert len(tokenizer.encode("la " * 500, "fr")) == 64


def test_missing_tokenizer_file_names_the_setting(tmp_path):
    from tasks.models import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"^lyric_encoder.tokenizer=.*nope.json' could not be loaded"):
        load_lyric_tokenizer(str(tmp_path / "nope.json"), tmp_path)


def test_conformer_outputs_ignore_padding(tokenizer):
    torch.manual_seed(0)
    enc = LyricEncoder(tokenizer.vocab_size, 32, 2, 2, 7, out_dim=24).eval()
    ids, mask = tokenizer.batch(["[verse]\nla la la", "[chorus]\nsing it loud and clear tonight"], ["en", "en"])
    alone_ids, alone_mask = tokenizer.batch(["[verse]\nla la la"], ["en"])
    with torch.no_grad():
        both, alone = enc(ids, mask), enc(alone_ids, alone_mask)
    n = int(alone_mask.sum())
    torch.testing.assert_close(both[0, :n], alone[0], rtol=1e-4, atol=1e-5)
    assert torch.all(both[0, n:] == 0)


def test_dropped_conditions_become_one_null_token_each(tokenizer):
    torch.manual_seed(0)
    cond = ConditionEncoder(16, 8, tokenizer.vocab_size, LyricEncoderConfig(width=16, layers=1, heads=2, conv_kernel=3),
                            ConditionConfig(speaker_dim=4))
    ids, lmask = tokenizer.batch(["[verse]\nla la", "[verse]\nla la"], ["en", "en"])
    text, tmask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    speaker = torch.randn(2, 4)
    keep = torch.tensor([True, False])
    seq, mask = cond(text, tmask, ids, lmask, speaker, keep, keep, keep)
    assert seq.shape == (2, 1 + 5 + ids.shape[1], 16)
    assert mask[0].sum() == 1 + 5 + lmask[0].sum() and mask[1].sum() == 3   # speaker + one null each
    # The null condition does not depend on what was dropped.
    other, _ = cond(torch.randn(2, 5, 8), tmask, ids, lmask, torch.randn(2, 4), keep, keep, keep)
    torch.testing.assert_close(seq[1][mask[1]], other[1][mask[1]])
