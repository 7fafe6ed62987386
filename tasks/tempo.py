"""Tempo without weights for the rhythm stage (tasks/rhythm.py, rhythm.beat_tracker=onset).

Reads the Beat This log-mel the stage computes anyway (50 frames/s), so it costs about 1 ms
per second of audio, where Essentia's RhythmExtractor2013 costs 40-80 ms: the stage's speed
target (50x real time per core for tempo, key and structure) rules that one out as the default.
The onset envelope's autocorrelation, summed over the first multiples of a period (a comb),
finds the strongest periodicity; its multiples (1/4 .. 3 times) and the comb's other peaks are
the candidate tempi, each refined to a hundredth of a frame with 8 multiples. Which candidate is the beat is a metrical
question, answered by a conditional logit (TEMPO_WEIGHTS, fitted on bench/songgen.py's tuning
set only): the comb strength, a prior around 110 BPM, whether onsets halfway between the ticks
are as strong as those on them (the grid is too slow), whether every other tick is weak (too
fast), on the full envelope and on the bass/kick band, where the chords change (the chroma's
change curve repeats every 3 or 4 beats, not every 6 or 8), the autocorrelation at the
candidate's half, third and 2-4 multiples (the metrical levels around it), and how much of the
ticks' accents their position in a bar of 2, 3 or 4 ticks explains (a beat grid has a bar).
`bpm_confidence` maps the winner's softmax probability through TEMPO_CALIBRATION (isotonic,
out-of-fold): the probability that the BPM is within 4% of the truth, so a metrical-level guess
never gets full confidence.
"""
from __future__ import annotations

import numpy as np

FPS = 50.0
MULTIPLES = (0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0, 3.0)
SEARCH_BPM = (40.0, 250.0)      # where the strongest periodicity is looked for
CANDIDATE_BPM = (45.0, 230.0)   # where a candidate tempo may lie
LOW_BANDS = 48                  # log-mel bands read as the bass/kick band (below ~1 kHz)
MIN_PULSE = 0.3                 # comb strength below which the pulse itself is in doubt (see bench)
CHROMA_FPS = 22050 / 2048       # tasks.structure.power_frames frames
FEATURES = ("comb", "prior", "contrast", "is_peak", "ternary", "contrast_low", "alternation",
            "alternation_low", "log_tempo", "mid_ratio_low", "mid_ratio", "chords_per_tick", "chords_per_3",
            "chords_per_4", "acf_half", "acf_third", "acf_2x", "acf_3x", "acf_4x", "bar_2", "bar_3", "bar_4",
            "bar_2_low", "bar_3_low", "bar_4_low")
# bench/rhythm_fit.py on the tuning set (song_specs seeds 1-5: 480 songs; L2 0.001); refit when FEATURES change
TEMPO_WEIGHTS = np.array([1.253, -1.5374, -0.4229, 0.2265, -0.7078, 0.1192, 0.2197, 3.0354, 1.7378, -2.1968,
                          -0.2054, 2.8145, 1.7948, 1.5299, 0.0775, -0.9099, 0.9056, 0.8774, 1.2254, 0.8022,
                          -0.6072, 1.4677, -1.8538, -0.5354, -1.0508])
# (softmax probability knots, calibrated probability of being right at them)
TEMPO_CALIBRATION = ((0.0, 0.811, 0.942, 0.973, 0.985, 0.992, 0.996, 0.997, 0.999, 1.0),
                     (0.0, 0.926, 0.992, 0.992, 0.992, 0.992, 0.992, 0.992, 0.992, 0.992))


def _novelty(env: np.ndarray) -> np.ndarray:
    """Onsets above their half-second local mean, unit variance."""
    env = np.asarray(env, float)
    local = np.convolve(env, np.ones(25) / 25, mode="same")
    e = np.maximum(0.0, env - local)
    return e / (e.std() + 1e-9)


def low_band_envelope(spect: np.ndarray) -> np.ndarray:
    """Spectral flux of the lowest LOW_BANDS log-mel bands (kick, bass), frame 0 = 0."""
    low = np.asarray(spect, np.float32)[:, :LOW_BANDS]
    return np.concatenate([[0.0], np.maximum(0.0, np.diff(low, axis=0)).sum(axis=1)])


def _autocorrelation(e: np.ndarray, max_lag: int) -> np.ndarray:
    f = np.fft.rfft(e - e.mean(), 2 * len(e))
    a = np.fft.irfft(f * np.conj(f))[:max_lag + 1]
    return a / (a[0] + 1e-9)


def _comb(acf: np.ndarray, periods: np.ndarray, multiples: int = 4) -> np.ndarray:
    """Mean autocorrelation at the first `multiples` multiples of each (fractional) period."""
    lags = np.outer(np.arange(1, multiples + 1), periods)            # (K, P)
    inside = lags < len(acf) - 1
    i = np.floor(lags).astype(int).clip(0, len(acf) - 2)
    frac = lags - i
    v = (acf[i] * (1 - frac) + acf[i + 1] * frac) * inside
    return v.sum(axis=0) / np.maximum(1, inside.sum(axis=0))


def _peaks_at(e: np.ndarray, times: np.ndarray) -> np.ndarray:
    idx = np.round(times).astype(int)
    idx = idx[(idx >= 1) & (idx < len(e) - 1)]
    if not len(idx):
        return np.zeros(1)
    return np.maximum(np.maximum(e[idx - 1], e[idx]), e[idx + 1])


def _phase(e: np.ndarray, period: float) -> float:
    phases = np.arange(0, period, 0.5)
    return float(phases[int(np.argmax([_peaks_at(e, np.arange(p, len(e) - 1, period)).mean() for p in phases]))])


def _grid_evidence(e: np.ndarray, period: float, phase: float) -> tuple[float, float, float]:
    """(mean onset on the ticks, mean halfway between them, weaker/stronger of alternate ticks)."""
    on = _peaks_at(e, np.arange(phase, len(e) - 1, period))
    mid = _peaks_at(e, np.arange(phase + period / 2, len(e) - 1, period))
    if len(on) < 4:
        return float(on.mean()), float(mid.mean()), 1.0
    a, b = on[0::2].mean(), on[1::2].mean()
    return float(on.mean()), float(mid.mean()), float(min(a, b) / (max(a, b) + 1e-9))


def bar_evidence(e: np.ndarray, period: float, phase: float) -> list[float]:
    """Share of the ticks' accent variance explained by their position in a bar of 2, 3 and 4 ticks."""
    on = _peaks_at(e, np.arange(phase, len(e) - 1, period))
    shares = []
    for m in (2, 3, 4):
        n = len(on) // m * m
        shares.append(float(on[:n].reshape(-1, m).mean(axis=0).var() / (on[:n].var() + 1e-9)) if n >= 2 * m else 0.0)
    return shares


def harmonic_change(chroma: np.ndarray | None) -> np.ndarray:
    """Autocorrelation of the chord-change curve (1 - cosine of successive unit chroma frames):
    chords change on bar lines, so it peaks at the bar and tells 3 or 4 beats from 6 or 8."""
    if chroma is None or len(chroma) < 8:
        return np.zeros(2)
    unit = chroma / (np.linalg.norm(chroma, axis=1, keepdims=True) + 1e-9)
    change = np.maximum(0.0, 1.0 - (unit[1:] * unit[:-1]).sum(axis=1))
    return _autocorrelation(change, len(change) - 1)


def _at(acf: np.ndarray, lag: float) -> float:
    return float(_comb(acf, np.array([lag]), 1)[0]) if 1 <= lag < len(acf) - 1 else 0.0


def candidates(env: np.ndarray, low_env: np.ndarray, chroma: np.ndarray | None = None) -> list[dict]:
    """Candidate tempi with their evidence; each has bpm, period (frames), phase and features.
    `chroma`: (frames, 12) at CHROMA_FPS (tasks.structure.chroma), for the chord-change features."""
    e, el = _novelty(env), _novelty(low_env)
    if len(e) < 4 * FPS or not e.any():
        return []
    chords = harmonic_change(chroma)
    acf = _autocorrelation(e, int(FPS * 60 / SEARCH_BPM[0] * 8) + 2)
    periods = np.arange(FPS * 60 / SEARCH_BPM[1], FPS * 60 / SEARCH_BPM[0], 0.05)
    strength = _comb(acf, periods)
    peak = periods[int(np.argmax(strength))]
    # the strongest periodicity's multiples, and the other local maxima of the comb (a groove can
    # put its strongest period at an odd ratio to the beat, e.g. 2.5 beats)
    local = np.flatnonzero((strength[1:-1] > strength[:-2]) & (strength[1:-1] >= strength[2:])) + 1
    others = [float(periods[i]) for i in local[np.argsort(-strength[local])][:6]]
    approxes, out = [], []
    for m, approx in [(m, peak * m) for m in MULTIPLES] + [(0.0, p) for p in others]:
        if not FPS * 60 / CANDIDATE_BPM[1] <= approx <= FPS * 60 / CANDIDATE_BPM[0] \
                or any(abs(approx - a) <= 0.03 * a for a in approxes):
            continue
        approxes.append(approx)
        fine = np.arange(approx * 0.97, approx * 1.03, 0.01)
        period = float(fine[int(np.argmax(_comb(acf, fine, 8)))])
        phase = _phase(e, period)
        on, mid, alt = _grid_evidence(e, period, phase)
        on_low, mid_low, alt_low = _grid_evidence(el, period, phase)
        bpm = 60 * FPS / period
        feats = [float(_comb(acf, np.array([period]))[0]), np.log2(bpm / 110) ** 2,
                 np.log(on + 1e-3) - np.log(mid + 1e-3), float(m == 1.0),
                 float(m in (1 / 3, 2 / 3, 0.75, 4 / 3, 1.5, 3.0)),
                 np.log(on_low + 1e-3) - np.log(mid_low + 1e-3), alt, alt_low, np.log2(bpm / 110),
                 min(1.5, mid_low / (on_low + 1e-3)), min(1.5, mid / (on + 1e-3))]
        tick = period / FPS * CHROMA_FPS
        feats += [_at(chords, tick), _at(chords, 3 * tick), _at(chords, 4 * tick)]
        feats += [_at(acf, period * k) for k in (1 / 2, 1 / 3, 2, 3, 4)]
        feats += bar_evidence(e, period, phase) + bar_evidence(el, period, phase)
        out.append({"bpm": bpm, "period": period, "phase": phase, "features": np.array(feats)})
    return out


def candidate_matrix(cands: list[dict]) -> np.ndarray:
    """(candidates, FEATURES) with the comb taken relative to the best candidate's."""
    x = np.array([c["features"] for c in cands])
    x[:, 0] -= x[:, 0].max()
    return x


def tempo_probabilities(cands: list[dict], weights: np.ndarray | None = None) -> np.ndarray:
    score = candidate_matrix(cands) @ (TEMPO_WEIGHTS if weights is None else weights)
    p = np.exp(score - score.max())
    return p / p.sum()


def calibrate(p: float, table=None) -> float:
    knots, rates = table if table is not None else TEMPO_CALIBRATION
    return float(np.clip(np.interp(p, knots, rates), 0.0, 1.0))


def beat_grid(env: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Beat times (s): the tick grid, each tick moved to the strongest onset within 2 frames."""
    e = _novelty(env)
    sounding = np.flatnonzero(e > 0.5)    # no ticks in the silence before the first onset or after the last
    if not len(sounding):
        return np.array([])
    ticks = np.arange(phase, len(e) - 1, period)
    ticks = ticks[(ticks >= sounding[0] - 2) & (ticks <= sounding[-1] + 2)]
    idx = np.round(ticks).astype(int)
    snapped = [i - 2 + int(np.argmax(e[max(0, i - 2):i + 3])) if i >= 2 else i for i in idx]
    return np.asarray(snapped, float) / FPS


def estimate_tempo(env: np.ndarray, low_env: np.ndarray, chroma: np.ndarray | None = None
                   ) -> tuple[float | None, np.ndarray, float, float]:
    """(bpm or None, beat times, softmax probability, calibrated bpm_confidence)."""
    cands = candidates(env, low_env, chroma)
    if not cands:
        return None, np.array([]), 0.0, 0.0
    p = tempo_probabilities(cands)
    best = cands[int(np.argmax(p))]
    beats = beat_grid(env, best["period"], best["phase"])
    return best["bpm"], beats, float(p.max()), calibrate(float(p.max()))
