"""Tempo without weights (tasks/tempo.py): a click track's tempo and beat times from its
construction, generated songs at both ends of 60-180 BPM (where the metrical level is in doubt),
and a wrong metrical level never scored as certain."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.songgen import GenSong, render
from tasks import tempo
from tasks.beat_frontend import SAMPLE_RATE, LogMelSpect, onset_envelope
from tasks.structure import chroma, power_frames


def _evidence(wav22: np.ndarray):
    with torch.inference_mode():
        spect = LogMelSpect()(torch.from_numpy(wav22.astype(np.float32))).numpy()
    return (onset_envelope(spect), tempo.low_band_envelope(spect), chroma(power_frames(wav22)),
            tempo.mid_band_envelope(spect))


def _song(bpm, groove, timbre, seed, beats_per_bar=4):
    return GenSong(bpm=bpm, tonic=seed % 12, scale=("major", "minor")[seed % 2], progression=("I-V-vi-IV", "i-VI-iv-V")[seed % 2],
                   timbre=timbre, groove=groove, voicing="close", beats_per_bar=beats_per_bar, bars=10, chords_per_bar=1,
                   melody=True, detune_cents=0.0, fmt="wav", seed=seed)


SONGS = [_song(64.0, "rock", "piano", 2), _song(72.0, "none", "organ", 3), _song(150.0, "shuffle", "pluck", 5, 3),
         _song(174.0, "sixteenths", "square", 6)]


@pytest.fixture(scope="module")
def evidence():
    return [_evidence(render(song, SAMPLE_RATE)) for song in SONGS]


def test_click_track_tempo_and_beats():
    """Clicks every 0.6 s with an accent each fourth: 100 BPM, beats 0.6 s apart on the clicks."""
    wav = np.zeros(SAMPLE_RATE * 20, np.float32)
    click = np.exp(-np.arange(400) / 60.0) * np.sin(np.arange(400) * 0.9)
    for i, at in enumerate(np.arange(0.5, 19.5, 0.6)):
        s = int(at * SAMPLE_RATE)
        wav[s:s + 400] += (1.0 if i % 4 == 0 else 0.6) * click
    bpm, beats, _, confidence = tempo.estimate_tempo(*_evidence(wav))
    assert bpm == pytest.approx(100.0, rel=0.02)
    assert np.median(np.diff(beats)) == pytest.approx(0.6, abs=0.021)
    assert np.min(np.abs(beats[:, None] - np.arange(0.5, 19.5, 0.6)[None]), axis=1).max() <= 0.03
    assert confidence >= 0.5


@pytest.mark.parametrize("i", range(len(SONGS)), ids=[f"{s.bpm:g}-{s.groove}" for s in SONGS])
def test_generated_songs_at_both_ends_of_the_range(evidence, i):
    bpm, _, _, confidence = tempo.estimate_tempo(*evidence[i])
    assert bpm == pytest.approx(SONGS[i].bpm, rel=0.04)
    assert confidence >= 0.5


def test_a_wrong_metrical_level_is_never_certain(evidence):
    """Whatever the classifier prefers, the calibrated probability it gives the double or the
    half of the true tempo stays far from 1."""
    for song, ev in zip(SONGS, evidence):
        cands = tempo.candidates(*ev)
        probs = tempo.tempo_probabilities(cands)
        for c, p in zip(cands, probs):
            if any(abs(c["bpm"] - f * song.bpm) <= 0.04 * f * song.bpm for f in (2.0, 0.5)):
                assert tempo.calibrate(float(p)) < 0.5, (song.bpm, c["bpm"], p)


def test_no_pulse_no_candidates_on_short_or_empty_input():
    assert tempo.candidates(np.zeros(100), np.zeros(100)) == []
    assert tempo.estimate_tempo(np.zeros(100), np.zeros(100))[0] is None


def test_bar_evidence_finds_the_bar_of_an_accent_pattern():
    """Ticks every 25 frames, every third one accented: the position in a bar of 3 explains all the
    accent variance; in bars of 2 or 4 (48 ticks, a whole number of 12-tick cycles) none of it."""
    e = np.zeros(48 * 25 + 10)
    e[np.arange(48) * 25 + 5] = np.where(np.arange(48) % 3 == 0, 1.0, 0.2)
    bar_2, bar_3, bar_4 = tempo.bar_evidence(e, 25.0, 5.0)
    assert bar_3 == pytest.approx(1.0, abs=1e-6)
    assert bar_2 == pytest.approx(0.0, abs=1e-6) and bar_4 == pytest.approx(0.0, abs=1e-6)


def test_snare_band_tells_a_backbeat_from_its_double_time_reading():
    """A snare on every other beat (2 and 4): read at the beat, position in a bar of 2 explains all
    of the snare band's accents; read at double tempo the ticks go 0, 0, 1, 0 (the snare on every
    4th tick), where a bar of 4 explains all of it and a bar of 2 a third (means 1/2 and 0 about
    1/4: variance 1/16 of 3/16)."""
    em = np.zeros(64 * 25 + 10)
    em[np.arange(1, 64, 2) * 25 + 5] = 1.0       # beats 2 and 4 of 16 bars of 4 at 25 frames a beat
    _, _, bar_2, _, bar_4 = tempo._snare_bars(em, 25.0, 5.0)
    assert bar_2 == pytest.approx(1.0, abs=1e-6) and bar_4 == pytest.approx(1.0, abs=1e-6)
    _, _, bar_2, _, bar_4 = tempo._snare_bars(em, 12.5, 5.0)
    assert bar_2 == pytest.approx(1 / 3, abs=1e-6) and bar_4 == pytest.approx(1.0, abs=1e-6)
    assert tempo._snare_bars(None, 25.0, 5.0) == [0.0] * 5


@pytest.mark.parametrize("bpm,beats_per_bar,seed", [(62.0, 3, 21), (66.0, 4, 22)])
def test_slow_breakbeat_is_not_read_at_double_tempo(bpm, beats_per_bar, seed):
    """The breakbeat (kick on 1 and the and-of-2, which looks like a beat at double tempo) is a
    groove the fit never heard; slow songs on it keep their tempo."""
    song = _song(bpm, "breakbeat", "pluck", seed, beats_per_bar)
    got, _, _, _ = tempo.estimate_tempo(*_evidence(render(song, SAMPLE_RATE)))
    assert got == pytest.approx(bpm, rel=0.04)
