"""Aesthetics stage (DAG step 2): Audiobox Aesthetics scores CE, CU, PC, PQ; keep or reject.

Each track is read by our loader at 16 kHz mono, cut into 10 s windows (hop 10 s; the
last one zero-padded and masked), scored by `AesMultiOutput` in device-sized batches of
windows, de-normalised with the checkpoint's per-axis mean/std and averaged with each
window weighted by its unpadded length, as the reference inference does (its own
file-path inference needs torchaudio, which we do not install). Downstream stages run
on kept tracks only.

Reason codes added here:
  low_aesthetics   an axis is below its configured minimum ("low_aesthetics: PQ 3.104 < 5")
  live_recording   the path matches aesthetics.live_pattern (with aesthetics.reject_live)
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from schemas.aesthetics import AESTHETICS_SCHEMA, AXES
from schemas.common import STATUS_ERROR, STATUS_OK, STATUS_REJECTED
from tasks import audio
from tasks.models import ModelLoadError, loading, resolve_checkpoint, resolve_device
from tasks.stage import Stage

SAMPLE_RATE = 16000
CHECKPOINT_NAME = "checkpoint.pt"
PRETRAINED_CONFIG = "config.json"   # with model.safetensors: what save_pretrained writes
# model_cfg keys the reference loader passes to AesMultiOutput.
MODEL_CFG_KEYS = ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer",
                  "use_weighted_layer_sum", "precision", "normalize_embed", "output_dim")

# AesMultiOutput builds its WavLM from the module constant DEFAULT_AUDIO_CFG. A checkpoint
# may carry its own WavLM config (our tiny twin does, under model_cfg["wavlm_cfg"] in
# checkpoint.pt or "wavlm_cfg" in a save_pretrained config.json; the released one does not);
# construction swaps the constant under this lock.
_CONSTRUCT_LOCK = threading.Lock()
LOAD_HINT = ("point it at checkpoint.pt (https://dl.fbaipublicfiles.com/audiobox-aesthetics/checkpoint.pt), "
             "a directory holding it, a save_pretrained directory (config.json + model.safetensors), "
             "or the hub id facebook/audiobox-aesthetics")


@contextlib.contextmanager
def _wavlm_config(wavlm_cfg: dict | None):
    """While open, AesMultiOutput builds its WavLM from `wavlm_cfg` (the default when None)."""
    from audiobox_aesthetics.model import aes
    from audiobox_aesthetics.model.wavlm import WavLMConfig

    with _CONSTRUCT_LOCK, warnings.catch_warnings():
        # the package's WavLM still uses torch.nn.utils.weight_norm; nothing for us to act on
        warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
        default = aes.DEFAULT_AUDIO_CFG
        if wavlm_cfg:
            aes.DEFAULT_AUDIO_CFG = WavLMConfig(dict(wavlm_cfg))
        try:
            yield
        finally:
            aes.DEFAULT_AUDIO_CFG = default


def _keep_wavlm_cfg(model, wavlm_cfg: dict | None):
    """Record a custom WavLM config in the config that `model.save_pretrained` writes (the
    hub mixin keeps the constructor arguments, which do not include it), so it round-trips."""
    if wavlm_cfg:
        model._hub_mixin_config = {**(model._hub_mixin_config or {}), "wavlm_cfg": dict(wavlm_cfg)}
    return model


def _construct(model_cfg: dict, target_transform: dict):
    from audiobox_aesthetics.model.aes import AesMultiOutput

    kwargs = {k: model_cfg[k] for k in MODEL_CFG_KEYS if k in model_cfg}
    with _wavlm_config(model_cfg.get("wavlm_cfg")):
        model = AesMultiOutput(**kwargs, target_transform=target_transform)
    return _keep_wavlm_cfg(model, model_cfg.get("wavlm_cfg"))


def _from_checkpoint(path: Path):
    """The released format: {"state_dict": {"model.<param>": ...}, "model_cfg": {...},
    "target_transform": {axis: {"mean", "std"}}}, loaded as the reference's AesPredictor does."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {re.sub(r"^model\.", "", k): v for k, v in ckpt["state_dict"].items()}
    model = _construct(ckpt["model_cfg"], ckpt["target_transform"])
    model.load_state_dict(state)
    return model


def _from_pretrained(ref: str, wavlm_cfg: dict | None = None):
    """The package's own PyTorchModelHubMixin loading, from a hub id or a local directory."""
    from audiobox_aesthetics.model.aes import AesMultiOutput

    # strict: the mixin's default (False) would leave missing weights at their random init;
    # stdout: the mixin prints "Loading weights from local directory" there
    with _wavlm_config(wavlm_cfg), contextlib.redirect_stdout(sys.stderr):
        model = AesMultiOutput.from_pretrained(ref, strict=True)
    return _keep_wavlm_cfg(model, wavlm_cfg)


def load_model(ref: str, device: torch.device | str = "cpu"):
    """An AesMultiOutput in eval mode from a checkpoint.pt, a directory holding one, a
    save_pretrained directory (config.json + model.safetensors) or a hub id. Every failure
    is one ModelLoadError line naming aesthetics.checkpoint and what to do."""
    with loading("aesthetics.checkpoint", ref, LOAD_HINT):
        path = Path(ref).expanduser()
        if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
            model = _from_checkpoint(path / CHECKPOINT_NAME)
        elif path.is_dir() and (path / PRETRAINED_CONFIG).is_file():
            config = json.loads((path / PRETRAINED_CONFIG).read_text())
            model = _from_pretrained(str(path), config.get("wavlm_cfg"))
        elif path.is_dir():
            raise ModelLoadError(f"aesthetics.checkpoint={ref!r}: the directory holds neither {CHECKPOINT_NAME} "
                                 f"nor {PRETRAINED_CONFIG} + model.safetensors; {LOAD_HINT}")
        elif path.is_file():
            model = _from_checkpoint(path)
        elif ref.startswith(("/", ".", "~")) or ref.endswith((".pt", ".pth", ".ckpt")):
            raise ModelLoadError(f"aesthetics.checkpoint={ref!r}: no such file or directory; {LOAD_HINT}")
        else:
            model = _from_pretrained(ref)
        return model.to(device).eval()


def build_tiny(path: Path) -> None:
    """Tiny twin: AesMultiOutput with a 2-layer, 32-wide WavLM and random weights, saved
    as path/checkpoint.pt in the released format (plus model_cfg["wavlm_cfg"])."""
    wavlm_cfg = {
        "extractor_mode": "default", "encoder_layers": 2, "encoder_embed_dim": 32,
        "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2, "activation_fn": "gelu",
        "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "dropout_input": 0.0, "dropout_features": 0.0,
        "layer_norm_first": False,
        # same strides as the real extractor (320 samples per frame), narrower channels
        "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2",
        "conv_bias": False, "feature_grad_mult": 0.1, "mask_prob": 0.0, "conv_pos": 16,
        "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32,
        "max_distance": 100, "gru_rel_pos": True, "normalize": False,
    }
    model_cfg = {"proj_num_layer": 1, "proj_ln": False, "proj_act_fn": "gelu", "proj_dropout": 0.0,
                 "nth_layer": wavlm_cfg["encoder_layers"] + 1, "use_weighted_layer_sum": True,
                 "precision": "32", "normalize_embed": True, "output_dim": 1, "wavlm_cfg": wavlm_cfg}
    target_transform = {"CE": {"mean": 5.6, "std": 1.3}, "CU": {"mean": 6.4, "std": 1.2},
                        "PC": {"mean": 4.6, "std": 1.6}, "PQ": {"mean": 6.6, "std": 1.1}}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _construct(model_cfg, target_transform)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_cfg": model_cfg, "target_transform": target_transform},
               Path(path) / CHECKPOINT_NAME)


def window_starts(n_samples: int, window: int, hop: int) -> range:
    """Window start offsets as the reference inference lays them (every hop from 0)."""
    return range(0, max(n_samples, 1), hop)


class AestheticsStage(Stage):
    name = "aesthetics"
    version = "1"
    inputs = ("probe",)
    schema = AESTHETICS_SCHEMA
    uses_gpu = True

    def setup(self) -> None:
        cfg = self.cfg.aesthetics
        self.device = resolve_device(self.cfg.device)
        self.model = load_model(resolve_checkpoint(cfg.checkpoint, self.cfg.models.tiny_dir), self.device)
        if cfg.precision != "checkpoint":
            dtypes = {"32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16}
            self.model.precision = dtypes[cfg.precision]
            self.model.enable_autocast = cfg.precision != "32"
        tt = self.model.target_transform
        self.mean = torch.tensor([float(tt[a]["mean"]) for a in AXES])
        self.std = torch.tensor([float(tt[a]["std"]) for a in AXES])
        self.live = re.compile(cfg.live_pattern) if cfg.reject_live else None

    def _windows(self, tracks: list[dict], rows: list[dict]) -> Iterator[tuple[int, np.ndarray]]:
        """(track index, window samples) for every window of every readable track; tracks the
        loader refuses get their reject row here. One track's audio is held at a time."""
        cfg = self.cfg.aesthetics
        win, hop = int(round(cfg.window_s * SAMPLE_RATE)), int(round(cfg.hop_s * SAMPLE_RATE))
        for i, track in enumerate(tracks):
            if self.live is not None:
                uri = track.get("uri") or audio.display_path(track["uri_raw"])
                hit = self.live.search(uri)
                if hit:
                    rows[i].update(status=STATUS_REJECTED,
                                   reason=f"live_recording: path matches {hit.group(0).strip()!r}")
                    continue
            try:
                wav = audio.load_track(track, SAMPLE_RATE, 1, self.cfg.audio)[0]
            except audio.AudioError as exc:
                rows[i].update(status=STATUS_REJECTED, reason=exc.reason)
                continue
            for start in window_starts(len(wav), win, hop):
                yield i, wav[start:start + win]

    @torch.inference_mode()
    def _score(self, batch: list[np.ndarray]) -> torch.Tensor:
        """(B, 4) de-normalised scores of a batch of windows, padded to the window length."""
        win = int(round(self.cfg.aesthetics.window_s * SAMPLE_RATE))
        wav = torch.zeros(len(batch), 1, win)
        mask = torch.zeros(len(batch), 1, win, dtype=torch.bool)
        for b, w in enumerate(batch):
            wav[b, 0, :len(w)] = torch.from_numpy(w)
            mask[b, 0, :len(w)] = True
        preds = self.model({"wav": wav.to(self.device), "mask": mask.to(self.device)})
        out = torch.stack([preds[a].float().cpu() for a in AXES], dim=1)  # (B, 4)
        return out * self.std + self.mean

    def process(self, tracks: list[dict]) -> list[dict]:
        cfg = self.cfg.aesthetics
        win = int(round(cfg.window_s * SAMPLE_RATE))
        rows = [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in tracks]
        weighted = np.zeros((len(tracks), len(AXES)))
        weights = np.zeros(len(tracks))
        counts = np.zeros(len(tracks), dtype=np.int32)
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            scores = self._score([w for _, w in pending]).double().numpy()
            for (i, w), s in zip(pending, scores):
                weight = len(w) / win  # the reference's length weighting
                weighted[i] += s * weight
                weights[i] += weight
                counts[i] += 1
            pending.clear()

        for item in self._windows(tracks, rows):
            pending.append(item)
            if len(pending) >= cfg.batch_size:
                flush()
        if pending:
            flush()

        limits = cfg.thresholds()
        for i, row in enumerate(rows):
            if row["status"] != STATUS_OK:
                continue
            if weights[i] <= 0:
                row.update(status=STATUS_REJECTED, reason="empty: no audio window to score")
                continue
            scores = weighted[i] / weights[i]
            if not np.isfinite(scores).all():
                row.update(status=STATUS_ERROR, reason="exception: the aesthetics model returned "
                           "NaN/Inf scores (check aesthetics.precision)")
                continue
            row.update({a.lower(): float(s) for a, s in zip(AXES, scores)}, windows=int(counts[i]))
            # the score rounded down, so the reason never reads "6.80 < 6.79939"
            failing = [f"{a} {math.floor(s * 1000) / 1000:.3f} < {limits[a]:g}" for a, s in zip(AXES, scores)
                       if a in limits and s < limits[a]]
            if failing:
                row.update(status=STATUS_REJECTED, reason="low_aesthetics: " + ", ".join(failing))
        return rows


STAGE = AestheticsStage
