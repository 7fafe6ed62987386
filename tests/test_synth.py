"""The synthetic corpus: reproducible, complete, and musically what its ground truth says."""
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from scipy import signal

from tasks.synth import (TIMBRES, SongSpec, espeak_vocals, generate_corpus, pitch_class, render_song,
                         render_stems, song_truth)

SR = 22050
SHORT = [("intro", 1), ("verse", 2), ("chorus", 2), ("verse", 2), ("chorus", 2)]


def truth_of(corpus) -> dict:
    return json.loads((corpus / "ground_truth.json").read_text())


def path_of(corpus, row) -> bytes:
    rel = bytes.fromhex(row["file_hex"]) if "file_hex" in row else row["file"].encode()
    return os.fsencode(corpus) + b"/" + rel


def digest_tree(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(os.fsencode(root)):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, os.fsencode(root))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def onset_envelope(x: np.ndarray, hop: int) -> np.ndarray:
    """Half-wave rectified rise of frame RMS: large where a drum hits."""
    rms = np.sqrt(np.square(x[: len(x) // hop * hop].astype(np.float64)).reshape(-1, hop).mean(axis=1))
    return np.maximum(0.0, np.diff(rms, prepend=rms[0]))


# ---- the corpus on disk -------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_other_songs(synth_corpus, tmp_path):
    generate_corpus(tmp_path / "again", n=8, seed=0)
    assert digest_tree(synth_corpus) == digest_tree(tmp_path / "again")
    generate_corpus(tmp_path / "other", n=1, seed=1)
    name = "audio/song-000.flac"
    assert (tmp_path / "other" / name).read_bytes() != (synth_corpus / name).read_bytes()


def test_ground_truth_lists_exactly_the_files_on_disk(synth_corpus):
    truth = truth_of(synth_corpus)
    listed = {path_of(synth_corpus, s) for s in truth["songs"]}
    on_disk = {os.path.join(d, f) for d, _, fs in os.walk(os.fsencode(synth_corpus / "audio")) for f in fs}
    assert listed == on_disk
    fields = {"file", "kind", "expect", "bpm", "key", "scale", "beats", "downbeats", "sections", "vocals",
              "language", "lyric_id", "duration", "sample_rate", "channels", "timbre"}
    assert all(fields <= set(s) for s in truth["songs"])
    assert truth["lyrics_db"] == "lyrics.parquet" and truth["seed"] == 0 and truth["n"] == 8


def test_every_bad_kind_is_present_and_really_bad(synth_corpus):
    truth = truth_of(synth_corpus)
    bad = {os.path.basename(s["file"]): s["expect"] for s in truth["songs"] if s["kind"] == "bad"}
    assert sorted(bad.values()) == sorted(["truncated", "empty", "unreadable", "silent", "too_short",
                                           "unsupported_channels", "non_finite"])
    files = {name: synth_corpus / "audio" / "bad" / name for name in bad}
    by_kind = {kind: files[name] for name, kind in bad.items()}
    assert by_kind["empty"].stat().st_size == 0
    with pytest.raises(sf.LibsndfileError):
        sf.info(by_kind["unreadable"])
    cut = by_kind["truncated"].read_bytes()   # the data chunk's header promises twice what is there
    at = cut.index(b"data")
    assert int.from_bytes(cut[at + 4: at + 8], "little") > 1.9 * (len(cut) - at - 8)
    silent, rate = sf.read(by_kind["silent"])
    assert len(silent) == 15 * rate and not silent.any()
    assert sf.info(by_kind["too_short"]).duration == pytest.approx(0.2, abs=0.01)
    assert sf.info(by_kind["unsupported_channels"]).channels == 8
    assert np.isnan(sf.read(by_kind["non_finite"])[0]).any()


def test_odd_but_valid_inputs_are_songs_that_should_pass(synth_corpus):
    songs = [s for s in truth_of(synth_corpus)["songs"] if s["kind"] == "song"]
    assert all(s["expect"] == "ok" for s in songs)
    rates = {s["sample_rate"]: s for s in songs}
    assert {8000, 96000, 44100} <= set(rates)
    for rate in (8000, 96000):
        assert sf.info(path_of(synth_corpus, rates[rate])).samplerate == rate
    odd = [s for s in songs if "file_hex" in s]
    assert len(odd) == 1 and "\\x" in odd[0]["file"]
    raw = path_of(synth_corpus, odd[0])
    assert os.path.exists(raw)
    with pytest.raises(UnicodeDecodeError):
        os.path.basename(raw).decode("utf-8")
    dup = next(s for s in truth_of(synth_corpus)["songs"] if s["kind"] == "duplicate")
    original = next(s for s in songs if s["file"] == dup["file"].replace("-duplicate", ""))
    assert open(path_of(synth_corpus, dup), "rb").read() == open(path_of(synth_corpus, original), "rb").read()


def test_compressed_formats_decode(synth_corpus):
    songs = {os.path.splitext(s["file"])[1]: s for s in truth_of(synth_corpus)["songs"] if s["kind"] == "song"}
    ogg = sf.info(path_of(synth_corpus, songs[".ogg"]))
    assert ogg.subtype == "VORBIS" and ogg.duration == pytest.approx(songs[".ogg"]["duration"], abs=0.05)
    if shutil.which("ffprobe"):
        probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0",
                                path_of(synth_corpus, songs[".m4a"])], capture_output=True, text=True, check=True)
        assert probe.stdout.strip() == "aac"


def test_songs_are_10_to_40_s_and_their_truth_is_consistent(synth_corpus):
    songs = [s for s in truth_of(synth_corpus)["songs"] if s["kind"] == "song"]
    for s in songs:
        assert 10 <= s["duration"] <= 40, s["file"]
        if s["file"].endswith((".wav", ".flac")):
            assert sf.info(path_of(synth_corpus, s)).duration == pytest.approx(s["duration"], abs=0.01)
        beats = np.array(s["beats"])
        assert np.allclose(np.diff(beats), 60 / s["bpm"], atol=2e-4)
        assert s["downbeats"] == s["beats"][:: s["beats_per_bar"]]
        assert s["sections"][0]["start"] == 0 and all(
            a["end"] == b["start"] for a, b in zip(s["sections"], s["sections"][1:]))
        assert {"verse", "chorus"} <= {x["label"] for x in s["sections"]}
        assert s["vocals"] == (s["lyric_id"] is not None) == (s["language"] is not None)
    assert any(s["vocals"] for s in songs) and any(not s["vocals"] for s in songs)


def test_lyrics_database(synth_corpus):
    table = pq.read_table(synth_corpus / "lyrics.parquet")
    assert table.schema == pa.schema([(c, pa.string()) for c in ("lyric_id", "title", "artist", "language", "lyrics")])
    rows = table.to_pylist()
    assert {"en", "es", "fr", "de", "zh"} <= {r["language"] for r in rows}
    assert any(r["language"] in ("zh", "ja", "ko") and any("\u3040" <= c <= "\u9fff" for c in r["lyrics"])
               for r in rows)
    assert sum(r["lyric_id"].startswith("dis-") for r in rows) >= 10
    assert all(r["lyrics"].startswith("[verse]\n") and "\n[chorus]\n" in r["lyrics"] for r in rows)
    assert len({r["lyric_id"] for r in rows}) == len(rows)
    by_id = {r["lyric_id"]: r for r in rows}
    sung = [s for s in truth_of(synth_corpus)["songs"] if s["kind"] == "song" and s["vocals"]]
    assert {s["language"] for s in sung} == {"en", "zh", "es", "fr", "de"}
    assert all(by_id[s["lyric_id"]]["language"] == s["language"] for s in sung)


# ---- rendering ----------------------------------------------------------------------------

@pytest.mark.parametrize("bpm, swing, beats_per_bar", [(60, 0.0, 4), (123, 0.0, 4), (190, 1 / 3, 4), (100, 0.0, 3)])
def test_drums_sit_on_the_beat_grid(bpm, swing, beats_per_bar):
    spec = SongSpec(bpm=bpm, key="E", scale="minor", structure=SHORT, timbre="saw", swing=swing,
                    seed=3, beats_per_bar=beats_per_bar)
    x = render_song(spec, SR).mean(axis=1)
    hop = 64
    onset = onset_envelope(x, hop)
    # the onset envelope's autocorrelation peaks at the beat period
    centred = onset - onset.mean()
    ac = np.fft.irfft(np.abs(np.fft.rfft(centred, 2 * len(centred))) ** 2)[: len(centred)]
    period = 60.0 / bpm * SR / hop
    lo, hi = int(period * 0.6), int(period * 1.6)
    k = lo + int(np.argmax(ac[lo:hi]))
    k += 0.5 * (ac[k - 1] - ac[k + 1]) / (ac[k - 1] - 2 * ac[k] + ac[k + 1])   # parabolic peak
    assert abs(k - period) / period < 0.02
    # and its peaks fall on the truth's beat times, not between them
    truth = song_truth(spec, SR)

    def peak_after(t: float) -> float:
        return float(onset[int(t * SR / hop): int(t * SR / hop) + 3].max())
    quarter = 60.0 / bpm / 4
    assert np.median([peak_after(b) for b in truth["beats"][1:]]) > 3 * np.median(
        [peak_after(b + quarter) for b in truth["beats"][1:]])
    # the kick (below 150 Hz) marks beat 1: downbeats carry more low end than the other beats
    low = signal.sosfilt(signal.butter(4, 150, "low", fs=SR, output="sos"), x)
    def low_energy(t):  # noqa: E306
        return float(np.square(low[int(t * SR): int((t + 0.05) * SR)]).sum())
    down = np.mean([low_energy(t) for t in truth["downbeats"]])
    others = np.mean([low_energy(t) for i, t in enumerate(truth["beats"]) if i % beats_per_bar in (1, 3)])
    assert down > 2 * others
    assert truth["sections"][1] == {"label": "verse", "start": round(60 / bpm * beats_per_bar, 4),
                                    "end": round(60 / bpm * beats_per_bar * 3, 4)}


@pytest.mark.parametrize("key, scale, timbre", [("A", "minor", "saw"), ("Eb", "major", "pluck"),
                                                ("F#", "minor", "organ"), ("C", "major", "sine")])
def test_essentia_hears_the_key_of_the_spec(key, scale, timbre):
    es = pytest.importorskip("essentia.standard")
    spec = SongSpec(bpm=110, key=key, scale=scale, structure=SHORT, timbre=timbre, seed=1)
    x = render_song(spec, 44100).mean(axis=1)
    found, mode, _ = es.KeyExtractor(profileType="edma", sampleRate=44100)(x)
    assert (found, mode) == (key, scale)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_vocals_are_louder_than_the_music_under_them():
    vocals = espeak_vocals("the quick brown fox jumps over the lazy dog", "en", SR)
    spec = SongSpec(bpm=120, key="G", scale="major", structure=SHORT, timbre="organ", vocals=vocals)
    stems = render_stems(spec, SR)
    truth = song_truth(spec, SR)
    start, end = truth["vocal_span"]
    assert start == pytest.approx(truth["sections"][1]["start"], abs=0.1) and end > start + 1
    span = slice(int(start * SR), int(end * SR))
    music = sum(x for name, x in stems.items() if name != "vocals")
    rms = lambda x: np.sqrt(np.mean(np.square(x)))  # noqa: E731
    assert rms(stems["vocals"][span]) > 1.5 * rms(music[span])
    assert not stems["vocals"][: int(start * SR) - SR // 10].any()
    without = SongSpec(bpm=120, key="G", scale="major", structure=SHORT, timbre="organ")
    assert song_truth(without)["vocal_span"] is None and "vocals" not in render_stems(without, SR)


def test_every_timbre_renders_and_sounds_different():
    centroids = {}
    for timbre in TIMBRES:
        spec = SongSpec(bpm=96, key="D", scale="major", structure=[("verse", 2), ("chorus", 2)], timbre=timbre)
        x = render_song(spec, SR)
        assert x.dtype == np.float32 and x.shape == (int(song_truth(spec)["duration"] * SR), 2)
        assert np.isfinite(x).all() and np.abs(x).max() == pytest.approx(0.8, abs=1e-3)
        harmony = render_stems(spec, SR)["harmony"]
        spectrum = np.abs(np.fft.rfft(harmony))
        freqs = np.fft.rfftfreq(len(harmony), 1 / SR)
        centroids[timbre] = float((spectrum * freqs).sum() / spectrum.sum())
    assert centroids["sine"] < min(centroids["organ"], centroids["pluck"]) < centroids["saw"]
    assert len({round(c, -1) for c in centroids.values()}) == len(TIMBRES)


def test_key_spellings_and_spec_errors():
    assert pitch_class("Bb") == pitch_class("A#") == 10
    a = render_song(SongSpec(bpm=100, key="Bb", scale="major", structure=[("verse", 2)]), SR)
    b = render_song(SongSpec(bpm=100, key="A#", scale="major", structure=[("verse", 2)]), SR)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="timbre"):
        SongSpec(bpm=100, key="C", scale="major", timbre="theremin")
    with pytest.raises(ValueError, match="key"):
        SongSpec(bpm=100, key="H", scale="major")
    with pytest.raises(ValueError, match="scale"):
        SongSpec(bpm=100, key="C", scale="dorian")
