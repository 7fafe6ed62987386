"""Transcribe stage: the tiny Whisper twin loads from disk through whisper.load_model and
runs on synthetic songs; segments and words are in track time; loops and silence are
caught by the instrumental rule; bad input becomes rejects, never a failed partition."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from schemas.transcribe import TRANSCRIBE_SCHEMA
from tasks import audio
from tasks.models import resolve_checkpoint
from tasks.transcribe import TranscribeStage, load_model, repetition, split_segments

# The twin decodes garbage: keep each window short, and one fallback temperature so the
# fallback path runs too.
TINY = ["device=cpu", "transcribe.model=tiny:whisper", "transcribe.sample_len=16",
        "transcribe.temperatures=[0.0,0.6]"]
# A rule that keeps whatever the twin says, to check where the text lands.
KEEP_ALL = ["transcribe.compression_ratio_threshold=1000", "transcribe.max_repetition=1.0",
            "transcribe.no_speech_threshold=1.0", "transcribe.min_words=0"]


def track_row(path) -> dict:
    """A catalog-like row for a file (what ingest would give the stage)."""
    raw = os.fsencode(path)
    info = audio.probe(raw)
    return {"track_id": hashlib.sha1(raw).hexdigest()[:16], "uri": audio.display_path(raw),
            "uri_raw": raw, "duration": info.duration, "sample_rate": info.sample_rate,
            "channels": info.channels, "codec": info.codec}


def corpus_files(corpus, kind: str) -> list[bytes]:
    truth = json.loads((corpus / "ground_truth.json").read_text())
    return [os.fsencode(corpus) + b"/" + (bytes.fromhex(s["file_hex"]) if "file_hex" in s
                                          else s["file"].encode())
            for s in truth["songs"] if s["kind"] == kind]


@pytest.fixture(scope="module")
def make_stage(tiny_models_dir):
    def make(*overrides: str) -> TranscribeStage:
        cfg = load_config("tiny", [f"models.tiny_dir={tiny_models_dir}", *TINY, *overrides], environ={})
        stage = TranscribeStage(cfg)
        stage.setup()
        return stage
    return make


@pytest.fixture(scope="module")
def songs(synth_corpus) -> list[dict]:
    return [track_row(p) for p in corpus_files(synth_corpus, "song")]


@pytest.fixture(scope="module")
def tokenizer():
    from whisper.tokenizer import get_tokenizer

    return get_tokenizer(True, num_languages=99, language="en", task="transcribe")


def test_twin_loads_through_whisper_load_model_and_matches_the_tokenizer(tiny_models_dir, tokenizer):
    twin = resolve_checkpoint("tiny:whisper", tiny_models_dir)
    ckpt = torch.load(os.path.join(twin, "model.pt"), weights_only=True)
    assert set(ckpt) == {"dims", "model_state_dict"}
    model = load_model(twin)
    assert model.is_multilingual and model.num_languages == 99
    assert model.dims.n_vocab == tokenizer.encoding.n_vocab  # every token id, timestamps included
    assert torch.isfinite(model.decoder.positional_embedding).all()
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([list(tokenizer.sot_sequence)])
    again = load_model(twin)
    with torch.no_grad():
        assert torch.allclose(model(mel, tokens), again(mel, tokens))  # weights come from disk


def test_every_song_gets_a_row_that_fits_the_schema(make_stage, songs):
    from whisper.tokenizer import LANGUAGES

    rows = make_stage().process(songs)
    assert [r["status"] for r in rows] == [STATUS_OK] * len(songs)
    table = pa.Table.from_pylist(rows, schema=TRANSCRIBE_SCHEMA)
    for row in table.to_pylist():
        assert row["language"] in LANGUAGES
        assert 0.0 <= row["language_prob"] <= 1.0 and 0.0 <= row["no_speech_prob"] <= 1.0
        assert row["windows"] >= 1
        # the random twin loops ("purl purl purl ..."): the sanity rule must call that no vocals
        assert row["instrumental"] and row["instrumental_reason"].startswith("too_few_words: ")
        assert "compression" in row["instrumental_reason"] or "repetition" in row["instrumental_reason"]


def test_kept_text_has_segments_and_words_in_track_time(make_stage, songs):
    rows = make_stage(*KEEP_ALL, "transcribe.temperatures=[0.0]").process(songs[:2])
    for row, song in zip(rows, songs[:2]):
        assert row["status"] == STATUS_OK and not row["instrumental"]
        assert row["text"] and row["text"] == " ".join(s["text"] for s in row["segments"])
        starts = [s["start"] for s in row["segments"]]
        assert starts == sorted(starts)
        for s in row["segments"]:
            assert 0.0 <= s["start"] <= s["end"] <= song["duration"] + 0.01
            assert np.isfinite([s["avg_logprob"], s["no_speech_prob"], s["compression_ratio"]]).all()
        assert row["words"], "word timestamps are on by default"
        for w in row["words"]:
            assert 0.0 <= w["start"] <= w["end"] <= song["duration"] + 0.01
            assert 0.0 <= w["probability"] <= 1.0


def test_long_tracks_decode_only_their_most_vocal_windows(make_stage, songs, tmp_path):
    song = audio.load_track(songs[0], 16000, 1)[0]
    long = np.tile(song, 4)  # ~2 minutes: five 30 s windows
    sf.write(tmp_path / "long.wav", long, 16000)
    track = track_row(tmp_path / "long.wav")
    stage = make_stage(*KEEP_ALL, "transcribe.max_windows=2", "transcribe.temperatures=[0.0]")
    row = stage.process([track])[0]
    assert row["windows"] == 2
    windows = {int(s["start"] // 30) for s in row["segments"]}
    assert 1 <= len(windows) <= 2 and max(s["end"] for s in row["segments"]) <= track["duration"] + 0.01


def test_results_do_not_depend_on_the_batch_size(make_stage, songs):
    a = make_stage(*KEEP_ALL).process(songs[:3])
    b = make_stage(*KEEP_ALL, "transcribe.batch_size=1").process(songs[:3])
    assert [r["language"] for r in a] == [r["language"] for r in b]
    assert [r["text"] for r in a] == [r["text"] for r in b]


def test_bad_input_is_rejected_with_the_loaders_reason(make_stage, synth_corpus, songs):
    bad = []
    for path in corpus_files(synth_corpus, "bad"):
        try:
            bad.append(track_row(path))  # ingest rejects what cannot even be probed
        except audio.AudioError:
            continue
    rows = make_stage().process(bad + songs[:1])
    codes = {r["reason"].split(":")[0] for r in rows[:-1]}
    assert all(r["status"] == STATUS_REJECTED for r in rows[:-1])
    assert {"silent", "too_short", "non_finite"} <= codes
    assert rows[-1]["status"] == STATUS_OK  # the good track in the same batch is unharmed
    long = make_stage("audio.max_duration_s=20").process(songs[:1])[0]
    assert long["status"] == STATUS_REJECTED and long["reason"].startswith("too_long: ")


def _ts(tokenizer, seconds: float) -> int:
    return tokenizer.timestamp_begin + int(round(seconds / 0.02))


def test_segments_are_parsed_from_timestamp_pairs(tokenizer):
    hello, again = tokenizer.encode(" hello world"), tokenizer.encode(" again")
    tokens = [_ts(tokenizer, 0.0), *hello, _ts(tokenizer, 2.4), _ts(tokenizer, 2.4), *again,
              _ts(tokenizer, 5.0)]
    segs = split_segments(tokens, tokenizer, duration=30.0)
    assert [(s["start"], s["end"], s["text"]) for s in segs] == [
        (0.0, pytest.approx(2.4), "hello world"), (pytest.approx(2.4), 5.0, "again")]


def test_confused_timestamps_are_clamped_not_fatal(tokenizer):
    hello = tokenizer.encode(" hello")
    # no timestamps at all: one segment over the window
    assert [(s["start"], s["end"]) for s in split_segments(hello, tokenizer, 12.0)] == [(0.0, 12.0)]
    # a timestamp past the end of a short window, and text with no closing timestamp
    segs = split_segments([_ts(tokenizer, 20.0), *hello, _ts(tokenizer, 25.0), *hello], tokenizer, 8.0)
    assert all(0.0 <= s["start"] <= s["end"] <= 8.0 for s in segs) and len(segs) == 2


def test_repetition_measures_a_single_word_loop():
    assert repetition("la la la la la la la") == 1.0
    assert repetition("the quick brown fox jumps over the lazy dog") < 0.5
    assert repetition("too short") == 0.0


def test_an_unknown_model_says_what_is_accepted():
    with pytest.raises(RuntimeError, match="transcribe.model='/no/such.pt' is neither"):
        load_model("/no/such.pt")


def test_the_scan_gives_whispers_own_language_and_no_speech_probabilities(make_stage, songs):
    import whisper

    from tasks.transcribe import Window

    stage = make_stage()
    samples = audio.load_track(songs[0], 16000, 1)[0][:16000 * 30]
    window = Window(0, 0.0, samples)
    stage._scan([window])
    mel = stage._mel(samples)
    _, probs = whisper.detect_language(stage.model, mel)
    expected = np.array([probs[c] for c in stage.language_codes])
    assert np.allclose(window.language_probs, expected, atol=1e-5)
    result = whisper.decode(stage.model, mel, whisper.DecodingOptions(language="en", sample_len=2, fp16=False))
    assert window.no_speech == pytest.approx(result.no_speech_prob, rel=1e-3, abs=0)
