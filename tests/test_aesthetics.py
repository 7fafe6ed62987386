"""Aesthetics stage: the tiny twin loads from disk through the real loader (checkpoint.pt and
save_pretrained layouts) and scores synthetic songs as the package's own AesPredictor does;
thresholds, live recordings and bad input become rejects with reasons."""
from __future__ import annotations

import hashlib
import json
import importlib
import math
import os
import re
import shutil
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

from schemas.aesthetics import AESTHETICS_SCHEMA, AXES
from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from tasks import audio
from tasks.aesthetics import AestheticsStage, build_tiny, load_model
from tasks.models import ModelLoadError, resolve_checkpoint
from tasks.synth import SongSpec, render_song


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
    def make(*overrides: str) -> AestheticsStage:
        cfg = load_config("tiny", [f"models.tiny_dir={tiny_models_dir}", "device=cpu",
                                   "aesthetics.checkpoint=tiny:aesthetics", "aesthetics.min_pq=null",
                                   *overrides], environ={})
        stage = AestheticsStage(cfg)
        stage.setup()
        return stage
    return make


@pytest.fixture(scope="module")
def songs(synth_corpus) -> list[dict]:
    return [track_row(p) for p in corpus_files(synth_corpus, "song")]


def test_twin_is_written_in_the_released_format_and_loads_through_the_real_loader(tiny_models_dir):
    twin = resolve_checkpoint("tiny:aesthetics", tiny_models_dir)
    ckpt = torch.load(os.path.join(twin, "checkpoint.pt"), weights_only=True)
    assert set(ckpt) == {"state_dict", "model_cfg", "target_transform"}
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert set(ckpt["target_transform"]) == {"CE", "CU", "PC", "PQ"}
    model = load_model(twin)
    assert type(model).__name__ == "AesMultiOutput"
    assert sum(p.numel() for p in model.parameters()) < 500_000  # tiny, not the 94M release
    wav = torch.randn(2, 1, 16000 * 3) * 0.1
    again = load_model(twin)
    with torch.inference_mode():
        a, b = model({"wav": wav}), again({"wav": wav})
    for axis in ("CE", "CU", "PC", "PQ"):
        assert torch.allclose(a[axis], b[axis])  # weights come from disk, not from init


def test_twin_builder_is_reproducible(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build_tiny(tmp_path / "a")
    build_tiny(tmp_path / "b")
    sa = torch.load(tmp_path / "a/checkpoint.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b/checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_song_gets_four_finite_scores(make_stage, songs):
    import pyarrow as pa

    rows = make_stage().process(songs)
    assert [r["status"] for r in rows] == [STATUS_OK] * len(songs)
    table = pa.Table.from_pylist(rows, schema=AESTHETICS_SCHEMA)  # fits the declared schema
    for row, song in zip(table.to_pylist(), songs):
        assert all(math.isfinite(row[a]) for a in ("ce", "cu", "pc", "pq"))
        assert row["windows"] == math.ceil(song["duration"] / 10 - 1e-6)


def test_track_score_is_the_length_weighted_mean_of_its_windows(make_stage, songs):
    stage = make_stage()
    song = songs[0]
    wav = audio.load_track(song, 16000, 1, stage.cfg.audio)[0]
    windows = [wav[s:s + 160000] for s in range(0, len(wav), 160000)]
    assert len(windows[-1]) < 160000  # the padded, masked tail is part of the check
    scores = torch.cat([stage._score([w]) for w in windows]).double().numpy()
    weights = np.array([len(w) / 160000 for w in windows])
    expected = (scores * weights[:, None]).sum(0) / weights.sum()
    row = stage.process([song])[0]
    assert np.allclose([row["ce"], row["cu"], row["pc"], row["pq"]], expected, atol=1e-4)
    # the batch size is a throughput knob only
    row_b1 = make_stage("aesthetics.batch_size=1").process([song])[0]
    assert np.allclose([row_b1[a] for a in ("ce", "cu", "pc", "pq")],
                       [row[a] for a in ("ce", "cu", "pc", "pq")], atol=1e-4)


def low_aesthetics(reason: str) -> list[tuple[str, float, float]]:
    """(axis, value, threshold) of each failing axis a `low_aesthetics: PQ 3.104 < 5` reason names;
    the value as written is below the threshold as written (the score is rounded down)."""
    code, _, detail = reason.partition(": ")
    found = [re.fullmatch(r"(CE|CU|PC|PQ) (-?\d+\.\d{3}) < (\S+)", part) for part in detail.split(", ")]
    assert code == "low_aesthetics" and all(found), reason
    parsed = [(m.group(1), float(m.group(2)), float(m.group(3))) for m in found]
    assert all(value < threshold for _, value, threshold in parsed), reason
    return parsed


def shown(score: float) -> float:
    """A score as the reason shows it: three decimals, rounded down."""
    return math.floor(score * 1000) / 1000


def test_thresholds_reject_with_the_failing_axis_and_value(make_stage, songs):
    """The detail names each axis below its minimum, in AXES order, with the row's score (3
    decimals, rounded down) and the configured minimum; an axis at or above its minimum is not named."""
    pq = make_stage().process(songs[:1])[0]["pq"]
    limits = {"PQ": pq + 0.001, "CE": 0.0}
    row = make_stage(f"aesthetics.min_pq={limits['PQ']}", "aesthetics.min_ce=0").process(songs[:1])[0]
    assert row["status"] == STATUS_REJECTED
    assert row["pq"] == pytest.approx(pq)  # the scores stay on the row for inspection
    failing = [a for a in AXES if a in limits and row[a.lower()] < limits[a]]
    assert failing == ["PQ"]   # CE passes its minimum of 0: only PQ may be named
    [(axis, value, threshold)] = low_aesthetics(row["reason"])
    assert (axis, value) == ("PQ", shown(row["pq"])) and threshold == pytest.approx(limits["PQ"], rel=1e-5)

    both = make_stage("aesthetics.min_pq=99", "aesthetics.min_cu=99").process(songs[:1])[0]
    assert both["status"] == STATUS_REJECTED
    assert low_aesthetics(both["reason"]) == [("CU", shown(both["cu"]), 99.0), ("PQ", shown(both["pq"]), 99.0)]
    kept = make_stage(f"aesthetics.min_pq={pq - 0.01}").process(songs[:1])[0]
    assert kept["status"] == STATUS_OK and kept["reason"] is None


def test_live_recordings_are_rejected_only_when_asked(make_stage, synth_corpus, tmp_path):
    src = corpus_files(synth_corpus, "song")[0]
    live = tmp_path / ("Band - Song (Live)" + os.path.splitext(os.fsdecode(src))[1])
    shutil.copyfile(src, live)
    track = track_row(live)
    assert make_stage().process([track])[0]["status"] == STATUS_OK
    row = make_stage("aesthetics.reject_live=true").process([track])[0]
    assert row["status"] == STATUS_REJECTED and row["reason"].startswith("live_recording: ")
    studio = make_stage("aesthetics.reject_live=true").process([track_row(src)])[0]
    assert studio["status"] == STATUS_OK


def test_bad_input_is_rejected_with_the_loaders_reason(make_stage, synth_corpus):
    bad = []
    for path in corpus_files(synth_corpus, "bad"):
        try:
            bad.append(track_row(path))  # ingest rejects what cannot even be probed
        except audio.AudioError:
            continue
    rows = make_stage().process(bad)
    codes = {r["reason"].split(":")[0] for r in rows}
    assert all(r["status"] == STATUS_REJECTED for r in rows)
    assert {"silent", "too_short", "non_finite"} <= codes


def test_very_long_tracks_are_rejected_not_failed(make_stage, songs):
    rows = make_stage("audio.max_duration_s=20").process(songs[:3])
    assert {r["reason"].split(":")[0] for r in rows} == {"too_long"}


def test_a_save_pretrained_directory_loads_and_scores_as_the_checkpoint(make_stage, songs, tiny_models_dir,
                                                                        tmp_path):
    """The hub layout (config.json + model.safetensors) through the package's from_pretrained;
    the twin's own WavLM size travels in config.json."""
    twin = resolve_checkpoint("tiny:aesthetics", tiny_models_dir)
    load_model(twin).save_pretrained(tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf"))
    assert "checkpoint.pt" not in os.listdir(tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["wavlm_cfg"]["encoder_embed_dim"] == 32 and set(config["target_transform"]) == set(AXES)
    want = make_stage().process(songs[:2])
    got = make_stage(f"aesthetics.checkpoint={tmp_path / 'hf'}").process(songs[:2])
    for a, b in zip(want, got):
        assert b["status"] == STATUS_OK
        assert [b[x] for x in ("ce", "cu", "pc", "pq")] == pytest.approx([a[x] for x in ("ce", "cu", "pc", "pq")],
                                                                        abs=1e-6)


def test_every_load_failure_is_one_line_naming_the_field(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_text("<html>a login page saved as a checkpoint</html>")
    cases = {"/no/such/checkpoint.pt": "no such file or directory",
             str(tmp_path / "missing-dir"): "no such file or directory",
             str(empty): "holds neither checkpoint.pt nor config.json",
             str(corrupt): "could not be loaded (UnpicklingError"}
    for ref, cause in cases.items():
        with pytest.raises(ModelLoadError) as err:
            load_model(ref)
        message = str(err.value)
        assert message.startswith(f"aesthetics.checkpoint={ref!r}") and cause in message, message
        assert "\n" not in message and "facebook/audiobox-aesthetics" in message


# ---- parity with the package's own inference ------------------------------------------------

@pytest.fixture
def reference_infer(monkeypatch):
    """audiobox_aesthetics.infer, imported with a stand-in for torchaudio (not installed here).
    Given 16 kHz tensors, AesPredictor.forward's one torchaudio call is
    functional.resample(wav, 16000, 16000), which torchaudio answers with its input unchanged."""
    import audiobox_aesthetics

    def resample(wav, orig_freq, new_freq):
        assert orig_freq == new_freq, "the parity test feeds the reference 16 kHz tensors only"
        return wav

    monkeypatch.setitem(sys.modules, "torchaudio",
                        types.SimpleNamespace(functional=types.SimpleNamespace(resample=resample)))
    monkeypatch.setitem(sys.modules, "audiobox_aesthetics.infer", None)   # restored (removed) afterwards
    del sys.modules["audiobox_aesthetics.infer"]
    monkeypatch.setattr(audiobox_aesthetics, "infer", None, raising=False)
    return importlib.import_module("audiobox_aesthetics.infer")


@pytest.fixture(scope="module")
def stereo_16k(tmp_path_factory) -> list[dict]:
    """Stereo 16 kHz float files of 3.7 s (one padded window) and 25.3 s (two full windows and a
    padded third), so neither side resamples and only the down-mix, windowing, masking,
    batching, de-normalisation and averaging are compared."""
    out = tmp_path_factory.mktemp("aes-parity")
    song = render_song(SongSpec(bpm=120.0, key="A", scale="minor", structure=[("verse", 13)], seed=7), 16000)
    rng = np.random.default_rng(7)
    rows = []
    for seconds in (3.7, 25.3):
        left = song[:int(seconds * 16000), 0]
        right = 0.5 * np.roll(left, 800) + 0.02 * rng.standard_normal(len(left)).astype(np.float32)
        path = out / f"stereo-{seconds}.wav"
        sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
        rows.append(track_row(path))
    return rows


def test_scores_parity_with_the_reference_aes_predictor(make_stage, stereo_16k, tiny_models_dir,
                                                        reference_infer, monkeypatch):
    """One twin's weights through our stage and through AesPredictor.forward (its own loading,
    make_inference_batch, mask, Normalize.inverse and weighted mean): within 1e-4 on each axis."""
    from audiobox_aesthetics.model import aes
    from audiobox_aesthetics.model.wavlm import WavLMConfig

    twin = resolve_checkpoint("tiny:aesthetics", tiny_models_dir)
    ckpt = torch.load(os.path.join(twin, "checkpoint.pt"), weights_only=True)
    with monkeypatch.context() as patch:   # the reference builds the released WavLM size; ours is tiny
        patch.setattr(aes, "DEFAULT_AUDIO_CFG", WavLMConfig(ckpt["model_cfg"]["wavlm_cfg"]))
        predictor = reference_infer.AesPredictor(checkpoint_pth=os.path.join(twin, "checkpoint.pt"))
    predictor.model.to("cpu")              # it picks cuda/mps when present; compare on one device
    predictor.device = torch.device("cpu")
    batch = [{"path": torch.from_numpy(sf.read(os.fsdecode(t["uri_raw"]), dtype="float32")[0].T.copy()),
              "sample_rate": 16000} for t in stereo_16k]
    assert all(item["path"].shape[0] == 2 for item in batch)   # the reference does its own down-mix
    reference = predictor.forward(batch)
    rows = make_stage().process(stereo_16k)
    assert [r["windows"] for r in rows] == [1, 3]
    for row, ref in zip(rows, reference):
        assert row["status"] == STATUS_OK
        ours = [row[a.lower()] for a in AXES]
        np.testing.assert_allclose(ours, [ref[a] for a in AXES], rtol=0, atol=1e-4)
