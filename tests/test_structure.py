"""Structure segmentation: boundaries of generated songs within 3 s, verse/chorus by
repetition, and the boundary F-measure the benchmark reports."""
from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

from tasks.beat_frontend import LogMelSpect
from tasks.structure import NoveltySegmenter, boundary_f, checkerboard, novelty
from tasks.synth import STRUCTURES, SongSpec, render_song, song_truth


def _analyse(wav44: np.ndarray, beats, duration, segmenter=None):
    wav = soxr.resample(wav44, 44100, 22050).astype(np.float32)
    spect = LogMelSpect()(torch.from_numpy(wav)).numpy()
    return (segmenter or NoveltySegmenter()).segment(wav, spect, beats, duration)


def test_boundary_f():
    assert boundary_f([10.0, 20.0], [11.0, 25.0]) == pytest.approx(0.5)
    assert boundary_f([10.0, 20.0], [10.5, 19.0]) == 1.0
    assert boundary_f([10.0], []) == 0.0 and boundary_f([], []) == 1.0
    assert boundary_f([10.0, 11.0], [10.5]) == pytest.approx(2 / 3)   # one estimate matches one boundary


def test_novelty_peaks_where_the_material_changes():
    ssm = np.ones((40, 40))
    ssm[:20, 20:] = ssm[20:, :20] = -1.0
    nov = novelty(ssm, 6)
    assert int(np.argmax(nov)) == 20
    assert checkerboard(4).shape == (8, 8)


def test_generated_songs_boundaries_within_3s():
    scores = []
    for i, (bpm, structure) in enumerate([(96.0, STRUCTURES[0]), (120.0, STRUCTURES[1]), (108.0, STRUCTURES[2])]):
        spec = SongSpec(bpm=bpm, key="D", scale=("major", "minor")[i % 2], structure=structure,
                        timbre=("saw", "organ", "sine")[i], seed=i)
        truth = song_truth(spec)
        segments = _analyse(render_song(spec).mean(axis=1), np.array(truth["beats"]), truth["duration"])
        assert segments[0].start == 0.0 and segments[-1].end == pytest.approx(truth["duration"])
        assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
        scores.append(boundary_f([s["start"] for s in truth["sections"][1:]], [s.start for s in segments[1:]]))
    assert np.mean(scores) >= 0.6, scores


def test_repeated_sections_are_verse_and_chorus():
    """A B A B with distinct material: the first repeated section is the verse, the next the chorus.
    Five-bar sections whose chords change every bar: the kernel must span more than a bar."""
    a = render_song(SongSpec(bpm=120, key="C", scale="major", timbre="saw", structure=[("verse", 5)], seed=1))
    b = render_song(SongSpec(bpm=120, key="F#", scale="minor", timbre="organ", structure=[("chorus", 5)], seed=2))
    bar = 2.0   # 4 beats at 120 BPM
    a, b = a[: int(5 * bar * 44100)].mean(axis=1), b[: int(5 * bar * 44100)].mean(axis=1)
    wav = np.concatenate([a, b, a, b])
    duration = len(wav) / 44100
    beats = np.arange(0, duration - 0.01, 0.5)
    segments = _analyse(wav, beats, duration, NoveltySegmenter(kernel_beats=12, min_segment_beats=12))
    assert [s.label for s in segments] == ["verse", "chorus", "verse", "chorus"]
    assert [s.start for s in segments] == pytest.approx([0, 10, 20, 30], abs=1.0)


def test_short_or_gridless_input_is_one_section_or_a_fallback_grid():
    wav = render_song(SongSpec(bpm=120, key="A", scale="minor", structure=[("verse", 1)])).mean(axis=1)
    segments = _analyse(wav[:44100 * 2], None, 2.0)
    assert [(s.start, s.end, s.label) for s in segments] == [(0.0, 2.0, "verse")]
