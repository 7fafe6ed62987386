"""Accuracy, calibration and speed of the rhythm stage on generated songs with known answers.

Sets from bench/songgen.py: the tuning set (--seed, default 1: songs the key and tempo
classifiers and their calibration were fitted on, by bench/rhythm_fit.py) and one or more
held-out sets (--held-seed, default 7, with progressions, a timbre, a groove and a format the
methods never saw; seeds 7 and 11 have been looked at while the methods were built, 21 and 23 were
kept for a final measurement). Beat This's released weights are not available offline, so the
bench measures the weight-free paths: rhythm.beat_tracker=onset (default) or essentia, and the
key path; --tracker beat_this runs the tiny twin for the speed of the default path's other parts
(its accuracy means nothing).

Per set: BPM Acc1 (within 4%) and Acc2 (also at 1/2, 2, 1/3, 3 times), tracks without a tempo,
key exact overall and per mode (major, minor), MIREX-weighted key score (fifth 0.5, relative
0.3, parallel 0.2), meter; then accuracy per bin of bpm_confidence and of key_confidence (with
counts; also pooled over the held-out sets), the CPU time per audio second of each component
(one thread; the stage's timings are CPU time), and with
--key-methods every Essentia KeyExtractor profile's majors/minors/exact beside the stage's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rhythm.py [--n 48] [--seed 1] [--held-seed 7 [11 ...]]
        [--tracker onset|essentia|beat_this] [--cross-check onset|essentia|none] [--key-methods] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.songgen import song_specs, write  # noqa: E402
from schemas.config import load_config  # noqa: E402
from tasks import audio  # noqa: E402
from tasks.rhythm import RhythmStage, essentia_key, file_track  # noqa: E402
from tasks.synth import pitch_class  # noqa: E402

PROFILES = ("edma", "edmm", "bgate", "krumhansl", "temperley", "temperley2005", "shaath", "noland",
            "braw", "diatonic", "gomez", "thpcp", "tonictriad")   # weichai refuses minor keys
BINS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001)


def mirex_key_score(est_key, est_scale, key, scale) -> float:
    if est_key is None:
        return 0.0
    e, t = pitch_class(est_key), pitch_class(key)
    if (e, est_scale) == (t, scale):
        return 1.0
    if est_scale == scale and (e - t) % 12 in (5, 7):
        return 0.5
    if scale == "major" and est_scale == "minor" and (e - t) % 12 == 9:
        return 0.3
    if scale == "minor" and est_scale == "major" and (e - t) % 12 == 3:
        return 0.3
    if e == t and est_scale != scale:
        return 0.2
    return 0.0


def key_right(est_key, est_scale, truth) -> bool:
    return est_key is not None and pitch_class(est_key) == pitch_class(truth["key"]) and est_scale == truth["scale"]


def render_set(out: Path, n: int, seed: int, held_out: bool) -> list[tuple[str, dict]]:
    """Render the set into `out` (songs already there, from an earlier run with --audio, are reused)."""
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for i, song in enumerate(song_specs(n, seed, held_out)):
        done = sorted(out.glob(f"{i:03d}.*"))
        items.append((str(done[0]) if done else write(song, str(out / f"{i:03d}")), song.truth()))
    return items


def evaluate(stage: RhythmStage, items: list[tuple[str, dict]]) -> dict:
    stage.timings = {}
    rows, cpu = [], 0.0
    for path, truth in items:
        started = time.process_time()
        row = stage.process([file_track(path)])[0]
        cpu += time.process_time() - started
        assert row["status"] == "ok", row
        rows.append(row)
    t = [truth for _, truth in items]
    bpm_ok = np.array([r["bpm"] is not None and abs(r["bpm"] - x["bpm"]) <= 0.04 * x["bpm"] for r, x in zip(rows, t)])
    bpm_ok2 = np.array([r["bpm"] is not None and any(abs(r["bpm"] - f * x["bpm"]) <= 0.04 * f * x["bpm"]
                                                     for f in (1, 2, 0.5, 3, 1 / 3)) for r, x in zip(rows, t)])
    key_ok = np.array([key_right(r["key"], r["scale"], x) for r, x in zip(rows, t)])
    major = np.array([x["scale"] == "major" for x in t])
    audio_s = sum(x["duration"] for x in t)
    return {"n": len(rows), "acc1": bpm_ok.mean(), "acc2": bpm_ok2.mean(), "no_tempo": sum(r["bpm"] is None for r in rows),
            "key": key_ok.mean(), "major": key_ok[major].mean(), "minor": key_ok[~major].mean(),
            "mirex": np.mean([mirex_key_score(r["key"], r["scale"], x["key"], x["scale"]) for r, x in zip(rows, t)]),
            "meter": np.mean([r["meter"] == x["beats_per_bar"] for r, x in zip(rows, t)]),
            "bpm_conf": np.array([r["bpm_confidence"] for r in rows]), "bpm_ok": bpm_ok,
            "key_conf": np.array([r["key_confidence"] for r in rows]), "key_ok": key_ok,
            "misses": [(x["bpm"], r["bpm"], r["bpm_confidence"], x["groove"]) for r, x, ok in zip(rows, t, bpm_ok) if not ok],
            "key_misses": [(f"{x['key']} {x['scale']}", f"{r['key']} {r['scale']}", r["key_confidence"], x["progression"],
                            x["timbre"]) for r, x, ok in zip(rows, t, key_ok) if not ok],
            "rtf": {k: v / audio_s for k, v in stage.timings.items()}, "audio_s": audio_s, "cpu_rtf": cpu / audio_s}


def calibration_lines(conf: np.ndarray, ok: np.ndarray) -> list[str]:
    """Accuracy per confidence bin, with counts and the mean confidence in the bin."""
    lines = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (conf >= lo) & (conf < hi)
        if sel.any():
            lines.append(f"    [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'}  n={sel.sum():>3}  "
                         f"mean confidence {conf[sel].mean():.2f}  accuracy {ok[sel].mean():.2f}")
    brier = float(np.mean((conf - ok) ** 2))
    return lines + [f"    Brier score {brier:.3f} (always-{ok.mean():.2f} baseline {ok.mean() * (1 - ok.mean()):.3f})"]


def key_methods(items: list[tuple[str, dict]], stage_ok: np.ndarray) -> list[str]:
    """majors / minors / exact of every Essentia KeyExtractor profile, and of the stage."""
    major = np.array([t["scale"] == "major" for _, t in items])
    wavs = [audio.load_track(file_track(p), 44100, 1)[0] for p, _ in items]
    lines = []
    for name in PROFILES:
        ok = np.array([key_right(*essentia_key(w, name)[:2], t) for w, (_, t) in zip(wavs, items)])
        lines.append(f"    KeyExtractor {name:<14}{ok[major].mean():>7.2f}{ok[~major].mean():>7.2f}{ok.mean():>7.2f}")
    lines.append(f"    {'stage (evidence)':<27}{stage_ok[major].mean():>7.2f}{stage_ok[~major].mean():>7.2f}{stage_ok.mean():>7.2f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="songs per set")
    ap.add_argument("--seed", type=int, default=1, help="tuning set seed (the one the fit used)")
    ap.add_argument("--held-seed", type=int, nargs="+", default=[7], help="held-out set seeds")
    ap.add_argument("--quick", action="store_true", help="12 songs per set")
    ap.add_argument("--tracker", choices=["onset", "essentia", "beat_this"], default="onset",
                    help="beat_this runs the tiny twin: for speed only")
    ap.add_argument("--cross-check", choices=["onset", "essentia", "none"], default="onset")
    ap.add_argument("--key-methods", action="store_true", help="also score every KeyExtractor profile")
    ap.add_argument("--audio", default=None, help="folder for the rendered songs (default: a temp folder)")
    args = ap.parse_args()
    n = 12 if args.quick else args.n
    torch.set_num_threads(1)
    tmp = Path(args.audio or tempfile.mkdtemp(prefix="bench-rhythm-"))
    overrides = [f"models.tiny_dir={tmp / 'tiny'}", f"rhythm.beat_tracker={args.tracker}", "device=cpu",
                 f"rhythm.cross_check={args.cross_check}"]
    if args.tracker == "beat_this":
        overrides.append("rhythm.checkpoint=tiny:beat_this")
    cfg = load_config("tiny", overrides, environ={})
    stage = RhythmStage(cfg)
    stage.setup()
    sets = {"tuning": render_set(tmp / f"tuning-{args.seed}", n, args.seed, False)}
    sets.update({f"held-{h}": render_set(tmp / f"held-{h}", n, h, True) for h in args.held_seed})
    print(f"rhythm benchmark: tracker={args.tracker}, cross_check={args.cross_check}, key_method="
          f"{cfg.rhythm.key_method}, 1 thread; tuning seed {args.seed}, held-out seeds {args.held_seed}, {n} songs each")
    print(f"{'set':<10}{'n':>4}{'Acc1':>7}{'Acc2':>7}{'none':>6}{'key':>7}{'major':>7}{'minor':>7}{'MIREX':>7}{'meter':>7}")
    results = {}
    for name, items in sets.items():
        r = results[name] = evaluate(stage, items)
        print(f"{name:<10}{r['n']:>4}{r['acc1']:>7.1%}{r['acc2']:>7.1%}{r['no_tempo']:>6}{r['key']:>7.1%}"
              f"{r['major']:>7.1%}{r['minor']:>7.1%}{r['mirex']:>7.1%}{r['meter']:>7.1%}")
    held = [r for name, r in results.items() if name != "tuning"]
    if len(held) > 1:
        results["held-out pooled"] = {k: np.concatenate([r[k] for r in held]) for k in
                                      ("bpm_conf", "bpm_ok", "key_conf", "key_ok")} | {"misses": [], "key_misses": []}
    for name, r in results.items():
        print(f"\n{name}: tempo accuracy (Acc1) per bpm_confidence bin")
        print("\n".join(calibration_lines(r["bpm_conf"], r["bpm_ok"])))
        print(f"{name}: key accuracy (exact) per key_confidence bin")
        print("\n".join(calibration_lines(r["key_conf"], r["key_ok"])))
        for miss in r["misses"]:
            print(f"    tempo miss: truth {miss[0]}, got {miss[1]} (confidence {miss[2]}), groove {miss[3]}")
        for miss in r["key_misses"]:
            print(f"    key miss: truth {miss[0]}, got {miss[1]} (confidence {miss[2]}), {miss[3]}, {miss[4]}")
    if args.key_methods:
        for name, items in sets.items():
            print(f"\n{name}: key method{'':<21}{'major':>7}{'minor':>7}{'exact':>7}")
            print("\n".join(key_methods(items, results[name]["key_ok"])))
    rtf = results["tuning"]["rtf"]
    cpu = results["tuning"]["cpu_rtf"]
    print(f"\nwhole stage (decoding included), CPU time of this process (one thread) / audio s: {cpu:.4f} = "
          f"{1 / max(cpu, 1e-9):.0f}x real time per core")
    print("CPU time per component / audio s (one thread), tuning set:")
    for k, v in sorted(rtf.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<16}{v:.4f}")
    analysis = sum(v for k, v in rtf.items() if k in ("tempo", "key", "structure"))
    front = analysis + rtf.get("frontend", 0.0)
    print(f"  tempo+key+structure {analysis:.4f} = {1 / max(analysis, 1e-9):.0f}x real time per core; with the "
          f"log-mel front end {front:.4f} = {1 / max(front, 1e-9):.0f}x; with decoding too "
          f"{front + rtf.get('load', 0.0):.4f} = {1 / max(front + rtf.get('load', 0.0), 1e-9):.0f}x"
          + ("  (Beat This itself not counted)" if args.tracker == "beat_this" else ""))


if __name__ == "__main__":
    main()
