"""The synthetic corpus: reproducible, complete, and musically what its ground truth says."""
import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq

from tasks.synth import SongSpec, generate_corpus, render_song, song_truth


def digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(os.fsencode(root)):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, os.fsencode(root))] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_same_seed_same_bytes(synth_corpus, tmp_path):
    generate_corpus(tmp_path / "again", n=8, seed=0)
    assert digest_tree(synth_corpus) == digest_tree(tmp_path / "again")


def test_every_bad_kind_and_the_odd_cases_are_present(synth_corpus):
    truth = json.loads((synth_corpus / "ground_truth.json").read_text())
    expects = {s["expect"] for s in truth["songs"]}
    assert {"truncated", "empty", "unreadable", "silent", "too_short", "unsupported_channels",
            "non_finite", "ok"} <= expects
    assert {s["sample_rate"] for s in truth["songs"] if s["kind"] == "song"} >= {8000, 96000, 44100}
    assert any(s["kind"] == "duplicate" for s in truth["songs"])
    odd = [s for s in truth["songs"] if "file_hex" in s]
    assert odd and os.path.exists(os.fsencode(synth_corpus) + b"/" + bytes.fromhex(odd[0]["file_hex"]))
    for s in truth["songs"]:
        if s["kind"] == "song":
            assert 10 <= s["duration"] <= 40
    assert any(s["vocals"] for s in truth["songs"]) and any(s["kind"] == "song" and not s["vocals"] for s in truth["songs"])


def test_lyrics_database(synth_corpus):
    t = pq.read_table(synth_corpus / "lyrics.parquet").to_pylist()
    assert set(t[0]) == {"lyric_id", "title", "artist", "language", "lyrics"}
    assert any(r["language"] in ("zh", "ja", "ko") for r in t)
    assert sum(r["lyric_id"].startswith("dis-") for r in t) >= 10
    assert all("[verse]" in r["lyrics"] and "[chorus]" in r["lyrics"] for r in t)
    truth = json.loads((synth_corpus / "ground_truth.json").read_text())
    ids = {r["lyric_id"] for r in t}
    assert all(s["lyric_id"] in ids for s in truth["songs"] if s["vocals"])


def test_drums_sit_on_the_beat_grid():
    spec = SongSpec(bpm=123.0, key="E", scale="minor", seed=3)
    sr = 22050
    x = render_song(spec, sr).mean(axis=1)
    hop = 256
    frames = np.abs(x[: len(x) // hop * hop]).reshape(-1, hop).max(axis=1)
    onset = np.maximum(0, np.diff(frames))
    onset -= onset.mean()
    ac = np.correlate(onset, onset, "full")[len(onset) - 1:]
    period = 60.0 / spec.bpm * sr / hop
    lo, hi = int(period * 0.8), int(period * 1.2)
    peak = lo + int(np.argmax(ac[lo:hi]))
    assert abs(peak - period) / period < 0.03
    truth = song_truth(spec)
    assert truth["downbeats"] == truth["beats"][::4]
    assert truth["sections"][1]["label"] == "verse"
