"""How far a lower compute dtype moves the latents stage's outputs from float32.

latents.compute_dtype is float32 by default, as ACE-Step encodes; this measures what bfloat16 (or
float16) would change, per model: the DCAE twin, the released f8c8 architecture with random
weights, and the MERT / mHuBERT twins' REPA features. Printed per model: relative L2 error
||x_low - x_32|| / ||x_32||, max abs error, max |x_32|, and for scale the relative error of the
float16 storage rounding every latent goes through anyway.

    python bench/latents_dtype.py [--seconds 3] [--dtype bfloat16] [--device cpu|cuda] [--no-real-size]

A CPU runs bfloat16 forwards (slowly); keep --seconds small there.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latents import song  # noqa: E402
from schemas.config import load_config  # noqa: E402
from tasks.latents_models import MusicDCAE, SslEncoder, load_dcae, load_ssl, real_dcae_config  # noqa: E402

SR = 44100


def errors(low: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    low, ref = low.double(), ref.double()
    return (float((low - ref).norm() / ref.norm()), float((low - ref).abs().max()), float(ref.abs().max()))


def row(label: str, low: torch.Tensor, ref: torch.Tensor) -> None:
    rel, max_abs, scale = errors(low, ref)
    storage, _, _ = errors(ref.half().float(), ref)
    print(f"{label:<40} {rel:10.2e} {max_abs:10.2e} {scale:9.3f} {storage:12.2e}")


def dcae_in(dcae: MusicDCAE, dtype: torch.dtype, device: torch.device) -> MusicDCAE:
    return MusicDCAE(copy.deepcopy(dcae.dcae).to(device, dtype), dcae.cfg, dcae.encoder_id, dcae.revision).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the synthetic track")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-real-size", action="store_true", help="skip the released-size DCAE")
    ap.add_argument("--tiny-dir", default=None, help="where the tiny twins are (built if missing)")
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # the cast to a low dtype is what we measure
    torch.set_grad_enabled(False)
    device, low = torch.device(args.device), getattr(torch, args.dtype)
    tiny_dir = args.tiny_dir or tempfile.mkdtemp(prefix="tiny-models-")
    cfg = load_config("tiny", [f"models.tiny_dir={tiny_dir}", "device=cpu"], environ={})
    audio = torch.from_numpy(song(args.seconds, 0))[None].to(device)                  # (1, 2, L)
    print(f"{args.dtype} vs float32 on {device}, {args.seconds:g} s of audio\n")
    print(f"{'output':<40} {'rel L2':>10} {'max abs':>10} {'max |x|':>9} {'fp16 store':>12}")

    twin = load_dcae(cfg.latents, tiny_dir, "cpu")
    ref = dcae_in(twin, torch.float32, device).encode_audio(audio)
    row("latents, DCAE twin", dcae_in(twin, low, device).encode_audio(audio), ref)
    if not args.no_real_size:
        from diffusers import AutoencoderDC

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoencoderDC(**real_dcae_config()).eval()
        real = MusicDCAE(model, cfg.latents, "random f8c8", "bench")
        ref = dcae_in(real, torch.float32, device).encode_audio(audio)
        row("latents, f8c8 size, random weights", dcae_in(real, low, device).encode_audio(audio), ref)

    mono = audio[0].mean(0).cpu().numpy()
    import soxr

    for name in ("mert", "mhubert"):
        enc = load_ssl(name, getattr(cfg.latents, name), tiny_dir, "cpu")
        wav = np.ascontiguousarray(soxr.resample(mono, SR, enc.sample_rate, quality="HQ"), dtype=np.float32)
        feats = {d: SslEncoder(name, copy.deepcopy(enc.model).to(device, d), enc.extractor, enc.cfg,
                               enc.encoder_id).features([wav])[0] for d in (torch.float32, low)}
        row(f"REPA features, {name} twin", feats[low], feats[torch.float32])


if __name__ == "__main__":
    main()
