"""Aesthetics stage: the tiny twin loads from disk through the real loader and scores
synthetic songs; thresholds, live recordings and bad input become rejects with reasons."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from schemas.aesthetics import AESTHETICS_SCHEMA
from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.config import load_config
from tasks import audio
from tasks.aesthetics import AestheticsStage, build_tiny, load_model
from tasks.models import resolve_checkpoint


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


def test_thresholds_reject_with_the_failing_axis_and_value(make_stage, songs):
    base = make_stage().process(songs[:2])
    pq = base[0]["pq"]
    rows = make_stage(f"aesthetics.min_pq={pq + 0.001}", "aesthetics.min_ce=0").process(songs[:1])
    assert rows[0]["status"] == STATUS_REJECTED
    assert rows[0]["reason"] == f"low_aesthetics: PQ {pq:.2f} < {pq + 0.001:g}"
    assert rows[0]["pq"] == pytest.approx(pq)  # the scores stay on the row for inspection
    both = make_stage("aesthetics.min_pq=99", "aesthetics.min_cu=99").process(songs[:1])[0]
    assert both["reason"].startswith("low_aesthetics: CU ") and ", PQ " in both["reason"]
    kept = make_stage(f"aesthetics.min_pq={pq - 0.01}").process(songs[:1])[0]
    assert kept["status"] == STATUS_OK


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


def test_a_missing_checkpoint_says_what_to_do():
    with pytest.raises(RuntimeError, match="aesthetics.checkpoint='/no/such/checkpoint.pt': no such file"):
        load_model("/no/such/checkpoint.pt")
