"""Song structure without weights: beat-synchronous self-similarity, checkerboard novelty,
and repetition-based section labels. Part of the rhythm stage (tasks/rhythm.py).

Features per beat (or per half second when there is no trustworthy beat grid): timbre as
the DCT of Beat This's log-mel (an MFCC without the loudness term) and harmony as a chroma
from a 4096-point STFT, stacked over two beats so the self-similarity matrix compares short
sequences rather than instants. A Gaussian-tapered checkerboard kernel slid along its
diagonal (Foote 2000) gives a novelty curve whose peaks are the boundaries. Segments are
then compared by their best-aligned diagonal in the matrix; segments that repeat form one
section: the first repeated section is the verse, the next the chorus, and unrepeated ones
are intro, bridge or outro by position.

`Segmenter` is the interface the stage calls; a learned segmenter can replace
`NoveltySegmenter` by implementing the same `segment` method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.fft import dct
from scipy.ndimage import maximum_filter1d

from tasks.beat_frontend import FPS, SAMPLE_RATE

CHROMA_FFT = 4096
CHROMA_HOP = 2048
CHROMA_FMIN, CHROMA_FMAX = 55.0, 4200.0
FALLBACK_STEP_S = 0.5


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    label: str

    def as_dict(self) -> dict:
        return {"start": round(self.start, 3), "end": round(self.end, 3), "label": self.label}


class Segmenter(Protocol):
    def segment(self, wav: np.ndarray, spect: np.ndarray, beats: np.ndarray | None,
                duration: float) -> list[Segment]:
        """wav: mono 22050 Hz; spect: (T, 128) Beat This log-mel at 50 fps; beats: trusted beat
        times or None. Returns contiguous segments covering [0, duration]."""


def power_frames(wav: np.ndarray) -> np.ndarray:
    """(T, 2049) power spectra, Hann window 4096, hop 2048 (~10.8 frames/s) at 22050 Hz."""
    if len(wav) < CHROMA_FFT:
        wav = np.pad(wav, (0, CHROMA_FFT - len(wav)))
    frames = np.lib.stride_tricks.sliding_window_view(wav, CHROMA_FFT)[::CHROMA_HOP]
    return np.abs(np.fft.rfft(frames * np.hanning(CHROMA_FFT), axis=1)) ** 2


def chroma(power: np.ndarray) -> np.ndarray:
    """(T, 12) pitch-class energy (C = 0), each FFT bin to its nearest semitone, L2-normalised."""
    hz = np.fft.rfftfreq(CHROMA_FFT, 1 / SAMPLE_RATE)
    band = (hz >= CHROMA_FMIN) & (hz <= CHROMA_FMAX)
    pc = np.round(12 * np.log2(hz[band] / 440.0) + 9).astype(int) % 12
    fold = np.zeros((band.sum(), 12))
    fold[np.arange(band.sum()), pc] = 1.0
    c = np.sqrt(power[:, band]) @ fold
    return c / (np.linalg.norm(c, axis=1, keepdims=True) + 1e-9)


def _pool(feat: np.ndarray, fps: float, edges: np.ndarray) -> np.ndarray:
    """Mean of frame features within each [edges[k], edges[k+1]) interval -> (len(edges)-1, D)."""
    idx = np.clip(np.round(edges * fps).astype(int), 0, len(feat))
    out = np.zeros((len(edges) - 1, feat.shape[1]))
    for k in range(len(edges) - 1):
        a, b = idx[k], max(idx[k + 1], idx[k] + 1)
        out[k] = feat[min(a, len(feat) - 1):b].mean(axis=0)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=0, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)


def checkerboard(half: int) -> np.ndarray:
    """(2h, 2h) Gaussian-tapered checkerboard: + on the diagonal quadrants, - off them."""
    t = np.arange(-half, half) + 0.5
    sign = np.sign(t)
    taper = np.exp(-0.5 * (t / (0.5 * half)) ** 2)
    return np.outer(sign * taper, sign * taper)


def novelty(ssm: np.ndarray, half: int) -> np.ndarray:
    """(N,) novelty at each step: the checkerboard correlated along the diagonal, >= 0."""
    n = len(ssm)
    kernel = checkerboard(half)
    padded = np.pad(ssm, half, mode="constant")
    out = np.array([np.sum(kernel * padded[i:i + 2 * half, i:i + 2 * half]) for i in range(n)])
    return np.maximum(out, 0.0) / kernel.size


def _segment_similarity(ssm: np.ndarray, a: tuple[int, int], b: tuple[int, int]) -> float:
    """Mean similarity along the best-aligned diagonal of the block between segments a and b."""
    block = ssm[a[0]:a[1], b[0]:b[1]]
    rows, cols = block.shape
    need = max(1, min(rows, cols) // 2)
    best = -1.0
    for off in range(-(rows - need), cols - need + 1):
        diag = np.diagonal(block, offset=off)
        if len(diag) >= need:
            best = max(best, float(diag.mean()))
    return best


def label_sections(ssm: np.ndarray, spans: list[tuple[int, int]], same: float) -> list[str]:
    """verse/chorus by repetition, intro/bridge/outro by position for segments that do not repeat."""
    n = len(spans)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if _segment_similarity(ssm, spans[i], spans[j]) >= same:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    repeated = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])
    names = ["verse", "chorus"] + [f"part_{chr(ord('c') + k)}" for k in range(24)]
    labels = [""] * n
    for name, group in zip(names, repeated):
        for i in group:
            labels[i] = name
    for i in range(n):
        if not labels[i]:
            labels[i] = "intro" if i == 0 and n > 1 else "outro" if i == n - 1 and n > 1 else \
                "verse" if n == 1 else "bridge"
    return labels


class NoveltySegmenter:
    def __init__(self, kernel_beats: int = 6, min_segment_beats: int = 6, same_section: float = 0.6,
                 embed_beats: int = 2):
        self.kernel_beats = kernel_beats
        self.min_segment_beats = min_segment_beats
        self.same_section = same_section
        self.embed_beats = embed_beats

    def features(self, wav: np.ndarray, spect: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """(N, D) per-step features, `embed_beats` steps stacked (time-delay embedding)."""
        mfcc = dct(spect, type=2, norm="ortho", axis=1)[:, 1:20]                    # (T, 19)
        timbre = _unit(_pool(mfcc, FPS, edges))                                      # (N, 19)
        harmony = _unit(_pool(chroma(power_frames(wav)), SAMPLE_RATE / CHROMA_HOP, edges))  # (N, 12)
        step = np.concatenate([timbre, harmony], axis=1) / np.sqrt(2)                # (N, 31)
        shifted = [np.roll(step, -k, axis=0) for k in range(self.embed_beats)]
        for k, s in enumerate(shifted):      # the last steps repeat themselves instead of wrapping
            if k:
                s[-k:] = step[-1]
        emb = np.concatenate(shifted, axis=1)                                        # (N, 31 * embed)
        return emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-9)

    def segment(self, wav: np.ndarray, spect: np.ndarray, beats: np.ndarray | None,
                duration: float) -> list[Segment]:
        if beats is not None and len(beats) >= 4 * self.kernel_beats:
            edges = np.concatenate([[0.0], np.asarray(beats, float)[np.asarray(beats) > 0.05], [duration]])
        else:
            edges = np.append(np.arange(0.0, duration, FALLBACK_STEP_S), duration)
        edges = edges[np.concatenate([[True], np.diff(edges) > 1e-3])]
        if len(edges) - 1 < 2 * self.min_segment_beats:
            return [Segment(0.0, duration, "verse")]
        feat = self.features(wav, spect, edges)
        ssm = feat @ feat.T                                                          # (N, N) cosine
        nov = novelty(ssm, self.kernel_beats)
        peak = nov == maximum_filter1d(nov, 2 * self.min_segment_beats + 1, mode="constant")
        floor = np.median(nov) + 0.5 * nov.std()
        cuts = [i for i in np.flatnonzero(peak & (nov > floor))
                if self.min_segment_beats <= i <= len(nov) - self.min_segment_beats]
        bounds = [0] + cuts + [len(edges) - 1]
        spans = list(zip(bounds[:-1], bounds[1:]))
        labels = label_sections(ssm, spans, self.same_section)
        return [Segment(float(edges[a]), float(edges[b]), lab) for (a, b), lab in zip(spans, labels)]


def boundary_f(reference: list[float], estimated: list[float], window: float = 3.0) -> float:
    """F-measure of inner boundaries (start and end excluded) matched one-to-one within `window` s."""
    from scipy.optimize import linear_sum_assignment

    ref, est = np.asarray(reference, float), np.asarray(estimated, float)
    if not len(ref) and not len(est):
        return 1.0
    if not len(ref) or not len(est):
        return 0.0
    cost = np.abs(ref[:, None] - est[None, :])
    rows, cols = linear_sum_assignment(cost)
    hits = int(np.sum(cost[rows, cols] <= window))
    if hits == 0:
        return 0.0
    p, r = hits / len(est), hits / len(ref)
    return 2 * p * r / (p + r)
