"""Parity of the transcribe stage with whisper.transcribe on the same weights and audio.

The stage batches windows of many tracks, but with seek=timestamps and mel=track each
track must be transcribed as whisper.transcribe transcribes it alone: the same windows
(seek positions), segments, text and words.

The random tiny twin loops on one token and never closes a segment, so it would only test
the no-timestamp path. The fixture makes a twin variant whose timestamp-token embeddings
are scaled up (x3): its logits then favour timestamps every few tokens, so windows end
with a consecutive timestamp pair before the window's end and seeking to that timestamp
(not to the next 30 s boundary) is exercised. The trick lives in this fixture only.
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from schemas.config import load_config
from tasks import audio
from tasks.models import resolve_checkpoint
from tasks.transcribe import TranscribeStage, load_model

from test_transcribe import corpus_files, track_row

TIME_TOL = 1e-3  # the stage rounds times to 3 decimals (ms) for its Arrow rows


@pytest.fixture(scope="module")
def timestamp_twin(tiny_models_dir, tmp_path_factory):
    """The tiny:whisper twin with its timestamp-token embeddings scaled x3, saved as model.pt."""
    twin = torch.load(f"{resolve_checkpoint('tiny:whisper', tiny_models_dir)}/model.pt", weights_only=True)
    emb = twin["model_state_dict"]["decoder.token_embedding.weight"]
    emb[50365:] *= 3.0  # 50365: <|0.00|>, the multilingual tokenizer's timestamp_begin
    out = tmp_path_factory.mktemp("whisper-timestamp-twin")
    torch.save(twin, out / "model.pt")
    return out


@pytest.fixture(scope="module")
def parity_tracks(synth_corpus, tmp_path_factory) -> list[dict]:
    """Two tracks decoded in one batch: two songs back to back (~54 s: two windows, seeks inside
    them) and the first 12 s of another song (one window, shorter than 30 s)."""
    songs = [audio.load_track(track_row(p), 16000, 1)[0] for p in corpus_files(synth_corpus, "song")[:3]]
    out = tmp_path_factory.mktemp("parity")
    sf.write(out / "two-songs.wav", np.concatenate(songs[:2]), 16000)
    sf.write(out / "clip.wav", songs[2][:12 * 16000], 16000)
    return [track_row(out / "two-songs.wav"), track_row(out / "clip.wav")]


def stage_for(tiny_models_dir, twin, *overrides: str) -> TranscribeStage:
    cfg = load_config("tiny", [
        f"models.tiny_dir={tiny_models_dir}", "device=cpu", f"transcribe.model={twin}",
        "transcribe.sample_len=32", "transcribe.temperatures=[0.0]", "transcribe.max_windows=8",
        "transcribe.seek=timestamps", "transcribe.mel=track",
        # the stage's own verdicts off (min_words, repetition); compression_ratio_threshold is also
        # passed to whisper.transcribe, where at one temperature it changes nothing
        "transcribe.compression_ratio_threshold=1000", "transcribe.max_repetition=1.0", "transcribe.min_words=0",
        *overrides], environ={})
    stage = TranscribeStage(cfg)
    stage.setup()
    return stage


@pytest.mark.parametrize("beam_size,condition,words,language", [
    (5, True, False, "en"),     # beams, prompts, seeking to the last timestamp pair
    (None, False, True, None),  # greedy, words aligned on the whole-track mel, seeking to the last word
], ids=["beam5-prompt-timestamps", "greedy-words-detected-language"])
def test_parity_with_whisper_transcribe(tiny_models_dir, timestamp_twin, parity_tracks,
                                        beam_size, condition, words, language):
    """Text, seek positions and segments (start/end/text, words) equal whisper.transcribe's with the
    same options and thresholds. Times within TIME_TOL (the stage's rounding); scores within 1e-4
    (the stage decodes windows of both tracks in one batch, whisper one at a time: float rounding).
    The language is the stage's (whisper.transcribe detects it on the first 30 s only; the stage on
    the most vocal windows): it is passed to whisper.transcribe."""
    import whisper

    stage = stage_for(tiny_models_dir, timestamp_twin, f"transcribe.beam_size={beam_size or 'null'}",
                      f"transcribe.condition_on_previous_text={str(condition).lower()}",
                      f"transcribe.word_timestamps={str(words).lower()}",
                      f"transcribe.language={language or 'null'}")
    rows = stage.process(parity_tracks)
    model = load_model(str(timestamp_twin))
    seeks_inside = 0
    for row, track in zip(rows, parity_tracks):
        assert row["status"] == "ok"
        wav = audio.load_track(track, 16000, 1)[0]
        cfg = stage.cfg.transcribe
        ref = whisper.transcribe(
            model, wav, temperature=0.0, beam_size=beam_size, condition_on_previous_text=condition,
            word_timestamps=words, language=row["language"], sample_len=cfg.sample_len, fp16=False,
            compression_ratio_threshold=cfg.compression_ratio_threshold,
            logprob_threshold=cfg.logprob_threshold, no_speech_threshold=cfg.no_speech_threshold)
        ref_segments = [s for s in ref["segments"] if s["text"].strip()]
        assert row["text"] == " ".join(s["text"].strip() for s in ref_segments)
        assert " ".join(row["text"].split()) == " ".join(ref["text"].split()) or \
            "".join(row["text"].split()) == "".join(ref["text"].split())
        got = [(s["start"], s["end"], s["text"]) for s in row["segments"]]
        want = [(s["start"], s["end"], s["text"].strip()) for s in ref_segments]
        assert [g[2] for g in got] == [w[2] for w in want]
        assert np.allclose([g[:2] for g in got], [w[:2] for w in want], atol=TIME_TOL, rtol=0)
        assert [s["avg_logprob"] for s in row["segments"]] == pytest.approx(
            [s["avg_logprob"] for s in ref_segments], abs=1e-4)
        # one decode round per window whisper decoded (every decoded window leaves a segment)
        seeks = sorted({s["seek"] for s in ref["segments"]})
        assert row["windows"] == len(seeks)
        seeks_inside += sum(1 for s in seeks if s % 3000)
        if words:
            got_words = [(w["word"], w["start"], w["end"]) for w in row["words"]]
            want_words = [(w["word"], w["start"], w["end"]) for s in ref_segments for w in s["words"]]
            assert [g[0] for g in got_words] == [w[0] for w in want_words]
            assert np.allclose([g[1:] for g in got_words], [w[1:] for w in want_words], atol=TIME_TOL, rtol=0)
    assert seeks_inside >= 1, "the twin must make whisper seek inside a window, not only to 30 s boundaries"
