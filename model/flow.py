"""Flow matching: the training objective and the Euler sampler.

Convention (rectified flow, as ACE-Step): x_t = (1 - t) x0 + t noise, t = 1 is pure noise, and
the DiT predicts the velocity noise - x0. Training timesteps are logit-normal, then shifted
toward noise (t' = s t / (1 + (s - 1) t)); sampling integrates from t = 1 to 0 on the same
shifted grid with classifier-free guidance. Losses are averaged over valid frames only.
"""
from __future__ import annotations

import torch

from schemas.train import FlowConfig


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(n: int, cfg: FlowConfig, device=None, generator=None) -> torch.Tensor:
    """(n,) in (0, 1): sigmoid(N(mean, std)), shifted."""
    z = torch.randn(n, device=device, generator=generator) * cfg.logit_std + cfg.logit_mean
    return shift_time(torch.sigmoid(z), cfg.shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid frames. v (B, C, M, T), frame_mask (B, T)."""
    m = frame_mask[:, None, None, :].to(v_pred.dtype)
    err = (v_pred.float() - v_target.float()) ** 2 * m
    return err.sum() / (m.sum() * v_pred.shape[1] * v_pred.shape[2]).clamp_min(1)


@torch.no_grad()
def euler_sample(dit, noise, frame_mask, cond, cond_mask, null_cond, null_mask,
                 steps: int, shift: float, guidance: float) -> torch.Tensor:
    """Integrate the velocity field from noise (t=1) to data (t=0) with CFG.

    cond/null_cond are the condition sequences with and without conditions (same length,
    model/conditions.py); guidance 1 means no guidance (only the conditional pass runs).
    """
    ts = shift_time(torch.linspace(1.0, 0.0, steps + 1, device=noise.device), shift)
    x = noise
    B = x.shape[0]
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        if guidance == 1.0:
            v, _ = dit(x, t.expand(B), cond, cond_mask, frame_mask)
        else:
            v_both, _ = dit(torch.cat([x, x]), t.expand(2 * B), torch.cat([cond, null_cond]),
                            torch.cat([cond_mask, null_mask]), torch.cat([frame_mask, frame_mask]))
            v_cond, v_null = v_both.chunk(2)
            v = v_null + guidance * (v_cond - v_null)
        x = x + (t_next - t) * v
    return x * frame_mask[:, None, None, :].to(x.dtype)
