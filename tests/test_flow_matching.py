"""Flow matching: timestep sampling, the path and its velocity, the masked loss, and the Euler
sampler with classifier-free guidance (exact on a field whose answer is known)."""
from __future__ import annotations

import torch

from model.flow import euler_sample, flow_loss, interpolate, sample_timesteps, shift_time, velocity_target
from schemas.train import FlowConfig


def test_shift_keeps_the_ends_and_moves_time_toward_noise():
    t = torch.linspace(0, 1, 11)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:-1] > t[1:-1]) and torch.all(torch.diff(s) > 0)
    torch.testing.assert_close(shift_time(t, 1.0), t)


def test_logit_normal_timesteps_with_shift():
    g = torch.Generator().manual_seed(0)
    plain = sample_timesteps(20000, FlowConfig(shift=1.0), generator=g)
    shifted = sample_timesteps(20000, FlowConfig(shift=3.0), generator=g)
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.median().item() - 0.5) < 0.02          # logit-normal(0, 1) is centred
    assert abs(shifted.median().item() - 0.75) < 0.02       # 3 * 0.5 / (1 + 2 * 0.5)


def test_path_ends_and_velocity_is_its_time_derivative():
    x0, noise = torch.randn(2, 8, 16, 5), torch.randn(2, 8, 16, 5)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    t, dt = torch.full((2,), 0.4), 1e-3
    numeric = (interpolate(x0, noise, t + dt) - interpolate(x0, noise, t)) / dt
    torch.testing.assert_close(numeric, velocity_target(x0, noise), rtol=1e-2, atol=1e-2)


def test_loss_ignores_padded_frames():
    v, target = torch.zeros(1, 8, 16, 10), torch.ones(1, 8, 16, 10)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, :6] = True
    target[..., 6:] = 1000.0
    assert flow_loss(v, target, mask).item() == 1.0


class PointMassField:
    """The exact velocity toward a single data point c: v(x, t) = (x - c) / t; the unconditional
    half of a CFG batch (second half) points at c_null instead."""

    def __init__(self, c, c_null):
        self.c, self.c_null = c, c_null

    def __call__(self, x, t, cond, cond_mask, frame_mask):
        B = x.shape[0]
        target = self.c if B == self.c.shape[0] else torch.cat([self.c, self.c_null])
        return (x - target) / t.view(-1, 1, 1, 1), None


def test_euler_lands_on_the_data_point_and_guidance_extrapolates():
    c, c_null = torch.full((1, 8, 16, 4), 2.0), torch.full((1, 8, 16, 4), 0.5)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cond = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    noise = torch.randn(1, 8, 16, 4)
    field = PointMassField(c, c_null)
    plain = euler_sample(field, noise, mask, *cond, *cond, steps=5, shift=3.0, guidance=1.0)
    torch.testing.assert_close(plain, c)
    guided = euler_sample(field, noise, mask, *cond, *cond, steps=5, shift=3.0, guidance=3.0)
    torch.testing.assert_close(guided, c_null + 3.0 * (c - c_null))


def test_samples_are_zero_on_padded_frames():
    field = PointMassField(torch.ones(1, 8, 16, 6), torch.ones(1, 8, 16, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    cond = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    out = euler_sample(field, torch.randn(1, 8, 16, 6), mask, *cond, *cond, steps=3, shift=1.0, guidance=1.0)
    assert torch.all(out[..., 4:] == 0) and torch.allclose(out[..., :4], torch.ones(1, 8, 16, 4))


def test_loss_is_the_mean_squared_velocity_error_per_valid_value():
    """Known answers: prediction 3 against target 1 everywhere is an error of 4 whatever the
    shape, down to a single valid value; no valid frame at all is a loss of 0, not a NaN."""
    v, target = torch.full((2, 8, 16, 5), 3.0), torch.ones(2, 8, 16, 5)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    assert flow_loss(v, target, mask).item() == 4.0
    assert flow_loss(v[:1, :1, :1, :1], target[:1, :1, :1, :1], mask[:1, :1]).item() == 4.0
    assert flow_loss(v, target, torch.zeros(2, 5, dtype=torch.bool)).item() == 0.0


def test_timestep_logits_follow_the_configured_mean_and_spread():
    t = sample_timesteps(20000, FlowConfig(logit_mean=1.0, logit_std=0.5, shift=1.0),
                         generator=torch.Generator().manual_seed(1))
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item() - 1.0) < 0.02 and abs(logits.std().item() - 0.5) < 0.02


def test_a_seeded_generator_draws_the_same_timesteps():
    cfg = FlowConfig()
    first = sample_timesteps(6, cfg, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)      # the global random state plays no part
    again = sample_timesteps(6, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, sample_timesteps(6, cfg, generator=torch.Generator().manual_seed(6)))
