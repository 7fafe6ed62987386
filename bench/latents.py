"""Benchmark of the latents stage: seconds of audio encoded per second of wall time.

1. The log-mel front end alone (44.1 kHz stereo, ACE-Step's vocoder mel).
2. DCAE encode (mel + AutoencoderDC encoder + scaling) with the tiny twin, by batch size.
3. The stage's batch function (tasks/latents_batch.encode_batch: DCAE + MERT/mHuBERT twins).
4. With --real-size: the released music_dcae_f8c8 architecture with random weights (encode and
   decode), for a GPU (--device cuda, --dtype bfloat16); on a CPU keep --seconds small.

    python bench/latents.py [--seconds 30] [--tracks 4] [--real-size] [--device cpu|cuda] [--dtype float32]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.config import load_config  # noqa: E402
from tasks.latents_batch import encode_batch, encoders  # noqa: E402
from tasks.latents_models import MusicDCAE, real_dcae_config  # noqa: E402

SR = 44100


def song(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    chord = [sum(np.sin(2 * np.pi * f * (1 + 0.01 * c) * t) for f in (220.0, 277.2, 329.6)) / 4 for c in (0, 1)]
    return (np.stack(chord) + 0.02 * rng.standard_normal((2, t.size))).astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, device, repeats: int) -> float:
    fn()                                          # warm-up: kernels, allocator, caches
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def row(label: str, audio_s: float, secs: float) -> None:
    print(f"{label:<44} {audio_s:8.1f} s audio  {secs:8.3f} s  {audio_s / secs:9.1f} x real time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each synthetic track")
    ap.add_argument("--tracks", type=int, default=4, help="tracks per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--real-size", action="store_true", help="also the released f8c8 architecture")
    ap.add_argument("--tiny-dir", default=None, help="where the tiny twins are (built if missing)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    tiny_dir = args.tiny_dir or tempfile.mkdtemp(prefix="tiny-models-")
    cfg = load_config("tiny", [f"models.tiny_dir={tiny_dir}", f"device={args.device}",
                               f"latents.compute_dtype={args.dtype}"], environ={})
    tracks = [song(args.seconds, i) for i in range(args.tracks)]
    audio = torch.from_numpy(np.stack(tracks)).to(device)                       # (B, 2, L)
    total = args.seconds * args.tracks
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {args.tracks} tracks x {args.seconds:g} s\n")

    dcae, ssl = encoders(cfg)
    mel = dcae.mel.to(device)
    row("log-mel front end", total, best_of(lambda: mel(audio), device, args.repeats))
    for b in sorted({1, args.tracks}):
        secs = best_of(lambda: dcae.encode_audio(audio[:b]), device, args.repeats)
        row(f"DCAE encode, tiny twin, batch {b}", args.seconds * b, secs)
    z = dcae.encode_audio(audio)
    row("DCAE decode to mel, tiny twin", total, best_of(lambda: dcae.decode(z), device, args.repeats))
    decoded = [{"track_id": f"t{i}", "audio": a, "meta": {}, "audio_sha": ""} for i, a in enumerate(tracks)]
    secs = best_of(lambda: encode_batch(dcae, ssl, decoded, cfg), device, args.repeats)
    row(f"batch function: DCAE + {' + '.join(e.name for e in ssl)} twins", total, secs)

    if args.real_size:
        from diffusers import AutoencoderDC
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()   # the cast below is what we measure, not a mistake
        dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
        model = AutoencoderDC(**real_dcae_config()).to(device, dtype).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        real = MusicDCAE(model, cfg.latents, "random f8c8", "bench").to(device)
        print(f"\nreleased f8c8 architecture, random weights: {params:.1f} M parameters, {dtype}")
        for b in sorted({1, args.tracks}):
            secs = best_of(lambda: real.encode_audio(audio[:b]), device, args.repeats)
            row(f"DCAE encode, f8c8 size, batch {b}", args.seconds * b, secs)
        zr = real.encode_audio(audio)
        row("DCAE decode to mel, f8c8 size", total, best_of(lambda: real.decode(zr), device, args.repeats))
        if device.type == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
