"""Accuracy and speed of the rhythm stage on generated songs with known answers.

Two sets: the synthetic corpus (tasks.synth.generate_corpus, its songs only) and a varied set
(tempi 60-200 BPM, all 24 keys in turn, straight and swung, 3/4 and 4/4, every timbre).
Reports BPM Acc1 (within 4%) and Acc2 (also at 1/2, 2, 1/3, 3 times), how many tracks got no
tempo, key accuracy exact and MIREX-weighted (fifth 0.5, relative 0.3, parallel 0.2), boundary
F-measure at 3 s, and the real-time factor per CPU core of each component (seconds of compute
per second of audio, one thread).

    .venv/bin/python bench/rhythm.py [--quick] [--n 48] [--tracker essentia|beat_this]
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
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from schemas.config import load_config  # noqa: E402
from tasks.rhythm import RhythmStage, file_track  # noqa: E402
from tasks.structure import boundary_f  # noqa: E402
from tasks.synth import NOTE_NAMES, STRUCTURES, TIMBRES, SongSpec, generate_corpus, pitch_class, render_song, song_truth  # noqa: E402,E501


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


def varied_specs(n: int, seed: int) -> list[SongSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        k = i % 24
        specs.append(SongSpec(bpm=round(float(rng.uniform(60, 200)), 1), key=NOTE_NAMES[k % 12],
                              scale=("major", "minor")[k // 12], structure=STRUCTURES[i % len(STRUCTURES)],
                              timbre=TIMBRES[i % len(TIMBRES)], swing=(0.0, 0.0, 1 / 3)[i % 3],
                              beats_per_bar=(4, 4, 4, 3)[i % 4], seed=seed * 1000 + i))
    return specs


def evaluate(stage: RhythmStage, items: list[tuple[Path | bytes, dict]]) -> dict:
    acc1 = acc2 = no_tempo = key_exact = meter_ok = 0
    mirex, bf, audio_s = [], [], 0.0
    stage.timings = {}
    for path, truth in items:
        row = stage.process([file_track(os.fsencode(path))])[0]
        assert row["status"] == "ok", row
        audio_s += truth["duration"]
        bpm = row["bpm"]
        if bpm is None:
            no_tempo += 1
        else:
            acc1 += abs(bpm - truth["bpm"]) <= 0.04 * truth["bpm"]
            acc2 += any(abs(bpm - f * truth["bpm"]) <= 0.04 * f * truth["bpm"] for f in (1, 2, 0.5, 3, 1 / 3))
        meter_ok += row["meter"] == truth["beats_per_bar"]
        key_exact += row["key"] is not None and pitch_class(row["key"]) == pitch_class(truth["key"]) \
            and row["scale"] == truth["scale"]
        mirex.append(mirex_key_score(row["key"], row["scale"], truth["key"], truth["scale"]))
        bf.append(boundary_f([s["start"] for s in truth["sections"][1:]],
                             [s["start"] for s in row["segments"][1:]]))
    n = len(items)
    return {"n": n, "acc1": acc1 / n, "meter": meter_ok / n, "acc2": acc2 / n, "no_tempo": no_tempo, "key_exact": key_exact / n,
            "key_mirex": float(np.mean(mirex)), "boundary_f3": float(np.mean(bf)), "audio_s": audio_s,
            "rtf": {k: v / audio_s for k, v in stage.timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 varied songs, 6-song corpus")
    ap.add_argument("--n", type=int, default=48, help="songs in the varied set")
    ap.add_argument("--corpus-n", type=int, default=12)
    ap.add_argument("--tracker", choices=["essentia", "beat_this"], default="essentia")
    ap.add_argument("--checkpoint", default="tiny:beat_this", help="Beat This checkpoint with --tracker beat_this")
    args = ap.parse_args()
    n, corpus_n = (12, 6) if args.quick else (args.n, args.corpus_n)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rhythm-"))
    cfg = load_config("tiny", [f"models.tiny_dir={tmp / 'tiny'}", f"rhythm.beat_tracker={args.tracker}",
                               f"rhythm.checkpoint={args.checkpoint}"], environ={})
    stage = RhythmStage(cfg)
    stage.setup()

    corpus = generate_corpus(tmp / "corpus", n=corpus_n, seed=0)
    root = os.fsencode(tmp / "corpus") + b"/"
    corpus_items = [(root + (bytes.fromhex(s["file_hex"]) if "file_hex" in s else s["file"].encode()), s)
                    for s in corpus["songs"] if s["kind"] == "song"]
    varied_items = []
    for i, spec in enumerate(varied_specs(n, seed=1)):
        path = tmp / f"varied-{i:03d}.wav"
        sf.write(path, render_song(spec, 44100), 44100, subtype="FLOAT")
        varied_items.append((path, song_truth(spec)))

    print(f"rhythm benchmark, tracker={args.tracker}, device={stage.device}, 1 thread")
    header = f"{'set':<10}{'n':>4}{'Acc1':>7}{'Acc2':>7}{'none':>6}{'key':>7}{'MIREX':>7}{'bF@3s':>7}{'meter':>7}"
    print(header)
    results = {}
    for name, items in (("corpus", corpus_items), ("varied", varied_items)):
        r = results[name] = evaluate(stage, items)
        print(f"{name:<10}{r['n']:>4}{r['acc1']:>7.1%}{r['acc2']:>7.1%}{r['no_tempo']:>6}"
              f"{r['key_exact']:>7.1%}{r['key_mirex']:>7.1%}{r['boundary_f3']:>7.2f}{r['meter']:>7.1%}")
    print("\nreal-time factor per CPU core (compute s / audio s), varied set:")
    for k, v in sorted(results["varied"]["rtf"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<16}{v:.4f}")
    print(f"  {'total':<16}{sum(results['varied']['rtf'].values()):.4f}")



if __name__ == "__main__":
    main()
