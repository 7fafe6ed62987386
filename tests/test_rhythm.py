"""Rhythm stage: tempo and key on generated songs with known answers (Essentia path), the Beat
This twin through the real loader, its logits and beat times against the package's own
beat_this.inference, bad input as explicit "no tempo"/"no key" with reasons, the caption phrases
and `acepipe analyze` (also offline, without the released checkpoint)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from schemas.rhythm import RHYTHM_SCHEMA
from tasks import rhythm
from tasks.beat_model import TINY_NAME, BeatThisTracker, load_checkpoint
from tasks.models import ModelLoadError, resolve_checkpoint
from tasks.rhythm import RhythmStage, caption_phrases, cli_analyze, file_track
from tasks.synth import SongSpec, pitch_class, render_song

SR = 44100
REPO = Path(__file__).resolve().parents[1]
# Tempi at both ends of 60-200 BPM (where RhythmExtractor2013 alone makes octave errors), swing, 3/4.
SPECS = [
    SongSpec(bpm=64.0, key="C#", scale="major", timbre="organ", seed=1),
    SongSpec(bpm=72.0, key="Bb", scale="minor", timbre="saw", seed=2),
    SongSpec(bpm=100.0, key="E", scale="minor", timbre="pluck", swing=1 / 3, seed=3),
    SongSpec(bpm=128.0, key="A", scale="minor", timbre="sine", seed=4),
    SongSpec(bpm=144.0, key="G", scale="major", timbre="saw", beats_per_bar=3, seed=5),
    SongSpec(bpm=182.0, key="F#", scale="minor", timbre="organ", seed=6),
]


def _cfg(tiny_dir, *overrides):
    return load_config("tiny", [f"models.tiny_dir={tiny_dir}", *overrides], environ={})


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> list[tuple[dict, SongSpec]]:
    out = tmp_path_factory.mktemp("rhythm-songs")
    rows = []
    for i, spec in enumerate(SPECS):
        path = out / f"song-{i}.wav"
        sf.write(path, render_song(spec, SR), SR)
        rows.append((file_track(str(path)), spec))
    return rows


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, dict]:
    """Silence, white noise, a 1-second clip and free-tempo (rubato) tonal material."""
    out = tmp_path_factory.mktemp("rhythm-bad")
    rng = np.random.default_rng(0)
    t = np.arange(SR * 20) / SR
    free = np.zeros_like(t)
    at = 0.0
    while at < 19:   # notes of D major at irregular times: pitch, but no pulse
        midi = 62 + [0, 2, 4, 5, 7, 9, 11][rng.integers(7)]
        span = (t >= at) & (t < at + 1.5)
        free[span] += np.sin(2 * np.pi * 440 * 2 ** ((midi - 69) / 12) * (t[span] - at)) * np.exp(-2 * (t[span] - at))
        at += rng.uniform(0.15, 1.4)
    audio = {
        "silence": np.zeros(SR * 10, np.float32),
        "noise": (rng.standard_normal(SR * 15) * 0.1).astype(np.float32),
        "one_second": render_song(SPECS[3], SR)[SR * 4:SR * 5],
        "free_tempo": (0.7 * free / np.abs(free).max()).astype(np.float32),
    }
    rows = {}
    for name, y in audio.items():
        sf.write(out / f"{name}.wav", y, SR)
        rows[name] = file_track(str(out / f"{name}.wav"))
    return rows


@pytest.fixture(scope="module")
def essentia_stage(tiny_models_dir):
    stage = RhythmStage(_cfg(tiny_models_dir, "rhythm.beat_tracker=essentia"))
    stage.setup()
    return stage


@pytest.fixture(scope="module")
def twin_stage(tiny_models_dir):
    stage = RhythmStage(_cfg(tiny_models_dir, "rhythm.beat_tracker=beat_this", "rhythm.checkpoint=tiny:beat_this"))
    stage.setup()
    return stage


def test_tempo_key_and_phrases_are_right_on_generated_songs(essentia_stage, songs):
    rows = essentia_stage.process([t for t, _ in songs])
    for row, (_, spec) in zip(rows, songs):
        assert row["status"] == STATUS_OK
        assert row["bpm"] == pytest.approx(spec.bpm, rel=0.04), (spec, row["no_tempo_reason"])
        assert row["bpm_confidence"] >= 0.5      # calibrated: the onset classifier agrees with Essentia
        assert row["cross_check"] == "onset"     # the default second opinion beside Essentia's
        assert row["cross_check_bpm"] == pytest.approx(spec.bpm, rel=0.04)
        assert (pitch_class(row["key"]), row["scale"]) == (pitch_class(spec.key), spec.scale)
        assert 0.5 <= row["key_confidence"] < 1.0
        assert row["tempo_phrase"] == f"{round(row['bpm'])} BPM"
        assert row["key_phrase"] == f"{row['key']} {spec.scale}"
        beats = np.asarray(row["beats"])
        assert 60 / np.median(np.diff(beats)) == pytest.approx(spec.bpm, rel=0.04)
        assert set(row["downbeats"]) <= set(row["beats"])
        assert row["segments"][0]["start"] == 0.0
        assert row["segments"][-1]["end"] == pytest.approx(row["beats"][-1], abs=5.0)
    meters = [r["meter"] for r in rows]
    assert meters[4] == 3 and meters[3] == 4     # 3/4 told from 4/4 by the accents
    pa.Table.from_pylist(rows, schema=RHYTHM_SCHEMA)   # rows fit the Arrow schema


@pytest.fixture(scope="module")
def onset_stage(tiny_models_dir):
    stage = RhythmStage(_cfg(tiny_models_dir, "rhythm.beat_tracker=onset"))
    stage.setup()
    return stage


def test_onset_path_gets_tempo_key_and_calibrated_confidences(onset_stage, songs):
    """The weight-free fast path (no Essentia rhythm): the same answers as the generator's."""
    rows = onset_stage.process([t for t, _ in songs])
    for row, (_, spec) in zip(rows, songs):
        assert row["status"] == STATUS_OK and row["tempo_source"] == "onset"
        assert row["cross_check"] is None and row["cross_check_bpm"] is None   # no second opinion of itself
        assert row["bpm"] == pytest.approx(spec.bpm, rel=0.04), (spec, row["no_tempo_reason"])
        assert 0.5 <= row["bpm_confidence"] < 1.0
        assert 60 / np.median(np.diff(row["beats"])) == pytest.approx(spec.bpm, rel=0.04)
        assert (pitch_class(row["key"]), row["scale"]) == (pitch_class(spec.key), spec.scale)
        assert 0.5 <= row["key_confidence"] < 1.0
    pa.Table.from_pylist(rows, schema=RHYTHM_SCHEMA)


def test_bad_input_is_explicit_never_an_exception(essentia_stage, bad_files):
    rows = dict(zip(bad_files, essentia_stage.process(list(bad_files.values()))))
    assert rows["silence"]["status"] == STATUS_REJECTED and rows["silence"]["reason"].startswith("silent")
    noise = rows["noise"]
    assert noise["status"] == STATUS_OK and noise["bpm"] is None and noise["key"] is None
    assert noise["no_tempo_reason"].startswith("low_confidence") and noise["bpm_confidence"] < 0.3
    assert noise["no_key_reason"].startswith("not_tonal")
    short = rows["one_second"]
    assert short["bpm"] is None and short["no_tempo_reason"].startswith("too_short")
    assert short["key"] is None and short["no_key_reason"].startswith("too_short")
    free = rows["free_tempo"]
    assert free["bpm"] is None and free["tempo_phrase"] is None
    assert free["no_tempo_reason"].split(":")[0] in {"low_confidence", "few_beats"}
    assert free["tonalness"] > 0.25      # pitched material: the key gate is strength, not noise
    pa.Table.from_pylist(list(rows.values()), schema=RHYTHM_SCHEMA)


def test_grid_stats_of_irregular_or_tiny_grids():
    from tasks.rhythm import grid_stats

    assert grid_stats(np.array([0.0, 1.0])) == (None, 0.0)
    bpm, regular = grid_stats(np.array([0.0, 0.1, 0.5, 0.52, 1.7, 1.71]))
    assert bpm is not None and 0.0 <= regular <= 1.0
    assert grid_stats(np.arange(0, 10, 0.5)) == (pytest.approx(120.0), 1.0)


def test_caption_phrases():
    assert caption_phrases(127.6, "A", "minor") == ["128 BPM", "A minor"]
    assert caption_phrases(None, "F#", "major") == ["F# major"]
    assert caption_phrases(90.0, None, None) == ["90 BPM"]
    assert caption_phrases(None, None, None) == []


def test_twin_is_a_released_format_checkpoint_loaded_by_the_real_code(twin_stage, tiny_models_dir, songs):
    from beat_this.model.beat_tracker import BeatThis

    ckpt = load_checkpoint(resolve_checkpoint("tiny:beat_this", tiny_models_dir))
    assert set(ckpt) >= {"state_dict", "hyper_parameters"}
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["transformer_dim"] == 32
    assert isinstance(twin_stage.tracker.model, BeatThis)
    rows = twin_stage.process([t for t, _ in songs[:2]])
    for row, (_, spec) in zip(rows, songs[:2]):
        assert row["status"] == STATUS_OK and row["tempo_source"] == "beat_this"
        # random weights: whatever the twin says, the onset tempo is recorded beside it
        assert row["cross_check"] == "onset" and row["cross_check_bpm"] == pytest.approx(spec.bpm, rel=0.04)
        assert 0.5 <= row["cross_check_confidence"] <= 1.0
        assert (row["bpm"] is None) == (row["no_tempo_reason"] is not None)
    pa.Table.from_pylist(rows, schema=RHYTHM_SCHEMA)


def test_cross_check_essentia_keeps_the_old_second_opinion_and_none_skips_it(tiny_models_dir, songs):
    """rhythm.cross_check=essentia records RhythmExtractor2013's BPM (its own 0-5.32 confidence)
    beside Beat This's; none records nothing."""
    track, spec = songs[3]
    rows = {}
    for check in ("essentia", "none"):
        stage = RhythmStage(_cfg(tiny_models_dir, "rhythm.beat_tracker=beat_this", "rhythm.checkpoint=tiny:beat_this",
                                 f"rhythm.cross_check={check}"))
        stage.setup()
        rows[check] = stage.process([track])[0]
    assert rows["essentia"]["cross_check"] == "essentia"
    assert rows["essentia"]["cross_check_bpm"] == pytest.approx(spec.bpm, rel=0.04)
    assert 1.0 < rows["essentia"]["cross_check_confidence"] <= 5.32
    assert rows["none"]["cross_check"] is None and rows["none"]["cross_check_bpm"] is None
    assert rows["none"]["cross_check_confidence"] is None
    pa.Table.from_pylist(list(rows.values()), schema=RHYTHM_SCHEMA)


# ---- parity with the package's own beat_this.inference --------------------------------------

class _TorchaudioMelSpectrogram(torch.nn.Module):
    """torchaudio.transforms.MelSpectrogram as beat_this.preprocessing.LogMelSpect configures it,
    written from torchaudio's definition (not from tasks/beat_frontend.py): periodic Hann STFT,
    centred and reflect-padded, normalized="frame_length" (torch.stft normalized=True), power 1,
    unnormalised Slaney filters (librosa's, the same triangles) -> (n_mels, frames)."""

    def __init__(self, sample_rate, n_fft, hop_length, f_min, f_max, n_mels, mel_scale, normalized, power):
        super().__init__()
        assert (mel_scale, normalized, power) == ("slaney", "frame_length", 1), "only what Beat This asks for"
        librosa = pytest.importorskip("librosa")
        self.n_fft, self.hop = n_fft, hop_length
        self.register_buffer("fb", torch.from_numpy(librosa.filters.mel(
            sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=False, norm=None)).float())

    def forward(self, wav):
        spec = torch.stft(wav, self.n_fft, self.hop, self.n_fft, torch.hann_window(self.n_fft), center=True,
                          pad_mode="reflect", normalized=True, onesided=True, return_complex=True).abs()
        return self.fb @ spec


@pytest.fixture
def reference_inference(monkeypatch):
    """beat_this.inference itself, imported with a stand-in torchaudio (not installed here) that
    holds only the MelSpectrogram its LogMelSpect builds; the rest (checkpoint loading, soxr
    resampling, split/predict/aggregate, the Postprocessor) is the package's code. Removed again
    after the test."""
    import beat_this

    transforms = types.SimpleNamespace(MelSpectrogram=_TorchaudioMelSpectrogram)
    monkeypatch.setitem(sys.modules, "torchaudio", types.SimpleNamespace(transforms=transforms))
    for name in ("preprocessing", "inference"):
        monkeypatch.setitem(sys.modules, f"beat_this.{name}", None)
        del sys.modules[f"beat_this.{name}"]
        monkeypatch.setattr(beat_this, name, None, raising=False)
    return importlib.import_module("beat_this.inference")


@pytest.mark.parametrize("frames", [900, 1500, 3700])
def test_chunked_logits_parity_with_reference_split_predict_aggregate(twin_stage, reference_inference, frames):
    """Our batched chunking (chunks of several pieces per forward) gives the logits of
    beat_this.inference.split_predict_aggregate (one chunk per forward) within 1e-4."""
    tracker: BeatThisTracker = twin_stage.tracker
    torch.manual_seed(frames)
    spect = torch.rand(frames, 128) * 4
    with torch.inference_mode():
        ours = tracker.logits([spect, spect[:700]])[0]
        ref = reference_inference.split_predict_aggregate(spect, 1500, 6, "keep_first", tracker.model)
    torch.testing.assert_close(ours[0], ref["beat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[1], ref["downbeat"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def peaky_twin(tiny_models_dir, tmp_path_factory) -> Path:
    """The twin with its output biases raised: its random logits sit below 0, where the minimal
    postprocessor finds almost no peaks; raised, about half the frames are beats and a tenth
    downbeats, so a comparison of beat times has something to compare."""
    ckpt = load_checkpoint(resolve_checkpoint("tiny:beat_this", tiny_models_dir))
    ckpt["state_dict"]["model.task_heads.beat_downbeat_lin.bias"] += torch.tensor([0.16, 0.025])
    path = tmp_path_factory.mktemp("peaky-twin") / TINY_NAME
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def beat_parity_files(tmp_path_factory) -> list[Path]:
    """45 s of stereo at 44.1 kHz (two chunks, down-mix and resampling on both sides) and 12 s
    of mono at 22.05 kHz (one short chunk, no resampling), as float WAV."""
    out = tmp_path_factory.mktemp("beat-parity")
    song = render_song(SongSpec(bpm=128.0, key="A", scale="minor", structure=[("verse", 24)], seed=4), SR)[:, 0]
    right = 0.6 * np.roll(song, 300) + 0.01 * np.random.default_rng(4).standard_normal(len(song))
    sf.write(out / "stereo.wav", np.stack([song, right], axis=1), SR, subtype="FLOAT")
    mono = render_song(SongSpec(bpm=100.0, key="E", scale="minor", structure=[("verse", 5)], seed=3), 22050)[:, 0]
    sf.write(out / "mono.wav", mono, 22050, subtype="FLOAT")
    return [out / "stereo.wav", out / "mono.wav"]


def test_beat_times_parity_with_reference_audio2beats(tiny_models_dir, peaky_twin, beat_parity_files,
                                                      reference_inference, monkeypatch):
    """The rhythm stage's Beat This path (our loader's down-mix and soxr resampling, our log-mel,
    batched chunks, the package's Postprocessor) against beat_this.inference.Audio2Beats on the
    samples File2Beats would read (soundfile, float64): the same frames for every beat and
    downbeat (times equal within 1e-9 s)."""
    stage = RhythmStage(_cfg(tiny_models_dir, "device=cpu", "rhythm.beat_tracker=beat_this",
                             f"rhythm.checkpoint={peaky_twin}"))
    stage.setup()
    grids = []
    analyze = rhythm.analyze_track

    def spy(*args, **kwargs):   # what the stage hands on: (beats, downbeats, probabilities)
        grids.append(args[5])
        return analyze(*args, **kwargs)

    monkeypatch.setattr(rhythm, "analyze_track", spy)
    rows = stage.process([file_track(str(p)) for p in beat_parity_files])
    assert [r["status"] for r in rows] == [STATUS_OK, STATUS_OK]
    reference = reference_inference.Audio2Beats(checkpoint_path=str(peaky_twin), device="cpu")
    for path, (beats, downbeats, _) in zip(beat_parity_files, grids):
        signal, sr = sf.read(path, dtype="float64")
        ref_beats, ref_downbeats = reference(signal, sr)
        assert len(beats) >= 20 and len(downbeats) >= 3, "the comparison needs beats to compare"
        for ours, ref in ((beats, ref_beats), (downbeats, ref_downbeats)):
            np.testing.assert_array_equal(np.round(ours * 50), np.round(np.asarray(ref) * 50))
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_missing_checkpoint_says_what_to_do(tiny_models_dir, tmp_path):
    stage = RhythmStage(_cfg(tiny_models_dir, f"rhythm.checkpoint={tmp_path}/nope.ckpt"))
    with pytest.raises(ModelLoadError, match="no such file"):
        stage.setup()


def test_analyze_prints_one_json_line_per_file(songs, tiny_models_dir, tmp_path, capsys):
    args = argparse.Namespace(files=[songs[3][0]["uri"], str(tmp_path / "missing.wav")], json=True,
                              config="tiny", work=None,
                              overrides=[f"models.tiny_dir={tiny_models_dir}", "rhythm.beat_tracker=essentia"])
    assert cli_analyze(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == args.files
    assert lines[0]["status"] == STATUS_OK and lines[0]["key_phrase"] == "A minor"
    assert lines[0]["tempo_phrase"] == "128 BPM"
    assert lines[1]["status"] == STATUS_REJECTED and lines[1]["reason"].startswith("unreadable")
    args.json = False
    cli_analyze(args)
    text = capsys.readouterr().out
    assert re.search(r"12[78]\.\d BPM", text) and "A minor" in text


def _acepipe(*args: str, torch_home: Path) -> subprocess.CompletedProcess:
    """`python -m flows.cli ARGS` with the default config, as on a machine with no network: no
    cached checkpoint, hubs offline, and the download refused at once (a dead proxy) even here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACEPIPE__")}
    env.update(HF_HUB_OFFLINE="1", TORCH_HOME=str(torch_home), OMP_NUM_THREADS="1",
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def offline_analyze(songs, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`acepipe analyze SONG --json` with the default config (rhythm.checkpoint=final0), offline."""
    torch_home = tmp_path_factory.mktemp("torch-home")
    return _acepipe("analyze", songs[3][0]["uri"], "--json", torch_home=torch_home), torch_home


def test_analyze_offline_without_checkpoint_says_what_to_do(offline_analyze):
    done, _ = offline_analyze
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    # one error line, the last; config warnings (the default profile's lyrics_db) may precede it
    [error] = [line for line in done.stderr.splitlines() if line.startswith("acepipe: error:")]
    assert done.stderr.splitlines()[-1] == error
    assert error.startswith("acepipe: error: rhythm.checkpoint='final0': ")
    assert "--set rhythm.beat_tracker=onset" in error and "rhythm.beat_tracker=essentia" in error
    assert "--set rhythm.checkpoint=/path/to/final0.ckpt" in error and "final0-2, small0-2" in error


def test_the_suggested_weight_free_run_works_offline(offline_analyze, songs):
    done, torch_home = offline_analyze
    suggestion = re.search(r"--set (rhythm\.beat_tracker=\w+)", done.stderr).group(1)
    done = _acepipe("analyze", songs[3][0]["uri"], "--json", "--set", suggestion, torch_home=torch_home)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    row = json.loads(line)
    assert row["status"] == STATUS_OK and row["tempo_source"] == "onset"
    assert row["bpm"] == pytest.approx(SPECS[3].bpm, rel=0.04) and row["key_phrase"] == "A minor"


def test_a_released_name_is_downloaded_once_into_the_cache(tiny_models_dir, tmp_path, monkeypatch):
    """The download path, against a local server holding the twin as `final0.ckpt`."""
    import functools
    import http.server
    import shutil
    import threading

    from tasks import beat_model

    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(Path(resolve_checkpoint("tiny:beat_this", tiny_models_dir)) / beat_model.TINY_NAME,
                served / "final0.ckpt")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_request(self, *args):
            requests.append(self.path)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(beat_model, "CHECKPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(beat_model, "_released_path", lambda name: tmp_path / "cache" / f"beat_this-{name}.ckpt")
    try:
        assert "state_dict" in load_checkpoint("final0") and "state_dict" in load_checkpoint("final0")
        with pytest.raises(ModelLoadError, match=r"'final9': no local file and the download failed \(HTTPError"):
            load_checkpoint("final9")
    finally:
        server.shutdown()
    assert requests == ["/final0.ckpt", "/final9.ckpt"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["beat_this-final0.ckpt"]


def test_preflight_check_refuses_only_a_missing_checkpoint_path(tiny_models_dir, tmp_path):
    """The flow calls check() before any work: a checkpoint path that does not exist fails the run
    at once, naming the field; names resolved later (tiny twins, released names) and the Essentia
    path pass."""
    missing = f"rhythm.checkpoint={tmp_path}/final0.ckpt"
    with pytest.raises(ValueError, match=r"rhythm.checkpoint='.*/final0.ckpt': no such file.*beat_tracker=onset"):
        RhythmStage.check(_cfg(tiny_models_dir, "rhythm.beat_tracker=beat_this", missing))
    for overrides in (("rhythm.beat_tracker=essentia", missing),
                      ("rhythm.beat_tracker=beat_this", "rhythm.checkpoint=tiny:beat_this"),
                      ("rhythm.beat_tracker=beat_this", "rhythm.checkpoint=final0")):
        RhythmStage.check(_cfg(tiny_models_dir, *overrides))   # no error

