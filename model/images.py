"""Validation images: sampled and reference latents, decoded to mel by the DCAE when it is there.

`decode_for_image` is the one switch: with `validation.dcae_profile` set and the latents
stage's `tasks.latents.load_dcae` importable, latents go through the DCAE decoder to a mel
spectrogram; otherwise (or if loading fails) the latent channels themselves are drawn.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

from schemas.train import TrainConfig

log = logging.getLogger(__name__)
_NO_DCAE: set[str] = set()   # profiles whose DCAE could not be loaded (warned once)


@lru_cache(maxsize=2)
def _dcae(profile: str, device: str):
    from schemas.config import load_config
    from tasks.latents import load_dcae

    cfg = load_config(profile)
    return load_dcae(cfg.latents, cfg.models.tiny_dir, torch.device(device))


def decode_for_image(latents: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, str]:
    """(B, C, M, T) latents -> (B, H, W) images and what they show ("mel" or "latent")."""
    if cfg.validation.dcae_profile and cfg.validation.dcae_profile not in _NO_DCAE:
        try:
            dcae = _dcae(cfg.validation.dcae_profile, str(latents.device))
            with torch.no_grad():
                mel = dcae.decode(latents).float()
            return (mel[:, 0] if mel.dim() == 4 else mel), "mel"
        except (ImportError, AttributeError, RuntimeError, OSError) as exc:
            _NO_DCAE.add(cfg.validation.dcae_profile)
            log.warning("no DCAE decoder for validation images (%s); drawing latents instead", exc)
    B, C, M, T = latents.shape
    return latents.reshape(B, C * M, T), "latent"


def save_sample_images(out_dir: Path, track_ids: list[str], sampled: torch.Tensor, reference: torch.Tensor,
                       frame_mask: torch.Tensor, cfg: TrainConfig) -> list[Path]:
    """One PNG per track: the sample above the reference, cropped to the valid length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    images, kind = decode_for_image(torch.cat([sampled, reference]), cfg)
    images = images.cpu().numpy()
    B = sampled.shape[0]
    written = []
    for i, track_id in enumerate(track_ids):
        frames = int(frame_mask[i].sum())
        width = max(1, round(images.shape[-1] * frames / frame_mask.shape[1]))
        fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        for ax, img, title in ((axes[0], images[i], "sample"), (axes[1], images[B + i], "reference")):
            ax.imshow(img[:, :width], origin="lower", aspect="auto", interpolation="nearest")
            ax.set_title(f"{title} ({kind}) {track_id[:12]}")
        fig.tight_layout()
        path = out_dir / f"{track_id}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
