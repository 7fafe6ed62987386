"""Fit the key and tempo classifiers' weights and calibration tables (tasks/key.py, tasks/tempo.py)
on bench/songgen.py's tuning set only, and print them as Python to paste into those modules.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rhythm_fit.py [--n 96] [--seeds 1 2 3 4 5] [--audio DIR]
        [--only key|tempo]

The tuning set is song_specs(n, seed) for each seed (never held_out=True, never bench/rhythm.py's
--held-seed); with --audio DIR the songs are written to (or reused from) DIR/tuning-SEED/.

Weights: maximum likelihood of a conditional logit (softmax over the 24 keys, or over the
candidate tempi, where any candidate within 4% of the truth counts as right), L2 0.01 for the key
and 0.001 for the tempo (chosen by leave-one-groove-out cross-validation on seeds 1-3: 0.979
against 0.962 at 0.01 and 0.865 at 0.1; a groove the fit never heard is the held-out risk; on
seeds 1-5 with the metrical-level features 1e-4..1e-3 score alike, 0.958-0.965, so it stayed;
with the snare-band features on seeds 1-6, 8, 9: 0.961 at 3e-4, 0.964 at 1e-3 and 3e-3).
The key was fitted on seeds 1-3, the tempo on seeds 1 2 3 4 5 6 8 9 (--only tempo; 7 is left out
because its rng draws repeat held-out seed 7's tempi).
Calibration: isotonic regression of "right" on the winner's softmax probability, fitted on
out-of-fold probabilities so the table is not flattered by the fit itself: 4 folds for the key,
one fold per groove left out for the tempo (a groove the fit never heard is the held-out risk, and
those probabilities are the ones that shrink a double-time guess on an unheard groove).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from bench.songgen import song_specs, write  # noqa: E402
from tasks import audio, key, tempo  # noqa: E402
from tasks.beat_frontend import LogMelSpect, onset_envelope  # noqa: E402
from tasks.rhythm import file_track  # noqa: E402
from tasks.structure import chroma, power_frames  # noqa: E402


def song_evidence(path: str, hpcp_frames: key.HpcpFrames, frontend: LogMelSpect, only: str | None = None
                  ) -> tuple[np.ndarray | None, list[dict]]:
    """(key features (24, F), tempo candidates) of one file, read by the stage's loader."""
    track = file_track(path)
    wav44 = audio.load_track(track, key.SR, 1)[0] if only != "tempo" else None
    wav22 = audio.load_track(track, 22050, 1)[0]
    with torch.inference_mode():
        spect = frontend(torch.from_numpy(wav22)).numpy()
    return key.key_features(*hpcp_frames(wav44)) if wav44 is not None else None, tempo.candidates(
        onset_envelope(spect), tempo.low_band_envelope(spect), chroma(power_frames(wav22)),
        tempo.mid_band_envelope(spect))


def _nll(w, xs, rights, l2=1e-2):
    loss, grad = 0.0, np.zeros_like(w)
    for x, right in zip(xs, rights):
        s = x @ w
        p = np.exp(s - s.max())
        p /= p.sum()
        p_right = p[right].sum()
        loss -= np.log(p_right + 1e-12)
        grad -= p[right] @ x[right] / (p_right + 1e-12) - p @ x
    return loss / len(xs) + l2 * w @ w, grad / len(xs) + 2 * l2 * w


L2 = {"KEY": 1e-2, "TEMPO": 1e-3}


def fit_logit(xs: list[np.ndarray], rights: list[np.ndarray], l2: float = 1e-2) -> np.ndarray:
    return minimize(_nll, np.zeros(xs[0].shape[1]), args=(xs, rights, l2), jac=True, method="L-BFGS-B").x


def out_of_fold(xs, rights, l2: float = 1e-2, folds: int = 4, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(winner's softmax probability, winner right) per song, each from weights fitted without it:
    4 folds by index, or with `groups` (one label per song) one fold per group left out."""
    probs, ok = np.zeros(len(xs)), np.zeros(len(xs), bool)
    idx = np.arange(len(xs))
    fold = idx % folds if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    for k in np.unique(fold):
        w = fit_logit([xs[i] for i in idx if fold[i] != k], [rights[i] for i in idx if fold[i] != k], l2)
        for i in idx[fold == k]:
            s = xs[i] @ w
            p = np.exp(s - s.max())
            p /= p.sum()
            probs[i], ok[i] = p.max(), rights[i][int(np.argmax(p))]
    return probs, ok


def calibration_table(probs: np.ndarray, ok: np.ndarray, bins: int = 8) -> tuple[tuple, tuple]:
    """Knots at the mean probability of each of `bins` equal-count bins; the rate there is
    (right + 0.5) / (n + 1) (Jeffreys: a bin of 36 right answers says 0.986, not certainty), made
    non-decreasing by isotonic regression weighted by the counts."""
    from sklearn.isotonic import IsotonicRegression

    order = np.argsort(probs)
    groups = [g for g in np.array_split(order, bins) if len(g)]
    xs = np.array([probs[g].mean() for g in groups])
    rates = np.array([(ok[g].sum() + 0.5) / (len(g) + 1) for g in groups])
    ys = IsotonicRegression(y_min=0.0, y_max=1.0).fit(xs, rates, sample_weight=[len(g) for g in groups]).predict(xs)
    knots = (0.0, *[round(float(x), 3) for x in xs], 1.0)
    values = (0.0, *[round(float(y), 3) for y in ys], round(float(ys[-1]), 3))
    return knots, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--only", choices=["key", "tempo"], default=None, help="fit one classifier only")
    ap.add_argument("--audio", default=None, help="write (or reuse) the tuning songs here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.audio or tempfile.mkdtemp(prefix="rhythm-fit-"))
    out.mkdir(parents=True, exist_ok=True)
    hpcp_frames, frontend = key.HpcpFrames(), LogMelSpect()
    key_x, key_right, tempo_x, tempo_right, grooves = [], [], [], [], []
    songs = [(out / f"tuning-{seed}", i, song) for seed in args.seeds for i, song in enumerate(song_specs(args.n, seed))]
    for folder, i, song in songs:
        folder.mkdir(exist_ok=True)
        existing = sorted(folder.glob(f"{i:03d}.*"))
        path = str(existing[0]) if existing else write(song, str(folder / f"{i:03d}"))
        kx, cands = song_evidence(path, hpcp_frames, frontend, args.only)
        key_x.append(kx)
        key_right.append(np.arange(24) == key.key_index(song.key, song.scale))
        tempo_x.append(tempo.candidate_matrix(cands))
        tempo_right.append(np.array([abs(c["bpm"] - song.bpm) <= 0.04 * song.bpm for c in cands]))
        grooves.append(song.groove)
    for name, xs, rights in (("KEY", key_x, key_right), ("TEMPO", tempo_x, tempo_right)):
        if args.only and name != args.only.upper():
            continue
        w = fit_logit(xs, rights, L2[name])
        probs, ok = out_of_fold(xs, rights, L2[name], groups=grooves if name == "TEMPO" else None)
        print(f"# {name}: out-of-fold accuracy {ok.mean():.3f} on {len(xs)} tuning songs (seeds {args.seeds})")
        print(f"{name}_WEIGHTS = np.array({[round(float(v), 4) for v in w]})")
        print(f"{name}_CALIBRATION = {calibration_table(probs, ok)}")


if __name__ == "__main__":
    main()
