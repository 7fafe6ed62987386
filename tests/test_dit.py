"""The linear DiT: shapes, the linear attention against a direct N x N computation, and masks
(valid outputs do not depend on how much padding a batch carries, nor on what is in it)."""
from __future__ import annotations

import pytest
import torch

from model.dit import ConvGLU, LinearDiT, apply_rope, linear_attention, rope_tables
from schemas.train import DiTConfig

TINY = DiTConfig(width=32, depth=3, heads=4, head_dim=8, mlp_ratio=2.0, rope_theta=1e4)


def noisy_init(module, std=0.2, seed=0):
    """Zero-initialised layers would make invariance tests pass trivially: randomise everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return noisy_init(LinearDiT(TINY)).eval()


def test_shapes_and_hidden_states(dit):
    x, t = torch.randn(2, 8, 16, 19), torch.rand(2)
    cond, cond_mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    v, hidden = dit(x, t, cond, cond_mask, torch.ones(2, 19, dtype=torch.bool), hidden_at=1)
    assert v.shape == x.shape
    assert hidden.shape == (2, 19, 32)
    assert dit(x, t, cond, cond_mask, torch.ones(2, 19, dtype=torch.bool))[1] is None


def test_patch_time_two_round_trips_odd_lengths():
    model = noisy_init(LinearDiT(TINY.model_copy(update={"patch_time": 2})))
    x = torch.randn(1, 8, 16, 11)
    assert torch.equal(model.unpatchify(model.patchify(x), 11), x)
    v, hidden = model(x, torch.rand(1), torch.randn(1, 3, 32), torch.ones(1, 3, dtype=torch.bool),
                      torch.ones(1, 11, dtype=torch.bool), hidden_at=0)
    assert v.shape == x.shape and hidden.shape == (1, 6, 32)


def test_linear_attention_equals_direct_quadratic_formula():
    g = torch.Generator().manual_seed(1)
    B, H, N, d = 2, 3, 13, 8
    q, k = torch.randn(B, H, N, d, generator=g).relu(), torch.randn(B, H, N, d, generator=g).relu()
    v = torch.randn(B, H, N, d, generator=g)
    cos, sin = rope_tables(N, d, 100.0, "cpu")
    fast = linear_attention(q, k, v, cos, sin)
    # Direct: out_i = sum_j <R_i q_i, R_j k_j> v_j / sum_j <q_i, k_j>, an explicit N x N matrix.
    scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)      # (B, H, N, N)
    norm = (q @ k.transpose(-1, -2)).sum(-1, keepdim=True)                             # (B, H, N, 1)
    direct = (scores @ v) / (norm + 1e-6)
    torch.testing.assert_close(fast, direct, rtol=1e-4, atol=1e-5)


def test_rope_makes_scores_depend_on_relative_position_only():
    d = 8
    cos, sin = rope_tables(20, d, 100.0, "cpu")
    q, k = torch.randn(1, 1, 1, d).expand(1, 1, 20, d), torch.randn(1, 1, 1, d).expand(1, 1, 20, d)
    s = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)
    torch.testing.assert_close(s[0, 0, 3, 1], s[0, 0, 12, 10])      # same offset 2
    assert not torch.allclose(s[0, 0, 3, 1], s[0, 0, 3, 2])


def run_one(dit, x, t, cond, cond_mask, pad_frames=0, pad_cond=0, junk=0.0):
    """Run one item padded with `pad_frames` junk frames and `pad_cond` junk condition tokens."""
    T, L = x.shape[-1], cond.shape[1]
    xp = torch.cat([x, junk * torch.randn(1, 8, 16, pad_frames)], -1)
    fm = torch.cat([torch.ones(1, T, dtype=torch.bool), torch.zeros(1, pad_frames, dtype=torch.bool)], -1)
    cp = torch.cat([cond, junk * torch.randn(1, pad_cond, cond.shape[-1])], 1)
    cm = torch.cat([cond_mask, torch.zeros(1, pad_cond, dtype=torch.bool)], 1)
    v, h = dit(xp, t, cp, cm, fm, hidden_at=1)
    return v[..., :T], h[:, :T]


@pytest.mark.parametrize("pad_frames,pad_cond,junk", [(7, 0, 0.0), (23, 4, 0.0), (16, 9, 5.0)])
def test_valid_outputs_do_not_change_with_padding(dit, pad_frames, pad_cond, junk):
    torch.manual_seed(2)
    x, t = torch.randn(1, 8, 16, 17), torch.rand(1)
    cond, cond_mask = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        ref_v, ref_h = run_one(dit, x, t, cond, cond_mask)
        v, h = run_one(dit, x, t, cond, cond_mask, pad_frames, pad_cond, junk)
    # Float rounding only (outputs are O(10)); a leak from padding shows up as O(1) differences.
    torch.testing.assert_close(v, ref_v, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(h, ref_h, rtol=1e-3, atol=1e-4)


def test_batch_item_output_is_independent_of_its_neighbours(dit):
    """A short item batched with a long one (right-padded) gives what it gives alone."""
    torch.manual_seed(3)
    short, long_ = torch.randn(1, 8, 16, 9), torch.randn(1, 8, 16, 30)
    cond = torch.randn(2, 7, 32)
    cond_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7], dtype=torch.bool)
    x = torch.cat([torch.nn.functional.pad(short, (0, 21)), long_])
    fm = torch.zeros(2, 30, dtype=torch.bool)
    fm[0, :9], fm[1] = True, True
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v, _ = dit(x, t, cond, cond_mask, fm)
        alone, _ = dit(short, t[:1], cond[:1, :3], cond_mask[:1, :3], torch.ones(1, 9, dtype=torch.bool))
    torch.testing.assert_close(v[:1, ..., :9], alone, rtol=1e-3, atol=1e-4)


def test_conv_feed_forward_does_not_read_padding():
    ffn = noisy_init(ConvGLU(16, 24, 3), seed=4)
    x = torch.randn(1, 10, 16)
    padded = torch.cat([x, 3 * torch.randn(1, 5, 16)], 1)
    mask = torch.zeros(1, 15, dtype=torch.bool)
    mask[:, :10] = True
    alone = ffn(x, torch.ones(1, 10, dtype=torch.bool))
    torch.testing.assert_close(ffn(padded, mask)[:, :10], alone)
    # Without the mask the last valid frame would see the padding (the Sana/ACE-Step leak).
    leaky = ffn(padded, torch.ones(1, 15, dtype=torch.bool))[:, :10]
    assert not torch.allclose(leaky[:, -1], alone[:, -1], atol=1e-4)
    torch.testing.assert_close(leaky[:, :-1], alone[:, :-1])


def test_gradients_flow_to_every_parameter():
    torch.manual_seed(5)
    model = LinearDiT(TINY)
    x = torch.randn(2, 8, 16, 12)
    # Zero-initialised output and cross-attention projections: at first only the output layer has
    # gradients; after a few SGD steps every parameter must receive one.
    for _ in range(3):
        model.zero_grad()
        v, _ = model(x, torch.rand(2), torch.randn(2, 4, 32), torch.ones(2, 4, dtype=torch.bool),
                     torch.ones(2, 12, dtype=torch.bool))
        (v - x).pow(2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
