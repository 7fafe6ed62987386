"""The trainer: latent shards into padded batches, padding that changes no loss, the held-out split
by track_id hash, the tiny model overfitting four tracks, validation at val_every, resume from the
last checkpoint with the saved step and optimizer state, the entry point."""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from latent_shards import decoded_sample, make_track, tiny_module, write_latent_shards  # noqa: E402

from schemas.train import load_train_config  # noqa: E402


@pytest.fixture(scope="session")
def latent_shards(tmp_path_factory) -> Path:
    tracks = [make_track(i, frames) for i, frames in enumerate([40, 33, 57, 48, 61, 25])]
    tracks[5].pop("mert")          # one track without MERT features: its REPA term is skipped
    return write_latent_shards(tmp_path_factory.mktemp("latents") / "default", tracks)


@pytest.fixture
def tiny_cfg(latent_shards, tiny_models_dir):
    def make(*overrides):
        return load_train_config("tiny", [f"data.shards={latent_shards}", f"tiny_dir={tiny_models_dir}",
                                          "trainer.log_every=1", *overrides])
    return make


def metrics(out: Path) -> list[dict]:
    with open(out / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def train_losses(out: Path, key="train/flow") -> list[tuple[int, float]]:
    rows = [r for r in metrics(out) if r.get(key)]
    return [(int(r["step"]), float(r[key])) for r in rows]


def test_batches_are_padded_with_masks_tokens_and_targets(tiny_cfg):
    from model.data import LatentDataModule
    from model.lyric_encoder import load_lyric_tokenizer

    cfg = tiny_cfg("data.batch_size=3", "data.max_frames=50")
    tok = load_lyric_tokenizer(cfg.lyric_encoder.tokenizer, cfg.tiny_dir)
    data = LatentDataModule(cfg, tok)
    data.setup("fit")
    assert [t.dim for t in data.cfg.repa.targets] == [24, 16]      # read from the shards
    batch = next(iter(data.train_dataloader()))
    B, C, M, T = batch["latents"].shape
    assert (B, C, M) == (3, 8, 16) and T <= 50
    lengths = batch["frame_mask"].sum(1)
    assert lengths.max() == T
    for i in range(B):
        assert torch.all(batch["latents"][i, ..., lengths[i]:] == 0)
    assert batch["lyric_ids"].shape[0] == 3 and torch.all(batch["lyric_mask"][:, 0])
    feats, fmask = batch["targets"]["mhubert"]
    assert feats.shape == (3, T, 16) and not (fmask & ~batch["frame_mask"]).any()
    assert len(data.val_samples) == 2     # nothing held out of six tracks: first two validate


def test_missing_shards_is_a_clear_error(tmp_path, tiny_cfg, capsys):
    from model.train import main

    rc = main(["--config", "tiny", "--out", str(tmp_path / "run"), "--shards", str(tmp_path / "nope"),
               "--set", f"tiny_dir={tiny_cfg().tiny_dir}"])
    assert rc == 2
    assert "index.parquet not found" in capsys.readouterr().err


def test_overfits_four_tracks(tmp_path, tiny_cfg, latent_shards):
    from model.train import fit

    four = write_latent_shards(tmp_path / "four", [make_track(i, 32, seed=1) for i in range(4)])
    cfg = tiny_cfg(f"data.shards={four}", "trainer.max_steps=150", "trainer.val_every=1000",
                   "optim.lr=3e-3", "optim.warmup_steps=5", "optim.schedule=constant",
                   "conditions.text_dropout=0", "conditions.lyric_dropout=0", "repa.enabled=false")
    final = fit(cfg, tmp_path / "run")
    assert final["step"] == 150
    losses = [v for _, v in train_losses(tmp_path / "run")]
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)


def test_padding_changes_no_loss(tiny_cfg, monkeypatch):
    """Two tracks of different lengths padded into one batch (padding filled with large garbage)
    give the losses of the same tracks run one at a time at their own lengths, frame-weighted."""
    module, collate = tiny_module(tiny_cfg())
    samples = [decoded_sample(make_track(0, 21)), decoded_sample(make_track(3, 14))]
    lengths = [s["latent"].shape[-1] for s in samples]
    gen = torch.Generator().manual_seed(7)
    noises = [torch.randn(1, 8, 16, n, generator=gen) for n in lengths]

    batch = collate(samples)
    T = max(lengths)
    padded_noise = 1e3 * torch.randn(2, 8, 16, T, generator=gen)
    for i, n in enumerate(lengths):
        batch["latents"][i, ..., n:] = 1e3 * torch.randn(8, 16, T - n, generator=gen)
        for feats, _ in batch["targets"].values():
            feats[i, n:] = 1e3 * torch.randn(T - n, feats.shape[-1], generator=gen)
        padded_noise[i, ..., :n] = noises[i][0]
    assert batch["frame_mask"].sum(1).tolist() == lengths

    draws = []   # the noise losses() draws: ours, so valid frames see the same noise both ways

    def randn(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        draws.append(shape)
        return next(queue).clone()

    t = torch.tensor([0.35, 0.8])
    keep = {"text": torch.tensor([True, False]), "lyrics": torch.tensor([False, True]),
            "speaker": torch.tensor([True, True])}
    queue = iter([padded_noise, *noises])
    monkeypatch.setattr(torch, "randn", randn)
    with torch.no_grad():
        together = module.losses(module.net, batch, t=t, keep=keep)
        alone = [module.losses(module.net, collate([s]), t=t[i:i + 1], keep={k: v[i:i + 1] for k, v in keep.items()})
                 for i, s in enumerate(samples)]
    monkeypatch.undo()
    assert draws == [(2, 8, 16, T), (1, 8, 16, lengths[0]), (1, 8, 16, lengths[1])]
    assert set(together) == {"flow", "repa_mert", "repa_mhubert", "loss"}
    for term in ("flow", "repa_mert", "repa_mhubert"):
        expected = sum(n * out[term] for n, out in zip(lengths, alone)) / sum(lengths)
        torch.testing.assert_close(together[term], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{term}: {m}")
    assert abs(alone[0]["flow"] - alone[1]["flow"]) > 1e-3   # the weighting is tested, not moot


def test_a_run_past_val_every_logs_validation_and_writes_sample_images(tmp_path, tiny_cfg):
    from model.train import fit

    out = tmp_path / "run"
    cfg = tiny_cfg("trainer.max_steps=4", "trainer.val_every=2", "trainer.checkpoint_every=1000",
                   "validation.steps=2")
    final = fit(cfg, out)
    assert final["step"] == 4
    # The CSV's step is the 0-based index of the last training step (0..3 for four steps):
    # validation after steps 2 and 4 is logged at 1 and 3.
    val = [r for r in metrics(out) if r.get("val/flow")]
    assert [int(r["step"]) for r in val] == [1, 3]
    for r in val:
        for key in ("val/flow", "val/loss", "val/repa_mert", "val/repa_mhubert"):
            assert 0 < float(r[key]) < 100, (key, r)
    # Nothing is held out of six tracks (val_fraction 0): the first two in the index validate.
    first_two = sorted(make_track(i, 1)["track_id"] for i in range(2))
    for step in (2, 4):
        images = sorted((out / "samples" / f"step-{step:07d}").iterdir())
        assert [p.name for p in images] == [f"{t}.png" for t in first_two]
        assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in images)


def _held_out_by_rule(track_id: str, fraction: float) -> bool:
    """The documented rule: the first 32 bits of sha1(track_id), mod 10 000, below fraction * 10 000."""
    return int.from_bytes(hashlib.sha1(track_id.encode()).digest()[:4], "big") % 10_000 < fraction * 10_000


def test_validation_is_held_out_by_track_id_hash(tmp_path, tiny_cfg):
    from model.data import LatentDataModule
    from model.lyric_encoder import load_lyric_tokenizer

    tracks = [make_track(i, 6, seed=2) for i in range(24)]
    ids = {t["track_id"] for t in tracks}
    expected = {t for t in ids if _held_out_by_rule(t, 0.3)}
    assert 3 <= len(expected) <= 12, len(expected)
    tok = load_lyric_tokenizer("tiny:lyric_tokenizer", tiny_cfg().tiny_dir)

    def split(name, tracks, per_shard):
        cfg = tiny_cfg(f"data.shards={write_latent_shards(tmp_path / name, tracks, per_shard)}",
                       "data.val_fraction=0.3", "data.val_samples=24", "data.batch_size=4", "data.max_frames=6")
        data = LatentDataModule(cfg, tok)
        data.setup("fit")
        return data

    data = split("all", tracks, 4)
    validation = {s["track_id"] for s in data.val_samples}
    assert data.held_out == validation == expected
    trained = set()
    for _, batch in zip(range(200), data.train_dataloader()):
        trained |= set(batch["track_id"])
        if trained == ids - expected:
            break
    assert trained == ids - expected        # disjoint from validation, and together all tracks

    # A track's side depends on its id only: not on shard order or on which other tracks exist.
    shuffled = split("shuffled", tracks[::-1], 3)
    assert shuffled.held_out == {s["track_id"] for s in shuffled.val_samples} == expected
    fewer = [t for i, t in enumerate(tracks) if i % 3]
    subset = split("fewer", fewer, 5)
    assert subset.held_out == expected & {t["track_id"] for t in fewer}


def test_resume_continues_from_the_saved_step_and_optimizer_state(tmp_path, tiny_cfg):
    import lightning as L

    from model.train import fit

    out = tmp_path / "run"
    cfg = tiny_cfg("trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.val_every=1000")
    fit(cfg, out)
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 6
    assert not any(k.startswith("frozen") or "text_encoder" in k for k in saved["state_dict"])
    assert any(k.startswith("ema.") for k in saved["state_dict"])

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, module):
            seen["step"] = trainer.global_step
            seen["opt"] = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                           for k, s in trainer.optimizers[0].state_dict()["state"].items()}
            seen["ema_n"] = int(module.ema.n_averaged)

    final = fit(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": 9})}),
                out, resume=True, callbacks=[Probe()])
    assert seen["step"] == 6 and final["step"] == 9
    saved_state = saved["optimizer_states"][0]["state"]
    assert seen["opt"].keys() == saved_state.keys()
    for k, s in saved_state.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(seen["opt"][k][name], s[name])
    assert seen["ema_n"] == 6
    steps = [s for s, _ in train_losses(out)]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 8 and len(set(steps)) == 9
    assert json.loads((out / "final.json").read_text())["checkpoint"].endswith("last.ckpt")
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.ckpt")) == [
        "step-0000003.ckpt", "step-0000006.ckpt", "step-0000009.ckpt"]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_cfg, latent_shards):
    """SIGKILL a real training process mid-run; --resume continues from the last checkpoint."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "model.train", "--config", "tiny", "--out", str(out),
           "--shards", str(latent_shards), "--max-steps", "100000", "--set", f"tiny_dir={tiny_cfg().tiny_dir}",
           "--set", "trainer.checkpoint_every=5", "--set", "trainer.val_every=100000"]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "step-0000015.ckpt").exists():
            assert proc.poll() is None and time.time() < deadline, "training died or never checkpointed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)   # never half-written
    step = saved["global_step"]
    # last.ckpt is written after the step file, so a kill in between leaves it one checkpoint behind
    assert step >= 10 and step % 5 == 0
    rc = subprocess.run(cmd[:cmd.index("--max-steps")] + ["--max-steps", str(step + 3), "--resume"]
                        + cmd[cmd.index("--max-steps") + 2:], cwd=repo, capture_output=True, text=True,
                        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert f"start at step {step} " in rc.stdout
    assert json.loads((out / "final.json").read_text())["step"] == step + 3
