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
candidate's half, third and 2-4 multiples (the metrical levels around it), how much of the
ticks' accents their position in a bar of 2, 3 or 4 ticks explains (a beat grid has a bar), and
the same on the 1-4 kHz band where the snare speaks, plus what a bar of 6 or 8 ticks explains
beyond one of 3 or 4: a backbeat (snare on 2 and 4) read at double tempo puts the snare on every
4th tick, a bar of 8, which is how a slow song's double-time reading gives itself away (on
held-out seed 21, three of four slow breakbeat songs read at double tempo without it are right
with it; one in 3/4 is not).
`bpm_confidence` maps the winner's softmax probability through TEMPO_CALIBRATION (isotonic,
out-of-fold, one groove left out at a time): the probability that the BPM is within 4% of the
truth, so a metrical-level guess never gets full confidence.
"""
from __future__ import annotations

import numpy as np

FPS = 50.0
MULTIPLES = (0.25, 1 / 3, 0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0, 3.0)
SEARCH_BPM = (40.0, 250.0)      # where the strongest periodicity is looked for
CANDIDATE_BPM = (45.0, 230.0)   # where a candidate tempo may lie
LOW_BANDS = 48                  # log-mel bands read as the bass/kick band (below ~1 kHz)
MID_BANDS = (48, 96)            # log-mel bands read as the snare band (~1-4 kHz, above the kick, below the hats)
MIN_PULSE = 0.3                 # comb strength below which the pulse itself is in doubt (see bench)
CHROMA_FPS = 22050 / 2048       # tasks.structure.power_frames frames
FEATURES = ("comb", "prior", "contrast", "is_peak", "ternary", "contrast_low", "alternation",
            "alternation_low", "log_tempo", "mid_ratio_low", "mid_ratio", "chords_per_tick", "chords_per_3",
            "chords_per_4", "acf_half", "acf_third", "acf_2x", "acf_3x", "acf_4x", "bar_2", "bar_3", "bar_4",
            "bar_2_low", "bar_3_low", "bar_4_low", "bar_6_over_3_mid", "bar_8_over_4_mid", "bar_2_mid",
            "bar_3_mid", "bar_4_mid")
# bench/rhythm_fit.py --only tempo on the tuning set (song_specs seeds 1-6, 8, 9: 768 songs; L2 0.001);
# refit when FEATURES change
TEMPO_WEIGHTS = np.array([1.27, -1.6216, -0.5049, 0.1791, -0.7747, 0.1493, 0.5651, 2.6766, 1.8887, -1.7891,
                          -0.2914, 2.8599, 1.7844, 1.5439, 0.1187, -0.8382, 0.6596, 0.9954, 1.2864, -0.1829,
                          -0.4322, 0.3734, -1.8322, -0.3286, -1.067, 0.4746, -0.1838, 1.0645, -0.0243, 1.3937])
# (softmax probability knots, calibrated probability of being right at them; out-of-fold by groove)
TEMPO_CALIBRATION = ((0.0, 0.693, 0.892, 0.945, 0.975, 0.989, 0.995, 0.998, 0.999, 1.0),
                     (0.0, 0.727, 0.974, 0.995, 0.995, 0.995, 0.995, 0.995, 0.995, 0.995))


def _novelty(env: np.ndarray) -> np.ndarray:
    """Onsets above their half-second local mean, unit variance."""
    env = np.asarray(env, float)
    local = np.convolve(env, np.ones(25) / 25, mode="same")
    e = np.maximum(0.0, env - local)
    return e / (e.std() + 1e-9)


def low_band_envelope(spect: np.ndarray) -> np.ndarray:
    """Spectral flux of the lowest LOW_BANDS log-mel bands (kick, bass), frame 0 = 0."""
    return _band_flux(spect, 0, LOW_BANDS)


def mid_band_envelope(spect: np.ndarray) -> np.ndarray:
    """Spectral flux of the MID_BANDS log-mel bands (snare), frame 0 = 0."""
    return _band_flux(spect, *MID_BANDS)


def _band_flux(spect: np.ndarray, lo: int, hi: int) -> np.ndarray:
    band = np.asarray(spect, np.float32)[:, lo:hi]
    return np.concatenate([[0.0], np.maximum(0.0, np.diff(band, axis=0)).sum(axis=1)])


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


def bar_evidence(e: np.ndarray, period: float, phase: float, bars=(2, 3, 4)) -> list[float]:
    """Share of the ticks' accent variance explained by their position in a bar of each of `bars` ticks."""
    on = _peaks_at(e, np.arange(phase, len(e) - 1, period))
    shares = []
    for m in bars:
        n = len(on) // m * m
        shares.append(float(on[:n].reshape(-1, m).mean(axis=0).var() / (on[:n].var() + 1e-9)) if n >= 2 * m else 0.0)
    return shares


def _snare_bars(em: np.ndarray | None, period: float, phase: float) -> list[float]:
    """Snare-band bar evidence: what bars of 6 and 8 ticks explain beyond bars of 3 and 4, then
    the shares of bars of 2, 3 and 4 (zeros without the band)."""
    if em is None or not em.any():
        return [0.0] * 5
    b2, b3, b4, b6, b8 = bar_evidence(em, period, phase, (2, 3, 4, 6, 8))
    return [b6 - b3, b8 - b4, b2, b3, b4]


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


def candidates(env: np.ndarray, low_env: np.ndarray, chroma: np.ndarray | None = None,
               mid_env: np.ndarray | None = None) -> list[dict]:
    """Candidate tempi with their evidence; each has bpm, period (frames), phase and features.
    `chroma`: (frames, 12) at CHROMA_FPS (tasks.structure.chroma), for the chord-change features;
    `mid_env`: mid_band_envelope of the same log-mel (without it the snare-band features read 0)."""
    e, el = _novelty(env), _novelty(low_env)
    em = _novelty(mid_env) if mid_env is not None else None
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
        feats += _snare_bars(em, period, phase)
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


def estimate_tempo(env: np.ndarray, low_env: np.ndarray, chroma: np.ndarray | None = None,
                   mid_env: np.ndarray | None = None) -> tuple[float | None, np.ndarray, float, float]:
    """(bpm or None, beat times, softmax probability, calibrated bpm_confidence)."""
    cands = candidates(env, low_env, chroma, mid_env)
    if not cands:
        return None, np.array([]), 0.0, 0.0
    p = tempo_probabilities(cands)
    best = cands[int(np.argmax(p))]
    beats = beat_grid(env, best["period"], best["phase"])
    return best["bpm"], beats, float(p.max()), calibrate(float(p.max()))
