"""Lightning glue: the training step (flow matching + REPA), optimiser, schedule, EMA, validation.

The trainable state is `net` (the DiT and the condition encoders) and `repa` (projectors);
the EMA is a DiT-only average of `net`. The frozen mT5 lives outside the module tree (a
plain attribute holder), so it is neither averaged, nor checkpointed, nor moved by Lightning
(we move it in `setup`). Validation logs the loss at fixed timesteps and writes sampled
latents as images through `model.images.save_sample_images`.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from model.conditions import ConditionEncoder, draw_keep
from model.dit import LinearDiT
from model.flow import euler_sample, flow_loss, interpolate, sample_timesteps, velocity_target
from model.repa import RepaHeads
from schemas.train import TrainConfig


class Denoiser(nn.Module):
    """What EMA averages and sampling uses: the DiT and its trainable condition encoders."""

    def __init__(self, cfg: TrainConfig, text_dim: int, lyric_vocab: int):
        super().__init__()
        self.dit = LinearDiT(cfg.dit)
        self.conditions = ConditionEncoder(cfg.dit.width, text_dim, lyric_vocab, cfg.lyric_encoder,
                                           cfg.conditions)


class Frozen:
    """Holds frozen encoders out of nn.Module's registry (and so out of state_dict and EMA)."""

    def __init__(self, **encoders):
        self.__dict__.update(encoders)


class AceDiTModule(L.LightningModule):
    def __init__(self, cfg: TrainConfig, text_encoder, lyric_vocab: int, out_dir: str | Path | None = None):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"config": cfg.model_dump(mode="json"), "lyric_vocab": lyric_vocab})
        self.frozen = Frozen(text=text_encoder)
        self.net = Denoiser(cfg, text_encoder.dim, lyric_vocab)
        self.repa = RepaHeads(cfg.dit.width, cfg.repa) if cfg.repa.enabled else None
        self.ema = None
        if cfg.optim.ema_decay > 0:
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay),
                                     use_buffers=True).requires_grad_(False)
        self.out_dir = Path(out_dir) if out_dir else None

    def setup(self, stage: str):
        self.frozen.text.to(self.device)

    def on_fit_start(self):
        self.frozen.text.to(self.device)

    # --- one step ------------------------------------------------------------------------
    def conditions(self, net: Denoiser, batch, keep=None):
        text, text_mask = self.frozen.text(batch["prompt"])
        keep = keep or {}
        return net.conditions(text, text_mask, batch["lyric_ids"], batch["lyric_mask"], batch["speaker"],
                              keep.get("text"), keep.get("lyrics"), keep.get("speaker"))

    def losses(self, net: Denoiser, batch, t=None, keep=None, generator=None) -> dict:
        x0, frame_mask = batch["latents"], batch["frame_mask"]
        B = x0.shape[0]
        cond, cond_mask = self.conditions(net, batch, keep)
        if t is None:
            t = sample_timesteps(B, self.cfg.flow, x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        depth = self.cfg.repa.depth if self.repa is not None else None
        v_pred, hidden = net.dit(interpolate(x0, noise, t), t, cond, cond_mask, frame_mask, hidden_at=depth)
        out = {"flow": flow_loss(v_pred, velocity_target(x0, noise), frame_mask)}
        total = out["flow"]
        if self.repa is not None:
            found = self.repa(hidden, batch["targets"], self.cfg.dit.patch_time)
            for name, projector in self.repa.projectors.items():
                if name in found:
                    out[f"repa_{name}"] = found[name]
                    total = total + self.repa.weights[name] * found[name]
                else:   # no features in this batch: touch the projector so DDP sees every parameter used
                    total = total + 0.0 * projector(hidden[:, :1]).sum()
        out["loss"] = total
        return out

    def training_step(self, batch, batch_idx):
        B, dev, c = batch["latents"].shape[0], self.device, self.cfg.conditions
        keep = {"text": draw_keep(B, c.text_dropout, dev), "lyrics": draw_keep(B, c.lyric_dropout, dev),
                "speaker": draw_keep(B, c.speaker_dropout, dev)}
        out = self.losses(self.net, batch, keep=keep)
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=B, sync_dist=False)
        return out["loss"]

    def optimizer_step(self, *args, **kwargs):
        # Here rather than in on_train_batch_end, which runs after the checkpoint callback: the
        # step's checkpoint must hold the EMA of that step, or a resume loses one update.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    # --- validation ------------------------------------------------------------------------
    def sampling_net(self) -> Denoiser:
        return self.ema.module if self.ema is not None else self.net

    def validation_step(self, batch, batch_idx):
        B = batch["latents"].shape[0]
        gen = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        # Fixed timesteps across the range, so validation losses are comparable between runs.
        t = (torch.arange(B, device=self.device, dtype=torch.float32) + 0.5) / B
        out = self.losses(self.sampling_net(), batch, t=t, generator=gen)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=B, sync_dist=True)
        done = batch_idx * self.cfg.data.batch_size
        if self.out_dir is not None and done < self.cfg.validation.samples and self.trainer.is_global_zero:
            self.write_samples(batch, self.cfg.validation.samples - done)

    @torch.no_grad()
    def sample(self, batch, steps: int, guidance: float, seed: int = 0) -> torch.Tensor:
        net = self.sampling_net()
        cond, cond_mask = self.conditions(net, batch)
        B = cond.shape[0]
        off = torch.zeros(B, dtype=torch.bool, device=self.device)
        null, null_mask = self.conditions(net, batch, {"text": off, "lyrics": off, "speaker": off})
        gen = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(batch["latents"].shape, device=self.device, generator=gen)
        return euler_sample(net.dit, noise, batch["frame_mask"], cond, cond_mask, null, null_mask,
                            steps, self.cfg.flow.shift, guidance)

    def write_samples(self, batch, n: int):
        from model.images import save_sample_images

        n = min(n, batch["latents"].shape[0])
        part = {k: (v[:n] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        latents = self.sample(part, self.cfg.validation.steps, self.cfg.validation.guidance)
        save_sample_images(self.out_dir / "samples" / f"step-{self.global_step:07d}", part["track_id"],
                           latents.float(), part["latents"].float(), part["frame_mask"], self.cfg)

    # --- optimiser -------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        if self.repa is not None:
            params += list(self.repa.parameters())
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        total = self.cfg.trainer.max_steps

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
