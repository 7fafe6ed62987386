"""The Lightning module (model/lit.py) one call at a time, with the tiny twins and no trainer: the
loss a step minimises (flow plus weighted REPA terms), which condition each dropout rate drops,
validation on the EMA weights at fixed timesteps, guided sampling, the optimiser and its schedule."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from latent_shards import decoded_sample, make_track, tiny_module  # noqa: E402

from model.flow import euler_sample  # noqa: E402
from schemas.train import load_train_config  # noqa: E402

TRACKS = [(0, 12), (3, 9)]     # make_track(i, frames): one with lyrics, one instrumental


@pytest.fixture
def build(tiny_models_dir):
    """The tiny module of a config (overrides on the tiny profile) and a padded batch of two tracks."""
    def make(*overrides, drop=()):
        cfg = load_train_config("tiny", [f"tiny_dir={tiny_models_dir}", *overrides])
        module, collate = tiny_module(cfg)
        tracks = [make_track(i, n) for i, n in TRACKS]
        for track in tracks:
            for name in drop:
                track.pop(name)
        return module, collate([decoded_sample(t) for t in tracks])
    return make


def fixed_losses(module, batch, net=None, seed=0):
    with torch.no_grad():
        return module.losses(net or module.net, batch, t=torch.tensor([0.3, 0.7]),
                             generator=torch.Generator().manual_seed(seed))


def logged(module) -> dict:
    """What the module logs, without a trainer."""
    seen = {}
    module.log_dict = lambda values, **kw: seen.update({k: float(v) for k, v in values.items()})
    return seen


def test_the_loss_is_flow_plus_each_repa_term_times_its_weight(build):
    module, batch = build("repa.targets=[{name: mert, dim: null, weight: 2.0},"
                          " {name: mhubert, dim: null, weight: 0.5}]")
    out = fixed_losses(module, batch)
    assert set(out) == {"flow", "repa_mert", "repa_mhubert", "loss"}
    assert all(0 < float(out[k]) < 10 for k in ("flow", "repa_mert", "repa_mhubert"))
    expected = out["flow"] + 2.0 * out["repa_mert"] + 0.5 * out["repa_mhubert"]
    torch.testing.assert_close(out["loss"], expected)


def test_a_batch_without_a_target_skips_its_term_but_still_reaches_its_projector(build):
    """No MERT features in the batch: no repa_mert term, the loss is flow + mhubert, and the MERT
    projector still takes part in the graph with a zero gradient (so DDP sees every parameter used)."""
    module, batch = build(drop=("mert",))
    out = module.losses(module.net, batch, t=torch.tensor([0.3, 0.7]), generator=torch.Generator().manual_seed(0))
    assert set(out) == {"flow", "repa_mhubert", "loss"}
    torch.testing.assert_close(out["loss"], out["flow"] + out["repa_mhubert"])
    out["loss"].backward()
    mert = list(module.repa.projectors["mert"].parameters())
    assert all(p.grad is not None and not p.grad.any() for p in mert)
    assert any(p.grad.abs().sum() > 0 for p in module.repa.projectors["mhubert"].parameters())


def test_a_seeded_generator_makes_the_loss_reproducible(build):
    """Timesteps and noise both come from the generator: the same seed gives the same loss
    whatever the global random state, another seed another loss."""
    module, batch = build()

    def loss(seed, global_seed):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return float(module.losses(module.net, batch, generator=torch.Generator().manual_seed(seed))["loss"])

    assert loss(3, 0) == loss(3, 1)
    assert loss(3, 0) != loss(4, 0)


def test_without_repa_the_loss_is_the_flow_loss(build):
    module, batch = build("repa.enabled=false")
    assert module.repa is None
    out = fixed_losses(module, batch)
    assert set(out) == {"flow", "loss"} and torch.equal(out["loss"], out["flow"])
    # the same noise and timesteps with REPA on give the same flow term (REPA only adds terms)
    with_repa, batch = build()
    with_repa.net.load_state_dict(module.net.state_dict())
    torch.testing.assert_close(fixed_losses(with_repa, batch)["flow"], out["flow"])


@pytest.mark.parametrize("condition,field", [("text", "prompt"), ("lyric", "lyric_ids"), ("speaker", "speaker")])
def test_each_dropout_rate_drops_its_own_condition(build, condition, field):
    """With a condition's dropout at 1 a training step cannot see it (changing it changes no loss);
    at 0, with the other two dropped, it can."""
    others = [c for c in ("text", "lyric", "speaker") if c != condition]
    changed = {"prompt": lambda b: ["a completely different prompt"] * len(b["prompt"]),
               "lyric_ids": lambda b: torch.where(b["lyric_mask"], b["lyric_ids"].roll(1, dims=1), b["lyric_ids"]),
               "speaker": lambda b: torch.randn_like(b["speaker"]) * 3}[field]

    def step_losses(module, batch):
        logs = logged(module)
        out = []
        for b in (batch, {**batch, field: changed(batch)}):
            torch.manual_seed(0)
            with torch.no_grad():
                out.append(float(module.training_step(b, 0)))
        assert logs["train/loss"] == out[-1] and "train/flow" in logs
        return out

    dropped, batch = build(f"conditions.{condition}_dropout=1.0",
                           *[f"conditions.{c}_dropout=0.0" for c in others])
    same, again = step_losses(dropped, batch)
    assert same == pytest.approx(again, rel=1e-6)     # float rounding only
    kept, batch = build(f"conditions.{condition}_dropout=0.0", *[f"conditions.{c}_dropout=1.0" for c in others])
    seen, moved = step_losses(kept, batch)
    assert abs(seen - moved) > 1e-4 * abs(seen), (seen, moved)


def test_validation_scores_the_ema_weights_at_evenly_spread_timesteps(build):
    module, batch = build()
    logs = logged(module)
    module.validation_step(batch, 0)
    first = dict(logs)
    # what validation documents: t = 0.25, 0.75 for two tracks, noise seeded 1234 + batch index
    ema = module.ema.module
    expected = module.losses(ema, batch, t=torch.tensor([0.25, 0.75]), generator=torch.Generator().manual_seed(1234))
    assert set(first) == {f"val/{k}" for k in expected}
    for k, v in expected.items():
        assert first[f"val/{k}"] == pytest.approx(float(v), rel=1e-5)
    module.validation_step(batch, 1)
    assert logs["val/flow"] != pytest.approx(first["val/flow"])    # another batch index, other noise

    with torch.no_grad():                       # training moves `net`; validation reads the EMA
        for p in module.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.validation_step(batch, 0)
    assert logs == first


def test_each_optimiser_step_moves_the_ema_by_its_decay(build):
    """EMA with decay d: the first step copies the weights, each later one e <- d * e + (1 - d) * w.
    Here every step adds 1 to every weight, so after three steps e = w0 + 1 + 0.1 + 0.19."""
    module, _ = build("optim.ema_decay=0.9")
    start = {n: p.detach().clone() for n, p in module.net.named_parameters()}

    class AddOne:                        # stands in for AdamW: a step with a known effect
        def step(self, closure=None):
            with torch.no_grad():
                for p in module.net.parameters():
                    p.add_(1.0)

    for step in range(3):
        module.optimizer_step(0, step, AddOne(), None)
    averaged = dict(module.ema.module.named_parameters())
    assert averaged.keys() == start.keys() and int(module.ema.n_averaged) == 3
    for name, w0 in start.items():
        torch.testing.assert_close(averaged[name], w0 + 1.29, msg=lambda m: f"{name}: {m}")
        assert not averaged[name].requires_grad        # the average is never trained itself


def test_without_ema_validation_and_sampling_use_the_trained_weights(build):
    module, batch = build("optim.ema_decay=0")
    assert module.ema is None and module.sampling_net() is module.net
    logs = logged(module)
    module.validation_step(batch, 0)
    before = dict(logs)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    module.validation_step(batch, 0)
    assert logs["val/flow"] != pytest.approx(before["val/flow"])


def test_validation_writes_samples_until_the_configured_count(build, tmp_path):
    module, batch = build("data.batch_size=2", "validation.samples=4")
    logged(module)
    written = []
    module.write_samples = lambda b, n: written.append(n if b is batch else ("another batch", n))
    module.validation_step(batch, 0)
    assert written == []                        # no out_dir: nowhere to write
    module.out_dir = tmp_path
    module._trainer = SimpleNamespace(is_global_zero=False)
    module.validation_step(batch, 0)
    assert written == []                        # only rank zero writes
    module._trainer = SimpleNamespace(is_global_zero=True)
    for batch_idx in range(4):
        module.validation_step(batch, batch_idx)
    assert written == [4, 2]          # batch 0 holds samples 1-2 (of 4 wanted), batch 1 samples 3-4


def test_a_module_given_a_run_directory_writes_its_samples_there(build, tmp_path, monkeypatch):
    import model.images
    from model.lit import AceDiTModule

    built, batch = build("validation.steps=1", "validation.samples=1")
    module = AceDiTModule(built.cfg, built.frozen.text, built.hparams["lyric_vocab"], out_dir=str(tmp_path))
    module._trainer = SimpleNamespace(is_global_zero=True, global_step=7)
    logged(module)
    folders = []
    monkeypatch.setattr(model.images, "save_sample_images", lambda out, ids, *rest: folders.append((out, ids)))
    module.validation_step(batch, 0)
    assert folders == [(tmp_path / "samples" / "step-0000007", batch["track_id"][:1])]


def test_sampling_integrates_guided_euler_steps_from_seeded_noise_on_the_ema(build):
    """sample() is euler_sample over the EMA net from noise of the given seed, guided against the
    same batch with text, lyrics and speaker all dropped; padded frames come back zero."""
    module, batch = build()
    net = module.ema.module
    text, text_mask = module.frozen.text(batch["prompt"])
    cond, cond_mask = net.conditions(text, text_mask, batch["lyric_ids"], batch["lyric_mask"], batch["speaker"])
    off = torch.zeros(2, dtype=torch.bool)
    null, null_mask = net.conditions(text, text_mask, batch["lyric_ids"], batch["lyric_mask"], batch["speaker"],
                                     off, off, off)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = euler_sample(net.dit, noise, batch["frame_mask"], cond, cond_mask, null, null_mask,
                                3, module.cfg.flow.shift, 2.5)
    with torch.no_grad():
        for p in module.net.parameters():       # not what sampling reads
            p.add_(0.1 * torch.randn_like(p))
    got = module.sample(batch, steps=3, guidance=2.5, seed=5)
    torch.testing.assert_close(got, expected)
    assert not got[1, ..., TRACKS[1][1]:].any() and got[1, ..., :TRACKS[1][1]].abs().sum() > 0
    assert not torch.allclose(module.sample(batch, steps=3, guidance=2.5, seed=6), got)


def test_write_samples_draws_the_first_n_tracks_of_the_batch(build, tmp_path, monkeypatch):
    import model.images

    module, batch = build("validation.steps=2", "validation.guidance=1.5")
    module.out_dir = tmp_path
    module._trainer = SimpleNamespace(global_step=42)
    calls = []
    monkeypatch.setattr(model.images, "save_sample_images",
                        lambda out, ids, latents, reference, mask, cfg: calls.append(
                            (out, ids, latents, reference, mask, cfg)))
    module.write_samples(batch, 1)
    module.write_samples(batch, 5)
    (out, ids, latents, reference, mask, cfg), (_, all_ids, all_latents, *_) = calls
    assert out == tmp_path / "samples" / "step-0000042" and ids == batch["track_id"][:1]
    assert torch.equal(mask, batch["frame_mask"][:1]) and cfg is module.cfg
    assert all_ids == batch["track_id"] and all_latents.shape == batch["latents"].shape
    torch.testing.assert_close(reference, batch["latents"][:1].float())
    one = {k: (v[:1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    torch.testing.assert_close(latents, module.sample(one, 2, 1.5))


@pytest.mark.parametrize("schedule,max_steps,expected", [
    # lr 2e-3, 4 warm-up steps, 14 steps in all, floor 0.2: warm-up to 2e-3 at step 3, then cosine
    # from 2e-3 (step 4) through the midpoint 1.2e-3 (step 9) to the floor 4e-4 (step 14 and after)
    ("cosine", 14, {0: 5e-4, 1: 1e-3, 3: 2e-3, 4: 2e-3, 9: 1.2e-3, 14: 4e-4, 16: 4e-4}),
    ("constant", 14, {0: 5e-4, 3: 2e-3, 4: 2e-3, 9: 2e-3, 16: 2e-3}),
    # a run no longer than its warm-up: the floor right after the warm-up, not a division by zero
    ("cosine", 4, {3: 2e-3, 4: 2e-3, 5: 4e-4, 16: 4e-4}),
])
def test_learning_rate_warms_up_then_follows_the_schedule(build, schedule, max_steps, expected):
    module, _ = build("optim.lr=2e-3", "optim.warmup_steps=4", f"optim.schedule={schedule}",
                      "optim.min_lr_ratio=0.2", f"trainer.max_steps={max_steps}")
    setup = module.configure_optimizers()
    opt, sched = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    assert setup["lr_scheduler"]["interval"] == "step"
    seen = {}
    for step in range(17):
        seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    for step, lr in expected.items():
        assert seen[step] == pytest.approx(lr, rel=1e-6), (step, seen[step])
    assert math.isclose(seen[2], 1.5e-3)


def test_the_optimiser_trains_the_net_and_projectors_with_the_configured_adamw(build):
    module, _ = build("optim.betas=[0.7, 0.8]", "optim.weight_decay=0.03", "optim.eps=1e-6")
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"]) == ((0.7, 0.8), 0.03, 1e-6)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    wanted = {id(p) for p in [*module.net.parameters(), *module.repa.parameters()]}
    assert trained == wanted                       # not the EMA copy, not the frozen text encoder
    assert module.hparams["lyric_vocab"] > 0
    assert module.hparams["config"] == module.cfg.model_dump(mode="json")
