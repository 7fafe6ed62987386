"""REPA: align a middle block's hidden states with frozen self-supervised audio features.

An MLP projector per target (MERT, mHuBERT) maps the DiT's hidden states after block
`repa.depth` to the target's feature size; the loss is 1 - cosine similarity per latent
frame, over valid frames only. Targets arrive at the latent frame rate (precomputed in the
latent shards, or `align_to_frames` for features at another rate); hidden states are never
stretched over padding (ACE-Step interpolates DiT features over the padded length first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from schemas.train import RepaConfig


class Projector(nn.Sequential):
    """layers Linear maps with SiLU between: width -> hidden -> ... -> out_dim."""

    def __init__(self, width: int, hidden: int, out_dim: int, layers: int = 3):
        dims = [width] + [hidden] * (layers - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.SiLU())
        super().__init__(*mods)


class RepaHeads(nn.Module):
    def __init__(self, width: int, cfg: RepaConfig):
        super().__init__()
        hidden = int(cfg.projector_mult * width)
        self.weights = {t.name: t.weight for t in cfg.targets}
        self.projectors = nn.ModuleDict(
            {t.name: Projector(width, hidden, t.dim, cfg.projector_layers) for t in cfg.targets})

    def forward(self, hidden: torch.Tensor, targets: dict, token_frames: int = 1) -> dict:
        """hidden (B, N, W); targets[name] = (features (B, T, d), mask (B, T) valid frames that have
        features). Returns {name: loss} for the targets present in the batch."""
        losses = {}
        for name, projector in self.projectors.items():
            if name not in targets:
                continue
            feats, mask = targets[name]
            feats, mask = pool_to_tokens(feats, mask, token_frames, hidden.shape[1])
            if not mask.any():
                continue
            losses[name] = cosine_loss(projector(hidden), feats, mask)
        return losses


def cosine_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos over masked-in positions. pred, target (B, N, d); mask (B, N)."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)   # (B, N)
    m = mask.to(cos.dtype)
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1)


def pool_to_tokens(feats, mask, token_frames: int, n_tokens: int):
    """Average frame features within each token (patch_time frames), counting valid frames only."""
    if token_frames == 1:
        return feats[:, :n_tokens], mask[:, :n_tokens]
    B, T, d = feats.shape
    pad = n_tokens * token_frames - T
    feats = F.pad(feats * mask[..., None].to(feats.dtype), (0, 0, 0, pad))
    m = F.pad(mask.to(feats.dtype), (0, pad)).view(B, n_tokens, token_frames)
    summed = feats.view(B, n_tokens, token_frames, d).sum(2)
    return summed / m.sum(-1, keepdim=True).clamp_min(1), m[..., 0] > 0


def align_to_frames(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """Features of one track (T_f, d) at any rate -> (frames, d) by linear interpolation over the
    track's own (valid) length, e.g. MERT at 75 Hz -> latent frames at 10.77 Hz."""
    if feats.shape[0] == frames:
        return feats
    x = feats.float().T[None]                                       # (1, d, T_f)
    return F.interpolate(x, size=frames, mode="linear", align_corners=False)[0].T.to(feats.dtype)
