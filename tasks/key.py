"""Key and scale of a track for the rhythm stage (tasks/rhythm.py), with a calibrated confidence.

Measured on bench/songgen.py's songs (see bench/rhythm.py), Essentia's KeyExtractor profiles
confuse a minor key with its parallel major and its subdominant minor. This estimator scores
all 24 keys with a conditional logit over evidence a listener uses: the pitch-class profile
(Krumhansl-Kessler and Temperley correlations of the mean HPCP), the bass (HPCP under 250 Hz:
pop basses play roots, the tonic most), the first and the last seconds (songs start and
cadence on the tonic), and a chord reading of every frame (the share of frames whose triad is
diatonic to the key, counting the harmonic-minor dominant with its raised leading tone, and the
share on the tonic triad). The HPCP is Essentia's (spectral peaks, cosine weighting) without
spectral whitening: whitening lifts a saw's fifth harmonic to the level of the chord and turns
minor triads major. KEY_WEIGHTS were fitted on the tuning set only (bench/rhythm_fit.py).
`key_confidence` maps the winning key's softmax probability through KEY_CALIBRATION (isotonic,
fitted on out-of-fold tuning predictions): the probability that key and scale are right.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

SR = 44100
FRAME = 4096
FPS = SR / FRAME
NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MODES = ("major", "minor")
KK = {"major": [6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88],
      "minor": [6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17]}
TEMPERLEY = {"major": [0.748, 0.060, 0.488, 0.082, 0.670, 0.460, 0.096, 0.715, 0.104, 0.366, 0.057, 0.400],
             "minor": [0.712, 0.084, 0.474, 0.618, 0.049, 0.460, 0.105, 0.747, 0.404, 0.067, 0.133, 0.330]}
TRIAD = {"major": (0, 4, 7), "minor": (0, 3, 7)}
# Triads (root above the tonic, quality) that belong to a key; the minor key has both v and V.
DIATONIC = {"major": [(0, "M"), (2, "m"), (4, "m"), (5, "M"), (7, "M"), (9, "m")],
            "minor": [(0, "m"), (3, "M"), (5, "m"), (7, "M"), (7, "m"), (8, "M"), (10, "M")]}
FEATURES = ("kk_mean", "temperley_mean", "temperley_bass", "bass_tonic", "end_triad", "end_bass_tonic",
            "start_triad", "start_bass_tonic", "diatonic_chords", "tonic_chords", "harmonic_dominant",
            "kk_end")
# bench/rhythm_fit.py on the tuning set (song_specs seeds 1, 2, 3: 288 songs); refit when FEATURES change
KEY_WEIGHTS = np.array([1.5147, 1.3717, 0.7846, 0.673, 1.8975, 1.3034, 0.7495, 0.6599, 1.6927, 1.5339, 0.2686,
                       2.3001])
# (softmax probability knots, calibrated probability of being right at them)
KEY_CALIBRATION = ((0.0, 0.527, 0.687, 0.775, 0.827, 0.86, 0.887, 0.911, 0.949, 1.0),
                   (0.0, 0.878, 0.932, 0.959, 0.986, 0.986, 0.986, 0.986, 0.986, 0.986))
EDGE_S = 4.0                                # seconds read as "the start" and "the end"


def _profile(values, tonic: int) -> np.ndarray:
    return np.roll(np.asarray(values, float), tonic)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


class HpcpFrames:
    """Essentia HPCP per 4096-sample frame at 44.1 kHz, C = bin 0: (T, 12) full range, (T, 12) bass."""

    def __init__(self):
        import essentia.standard as es

        self.window = es.Windowing(type="hann")
        self.spectrum = es.Spectrum(size=FRAME)
        self.peaks = es.SpectralPeaks(orderBy="magnitude", magnitudeThreshold=1e-4, minFrequency=25,
                                      maxFrequency=3500, maxPeaks=60, sampleRate=SR)
        self.hpcp = es.HPCP(size=12, referenceFrequency=440, minFrequency=40, maxFrequency=3500,
                            weightType="cosine", windowSize=1.0, normalized="unitSum", sampleRate=SR)
        self.bass_peaks = es.SpectralPeaks(orderBy="magnitude", magnitudeThreshold=1e-5, minFrequency=25,
                                           maxFrequency=300, maxPeaks=20, sampleRate=SR)
        self.bass = es.HPCP(size=12, referenceFrequency=440, bandPreset=False, minFrequency=30,
                            maxFrequency=250, weightType="cosine", windowSize=1.0, sampleRate=SR)
        self.frames = es.FrameGenerator

    def __call__(self, wav44: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import essentia

        full, bass = [], []
        # The band preset with unit-sum normalization is what the weights were fitted on; Essentia
        # warns per frame that the combination is "not tested". Quiet here only, restored after.
        warnings, essentia.log.warningActive = essentia.log.warningActive, False
        try:
            for frame in self.frames(np.ascontiguousarray(wav44, np.float32), frameSize=FRAME, hopSize=FRAME,
                                     startFromZero=True):
                spec = self.spectrum(self.window(frame))
                full.append(self.hpcp(*self.peaks(spec)))
                bass.append(self.bass(*self.bass_peaks(spec)))
        finally:
            essentia.log.warningActive = warnings
        full = np.array(full).reshape(-1, 12)
        # Essentia's bin 0 is A (the reference frequency); C is three semitones above
        return np.roll(full, -3, axis=1), np.roll(np.array(bass).reshape(-1, 12), -3, axis=1)


def _chords(hpcp: np.ndarray) -> list[tuple[int, str]]:
    """The best-matching major or minor triad of each frame, as (root, "M" | "m")."""
    templates = np.zeros((24, 12))
    for i, mode in enumerate(MODES):
        for root in range(12):
            templates[i * 12 + root, [(root + q) % 12 for q in TRIAD[mode]]] = 1 / np.sqrt(3)
    unit = hpcp / (np.linalg.norm(hpcp, axis=1, keepdims=True) + 1e-9)
    best = (unit @ templates.T).argmax(axis=1)
    return [(int(b % 12), "M" if b < 12 else "m") for b in best]


def _edges(hpcp: np.ndarray, bass: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean HPCP and bass HPCP over the first and the last EDGE_S seconds that sound."""
    energy = hpcp.sum(axis=1)
    sounding = np.flatnonzero(energy > 0.2 * np.median(energy[energy > 0])) if (energy > 0).any() \
        else np.arange(len(hpcp))
    a, b = sounding[0], sounding[-1] + 1
    n = max(3, int(EDGE_S * FPS))
    return hpcp[a:a + n].mean(0), bass[a:a + n].mean(0), hpcp[max(a, b - n):b].mean(0), bass[max(a, b - n):b].mean(0)


def key_features(hpcp: np.ndarray, bass: np.ndarray) -> np.ndarray:
    """(24, len(FEATURES)) evidence for each key: rows 0-11 C..B major, 12-23 C..B minor."""
    mean, bass_mean = hpcp.mean(0), bass.mean(0)
    start, start_bass, end, end_bass = _edges(hpcp, bass)
    chords = Counter(_chords(hpcp))
    n = max(1, len(hpcp))
    x = np.zeros((24, len(FEATURES)))
    for i, mode in enumerate(MODES):
        for t in range(12):
            kk, tp = _profile(KK[mode], t), _profile(TEMPERLEY[mode], t)
            triad = np.zeros(12)
            triad[[(t + q) % 12 for q in TRIAD[mode]]] = 1 / np.sqrt(3)
            x[i * 12 + t] = [
                _corr(kk, mean), _corr(tp, mean), _corr(tp, bass_mean),
                bass_mean[t] / (bass_mean.sum() + 1e-9),
                end @ triad / (np.linalg.norm(end) + 1e-9), end_bass[t] / (end_bass.sum() + 1e-9),
                start @ triad / (np.linalg.norm(start) + 1e-9), start_bass[t] / (start_bass.sum() + 1e-9),
                sum(chords[((t + r) % 12, q)] for r, q in DIATONIC[mode]) / n,
                chords[(t, "M" if mode == "major" else "m")] / n,
                chords[((t + 7) % 12, "M")] / n * (mode == "minor"),
                _corr(kk, end)]
    return x


def key_probabilities(features: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the 24 keys of the weighted evidence."""
    score = features @ (KEY_WEIGHTS if weights is None else weights)
    p = np.exp(score - score.max())
    return p / p.sum()


def calibrate(p: float, table=None) -> float:
    """P(right) for a softmax probability, by linear interpolation in a calibration table."""
    knots, rates = table if table is not None else KEY_CALIBRATION
    return float(np.clip(np.interp(p, knots, rates), 0.0, 1.0))


def estimate_key(hpcp: np.ndarray, bass: np.ndarray) -> tuple[str, str, float, float]:
    """(key, scale, softmax probability, calibrated key_confidence)."""
    p = key_probabilities(key_features(hpcp, bass))
    k = int(np.argmax(p))
    return NOTE_NAMES[k % 12], MODES[k // 12], float(p[k]), calibrate(float(p[k]))


def key_index(key: str, scale: str) -> int:
    return MODES.index(scale) * 12 + NOTE_NAMES.index(key)
