"""REPA: the cosine loss over valid frames only, pooling/alignment to the token rate, where its
gradients go (the projector and the blocks up to the configured depth, nothing later), and which
block's output a training step aligns."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from latent_shards import decoded_sample, make_track, tiny_module  # noqa: E402

from model.dit import LinearDiT  # noqa: E402
from model.repa import RepaHeads, align_to_frames, cosine_loss, pool_to_tokens  # noqa: E402
from schemas.train import DiTConfig, RepaConfig, RepaTargetConfig, load_train_config  # noqa: E402

DIT = DiTConfig(width=32, depth=4, heads=4, head_dim=8)
REPA = RepaConfig(depth=1, targets=[RepaTargetConfig(name="mert", dim=12), RepaTargetConfig(name="mhubert", dim=6)])


def test_cosine_loss_values_and_mask():
    a = torch.randn(1, 5, 7)
    mask = torch.ones(1, 5, dtype=torch.bool)
    assert cosine_loss(a, 3 * a, mask).item() < 1e-6
    torch.testing.assert_close(cosine_loss(a, -a, mask), torch.tensor(2.0))
    b = a.clone()
    b[:, 3:] = -a[:, 3:]                      # disagreement only on frames masked out
    mask[:, 3:] = False
    assert cosine_loss(a, b, mask).item() < 1e-6


def test_pool_to_tokens_averages_valid_frames_only():
    feats = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    pooled, pmask = pool_to_tokens(feats, mask, 2, 3)
    assert pooled[0, :, 0].tolist() == [0.5, 2.5, 4.0] and pmask.tolist() == [[True, True, True]]


def test_align_to_frames_keeps_a_constant_and_the_length():
    feats = torch.full((75, 4), 3.0)
    out = align_to_frames(feats, 11)
    assert out.shape == (11, 4) and torch.allclose(out, torch.full((11, 4), 3.0))


def test_repa_gradients_reach_projector_and_blocks_up_to_depth_only():
    torch.manual_seed(0)
    dit, heads = LinearDiT(DIT), RepaHeads(DIT.width, REPA)
    x, fm = torch.randn(2, 8, 16, 10), torch.ones(2, 10, dtype=torch.bool)
    _, hidden = dit(x, torch.rand(2), torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool), fm,
                    hidden_at=REPA.depth)
    targets = {"mert": (torch.randn(2, 10, 12), fm), "mhubert": (torch.randn(2, 10, 6), fm)}
    losses = heads(hidden, targets)
    assert set(losses) == {"mert", "mhubert"}
    sum(losses.values()).backward()

    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert all(touched(p) for p in heads.projectors.values())
    assert touched(dit.patch_embed) and touched(dit.t_embed)
    assert all(touched(dit.blocks[i]) for i in range(REPA.depth + 1))
    assert not any(touched(dit.blocks[i]) for i in range(REPA.depth + 1, DIT.depth))
    assert not touched(dit.out)


def test_tracks_without_features_are_left_out():
    heads = RepaHeads(32, REPA)
    hidden = torch.randn(2, 10, 32)
    no_frames = torch.zeros(2, 10, dtype=torch.bool)
    losses = heads(hidden, {"mert": (torch.randn(2, 10, 12), no_frames)})
    assert losses == {}


@pytest.mark.parametrize("depth", [1, 2])
def test_the_step_aligns_the_output_of_the_configured_block(tiny_models_dir, depth):
    """repa.depth is a 0-based block index: what the REPA heads get in a training step is the
    output of dit.blocks[depth] (read by a hook on that block), and another depth gives another loss."""
    cfg = load_train_config("tiny", [f"tiny_dir={tiny_models_dir}", f"repa.depth={depth}"])
    module, collate = tiny_module(cfg)
    batch = collate([decoded_sample(make_track(0, 12)), decoded_sample(make_track(3, 9))])
    seen = {}
    on_block = module.net.dit.blocks[depth].register_forward_hook(
        lambda mod, args, out: seen.__setitem__("block", out.detach().clone()))
    on_heads = module.repa.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("heads", args[0].detach().clone()))
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        out = module.losses(module.net, batch, t=t, generator=torch.Generator().manual_seed(0))
    on_block.remove()
    on_heads.remove()
    assert seen["heads"].shape == (2, 12, cfg.dit.width)
    torch.testing.assert_close(seen["heads"], seen["block"], rtol=0, atol=0,
                               msg=lambda m: f"the REPA heads did not get the output of block {depth}: {m}")

    other = (depth + 1) % cfg.dit.depth
    module.cfg = module.cfg.model_copy(update={"repa": module.cfg.repa.model_copy(update={"depth": other})})
    with torch.no_grad():
        moved = module.losses(module.net, batch, t=t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moved["flow"], out["flow"])     # same noise, same velocity
    for name in ("repa_mert", "repa_mhubert"):
        assert abs(moved[name] - out[name]) > 1e-4, (name, float(moved[name]), float(out[name]))


def test_the_step_pools_the_targets_over_the_dit_patch_width(tiny_models_dir):
    """With dit.patch_time=2 a token covers two latent frames: the step's REPA terms average the
    targets over each token's frames (the heads told the token width), not frame by frame."""
    cfg = load_train_config("tiny", [f"tiny_dir={tiny_models_dir}", "dit.patch_time=2"])
    module, collate = tiny_module(cfg)
    batch = collate([decoded_sample(make_track(0, 12)), decoded_sample(make_track(3, 10))])
    seen = {}
    hook = module.repa.register_forward_pre_hook(lambda mod, args: seen.__setitem__("hidden", args[0].clone()))
    with torch.no_grad():
        out = module.losses(module.net, batch, t=torch.tensor([0.3, 0.6]), generator=torch.Generator().manual_seed(0))
        hook.remove()
        assert seen["hidden"].shape[1] == 6                      # 12 frames, 2 per token
        by_token = module.repa(seen["hidden"], batch["targets"], 2)
        by_frame = module.repa(seen["hidden"], batch["targets"], 1)
    for name in ("mert", "mhubert"):
        torch.testing.assert_close(out[f"repa_{name}"], by_token[name])
        assert abs(by_token[name] - by_frame[name]) > 1e-4, name


def test_one_valid_position_and_tokens_without_frames():
    a = torch.randn(1, 4, 7)
    only_one = torch.tensor([[False, False, True, False]])
    torch.testing.assert_close(cosine_loss(a, -a, only_one), torch.tensor(2.0))   # not halved
    feats = torch.arange(6.0).view(1, 6, 1)
    pooled, pmask = pool_to_tokens(feats, torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.bool), 2, 3)
    assert pmask.tolist() == [[True, False, True]] and pooled[0, [0, 2], 0].tolist() == [0.5, 4.5]


def test_a_target_missing_or_empty_in_the_batch_does_not_hide_the_next():
    heads = RepaHeads(32, REPA)
    hidden, frames = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    assert set(heads(hidden, {"mhubert": (torch.randn(2, 10, 6), frames)})) == {"mhubert"}
    both = {"mert": (torch.randn(2, 10, 12), torch.zeros_like(frames)), "mhubert": (torch.randn(2, 10, 6), frames)}
    assert set(heads(hidden, both)) == {"mhubert"}


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_projectors_have_the_configured_number_of_layers(layers):
    heads = RepaHeads(32, REPA.model_copy(update={"projector_layers": layers}))
    for projector in heads.projectors.values():
        kinds = [type(m).__name__ for m in projector]
        assert kinds == ["Linear", "SiLU"] * (layers - 1) + ["Linear"]


def test_align_to_frames_samples_at_frame_centres_and_keeps_the_dtype():
    ramp = torch.arange(4.0).view(4, 1).expand(4, 3)                 # 4 feature frames, values 0..3
    # two latent frames cover feature frames 0-1 and 2-3: their centres sit at 0.5 and 2.5
    assert align_to_frames(ramp, 2)[:, 0].tolist() == [0.5, 2.5]
    square = torch.randn(75, 11)                                     # feature size == frame count
    assert align_to_frames(square, 11).shape == (11, 11)
    assert align_to_frames(torch.randn(75, 4, dtype=torch.float16), 11).dtype == torch.float16
