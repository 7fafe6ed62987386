"""Transcribe stage: the tiny Whisper twin loads from disk through whisper.load_model and
runs on synthetic songs; segments and words are in track time; loops and silence are
caught by the instrumental rule; bad input becomes rejects, never a failed partition; a
released model given as a file gets its tuned alignment heads. Parity of the seeking
decoder with whisper.transcribe is in test_transcribe_parity.py."""
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


@pytest.fixture(scope="module")
def long_track(songs, tmp_path_factory) -> dict:
    song = audio.load_track(songs[0], 16000, 1)[0]
    path = tmp_path_factory.mktemp("long") / "long.wav"
    sf.write(path, np.tile(song, 4), 16000)  # ~100 s: four 30 s windows
    return track_row(path)


def test_long_tracks_decode_only_their_most_vocal_windows(make_stage, long_track):
    # seek=fixed decodes exactly the max_windows picked windows
    stage = make_stage(*KEEP_ALL, "transcribe.max_windows=2", "transcribe.temperatures=[0.0]",
                       "transcribe.seek=fixed")
    row = stage.process([long_track])[0]
    assert row["windows"] == 2
    windows = {int(s["start"] // 30) for s in row["segments"]}
    assert 1 <= len(windows) <= 2 and max(s["end"] for s in row["segments"]) <= long_track["duration"] + 0.01


def test_seeking_stays_inside_the_most_vocal_windows(make_stage, long_track):
    # seek=timestamps seeks through the picked windows, with at most 2 x max_windows rounds
    stage = make_stage(*KEEP_ALL, "transcribe.max_windows=2", "transcribe.temperatures=[0.0]",
                       "transcribe.word_timestamps=false")
    track = stage._track(0, audio.load_track(long_track, 16000, 1)[0])
    stage._scan([track])
    stage._plan(track)
    row = stage.process([long_track])[0]
    assert 1 <= row["windows"] <= 4
    frames = sum(end - start for start, end in track.clips)
    assert frames <= 2 * 3000 + 10
    for s in row["segments"]:
        assert any(start / 100 <= s["start"] <= end / 100 + 0.01 for start, end in track.clips)
        assert s["end"] <= long_track["duration"] + 0.01


def test_results_do_not_depend_on_the_batch_size(make_stage, songs):
    # beams and previous-text prompts of different tracks share a batch (see batched_decode)
    opts = [*KEEP_ALL, "transcribe.max_windows=1", "transcribe.beam_size=2",
            "transcribe.condition_on_previous_text=true"]
    a = make_stage(*opts).process(songs[:3])
    b = make_stage(*opts, "transcribe.batch_size=1").process(songs[:3])
    assert [r["language"] for r in a] == [r["language"] for r in b]
    assert [r["text"] for r in a] == [r["text"] for r in b]
    for ra, rb in zip(a, b):  # the same windows and times; scores up to float rounding of the batch
        assert [(s["start"], s["end"]) for s in ra["segments"]] == [(s["start"], s["end"]) for s in rb["segments"]]
        assert [s["avg_logprob"] for s in ra["segments"]] == pytest.approx(
            [s["avg_logprob"] for s in rb["segments"]], abs=1e-5)


def test_a_batch_with_one_prompt_per_window_decodes_as_whisper_does_each(make_stage, tokenizer):
    import whisper

    from tasks.transcribe import batched_decode

    model = make_stage().model
    torch.manual_seed(1)
    mels = torch.randn(3, 80, 3000)
    # equal-length prompts with different tokens, timestamps included (as the stage builds them)
    prompts = [tokenizer.encode(" la la"), tokenizer.encode(" oh yeah"), [_ts(tokenizer, 1.0), 400]]
    assert len({len(p) for p in prompts}) == 1 and len({tuple(p) for p in prompts}) == 3
    options = whisper.DecodingOptions(language="en", beam_size=3, sample_len=8, fp16=False)
    batched = batched_decode(model, model.embed_audio(mels), options, prompts)
    for mel, prompt, got in zip(mels, prompts, batched):
        want = whisper.decode(model, mel, whisper.DecodingOptions(language="en", beam_size=3, sample_len=8,
                                                                  fp16=False, prompt=prompt))
        assert got.tokens == want.tokens
        assert got.avg_logprob == pytest.approx(want.avg_logprob, abs=1e-4)
        assert got.no_speech_prob == pytest.approx(want.no_speech_prob, abs=1e-5)


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


def test_an_unknown_model_says_what_is_accepted(tmp_path):
    from tasks.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="transcribe.model='/no/such.pt' is neither"):
        load_model("/no/such.pt")
    cut = tmp_path / "large-v3.pt"
    cut.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(cut))
    assert str(caught.value).startswith(f"transcribe.model={str(cut)!r} could not be loaded (")
    assert "\n" not in str(caught.value)


def test_the_scan_gives_whispers_own_language_and_no_speech_probabilities(make_stage, songs):
    import whisper

    stage = make_stage()
    samples = audio.load_track(songs[0], 16000, 1)[0]
    track = stage._track(0, samples)
    stage._scan([track])
    # the window's input is whisper.transcribe's: a slice of the whole track's log-mel
    mel = whisper.log_mel_spectrogram(torch.from_numpy(samples), 80, padding=480000)
    mel = whisper.pad_or_trim(mel[:, :min(3000, mel.shape[-1] - 3000)], 3000)
    assert torch.allclose(stage._mel(track, 0, min(3000, track.frames)), mel)
    _, probs = whisper.detect_language(stage.model, mel)
    expected = np.array([probs[c] for c in stage.language_codes])
    assert np.allclose(track.language_probs[0], expected, atol=1e-5)
    result = whisper.decode(stage.model, mel, whisper.DecodingOptions(language="en", sample_len=2, fp16=False))
    assert track.no_speech[0] == pytest.approx(result.no_speech_prob, rel=1e-3, abs=0)


# Alignment heads: whisper.load_model(path) leaves the fallback heads; our load_model must set
# a released model's tuned heads however its file is found.
TINY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                 n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)


@pytest.fixture(scope="module")
def tiny_dims_file(tmp_path_factory):
    """A checkpoint with the dims of whisper's released "tiny" (random fp16 weights, ~75 MB)."""
    from whisper.model import Whisper, ModelDimensions

    model = Whisper(ModelDimensions(**TINY_DIMS))
    path = tmp_path_factory.mktemp("whisper-tiny-dims") / "model.pt"
    torch.save({"dims": TINY_DIMS, "model_state_dict": {k: v.half() for k, v in model.state_dict().items()}},
               path)
    return path


def heads(name: str | None) -> torch.Tensor:
    """The heads whisper.load_model(name) sets (the fallback for None), as a dense (layers, heads) mask."""
    import whisper
    from whisper.model import Whisper, ModelDimensions

    reference = Whisper(ModelDimensions(**TINY_DIMS))
    if name is not None:
        reference.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
    return reference.alignment_heads.to_dense()


def test_a_released_model_file_is_known_by_its_sha256(tiny_dims_file, monkeypatch):
    import whisper

    import tasks.transcribe as transcribe

    sha = hashlib.sha256(tiny_dims_file.read_bytes()).hexdigest()
    monkeypatch.setitem(whisper._MODELS, "tiny", f"https://example.invalid/models/{sha}/tiny.pt")
    monkeypatch.setattr(transcribe, "RELEASED_DIMS", {})  # neither name nor dims can tell
    model = load_model(str(tiny_dims_file))
    assert torch.equal(model.alignment_heads.to_dense(), heads("tiny"))
    assert not torch.equal(heads("tiny"), heads(None))


def test_a_released_model_file_is_known_by_its_name(tiny_dims_file, tmp_path, monkeypatch):
    import tasks.transcribe as transcribe

    named = tmp_path / "tiny.pt"
    named.symlink_to(tiny_dims_file)
    dims = transcribe.RELEASED_DIMS["tiny"]
    monkeypatch.setattr(transcribe, "RELEASED_DIMS", {"tiny": dims, "tiny-finetune": dims})  # dims are ambiguous
    assert torch.equal(load_model(str(named)).alignment_heads.to_dense(), heads("tiny"))


def test_a_released_model_file_is_known_by_its_dims(tiny_dims_file, caplog):
    with caplog.at_level("WARNING", logger="tasks.transcribe"):
        model = load_model(str(tiny_dims_file))
    assert torch.equal(model.alignment_heads.to_dense(), heads("tiny"))
    assert not caplog.records


def test_an_unknown_model_file_keeps_the_fallback_heads_and_says_so(tiny_models_dir, caplog, tmp_path):
    from types import SimpleNamespace

    from tasks.transcribe import RELEASED_DIMS, released_name

    twin = resolve_checkpoint("tiny:whisper", tiny_models_dir)
    with caplog.at_level("WARNING", logger="tasks.transcribe"):
        model = load_model(twin)
    fallback = torch.zeros(2, 2, dtype=torch.bool)
    fallback[1:] = True  # whisper's default: every head of the decoder's second half
    assert torch.equal(model.alignment_heads.to_dense(), fallback)
    assert "fallback alignment heads" in caplog.text and "word timestamps" in caplog.text
    # large-v1 and large-v2 share their dims: a renamed file of either cannot be told apart
    n_mels, n_vocab, state, audio_layers, text_layers = RELEASED_DIMS["large-v2"]
    dims = SimpleNamespace(n_mels=n_mels, n_vocab=n_vocab, n_audio_state=state, n_audio_layer=audio_layers,
                           n_text_layer=text_layers)
    (tmp_path / "finetuned.pt").write_bytes(b"not whisper")
    assert released_name(tmp_path / "finetuned.pt", dims) is None
    assert released_name(tmp_path / "finetuned.pt", SimpleNamespace(**{**vars(dims), "n_mels": 128, "n_vocab": 51866})) == "large-v3"


def test_the_checkpoint_hash_follows_the_file(tmp_path):
    import time

    from tasks.transcribe import file_sha256

    path = tmp_path / "model.pt"
    path.write_bytes(b"first")
    assert file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    time.sleep(0.01)
    path.write_bytes(b"second file")  # replaced in place: the remembered hash must not be served
    assert file_sha256(path) == hashlib.sha256(b"second file").hexdigest()
