"""The latents stage's models: ACE-Step's music DCAE (mel front end, AutoencoderDC f8c8, latent
scaling) and the MERT / mHuBERT REPA target encoders, with their tiny twins.

The mel is ACE-Step's vocoder mel in plain torch (no torchaudio): each channel is reflect-padded
by (win - hop) / 2 on both sides, framed without centring (periodic Hann, n_fft 2048, hop 512),
|X| = sqrt(re^2 + im^2 + 1e-6), 128 Slaney-scale, Slaney-normalised (area) triangular filters
from 40 to 16000 Hz, log(max(mel, 1e-5)). Beat This's filterbank (tasks/beat_frontend.py) has
the same mel scale but no area normalisation, so only its Hz<->mel functions are reused.
ACE-Step's music_dcae pipeline then maps the log-mel from [-11, 3] to [-1, 1], runs the
AutoencoderDC encoder on the (B, 2, 128, F) image and stores (z - shift) * scale.
Every model is loaded once per process (cached by checkpoint, device and dtype).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from schemas.latents import DcaeConfig, LatentsConfig, MelConfig, SslTargetConfig
from tasks.beat_frontend import hz_to_mel, mel_to_hz
from tasks.models import resolve_checkpoint

TWIN_SUBFOLDER = "music_dcae_f8c8"   # the twin mirrors the hub repo's layout


# -- the mel front end ------------------------------------------------------------------------
def slaney_filterbank(sr: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangles on the Slaney mel scale, each of unit area in Hz
    (torchaudio MelScale(norm="slaney", mel_scale="slaney"), librosa's default)."""
    fft_hz = np.linspace(0.0, sr // 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))   # (n_mels + 2,)
    widths = np.diff(edges)
    ramps = edges[None, :] - fft_hz[:, None]                                          # (F, n_mels + 2)
    tri = np.maximum(0.0, np.minimum(-ramps[:, :-2] / widths[:-1], ramps[:, 2:] / widths[1:]))
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]                            # (F, n_mels)


class LogMel(torch.nn.Module):
    """(B, C, L) audio at mel.sample_rate -> (B, C, n_mels, L // hop) log-mel."""

    def __init__(self, cfg: MelConfig):
        super().__init__()
        self.cfg = cfg
        fb = slaney_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        self.register_buffer("fb", torch.from_numpy(fb).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, C, L = audio.shape
        left, right = (c.win_length - c.hop_length) // 2, (c.win_length - c.hop_length + 1) // 2
        y = F.pad(audio.reshape(B * C, 1, L).float(), (left, right), mode="reflect")[:, 0]   # (BC, L')
        spec = torch.stft(y, c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
                          window=self.window, center=False, normalized=False, onesided=True,
                          return_complex=True)                                       # (BC, F, frames)
        mag = torch.sqrt(spec.real.square() + spec.imag.square() + c.magnitude_eps)
        mel = torch.matmul(mag.transpose(1, 2), self.fb).transpose(1, 2)             # (BC, n_mels, frames)
        return torch.log(mel.clamp(min=c.log_clamp)).reshape(B, C, c.n_mels, -1)

    def silence(self) -> torch.Tensor:
        """(n_mels,) the log-mel of digital silence (what zero-padded audio gives)."""
        floor = self.fb.sum(0) * math.sqrt(self.cfg.magnitude_eps)
        return torch.log(floor.clamp(min=self.cfg.log_clamp))


# -- the music DCAE -------------------------------------------------------------------------
class MusicDCAE(torch.nn.Module):
    """Audio or mel -> scaled latents (B, 8, n_mels / 8, F / 8) and back to mel (and audio)."""

    def __init__(self, autoencoder, cfg: LatentsConfig, encoder_id: str, revision: str):
        super().__init__()
        self.dcae, self.cfg = autoencoder, cfg
        self.mel = LogMel(cfg.mel)
        self.encoder_id, self.revision = encoder_id, revision
        self.frame_samples = cfg.mel.hop_length * cfg.dcae.time_multiple      # audio samples per latent frame
        self.latent_fps = cfg.mel.sample_rate / self.frame_samples            # 10.77 at 44.1 kHz
        self._vocoder = None

    @property
    def device(self) -> torch.device:
        return next(self.dcae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dcae.parameters()).dtype

    def valid_length(self, samples: int) -> int:
        """Latent frames wholly covered by `samples` of audio (ACE-Step's latent_lengths)."""
        return samples // self.frame_samples

    def normalise(self, mel: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cfg.mel.min_value, self.cfg.mel.max_value
        return (mel - lo) / (hi - lo) * 2.0 - 1.0

    def denormalise(self, image: torch.Tensor) -> torch.Tensor:
        lo, hi = self.cfg.mel.min_value, self.cfg.mel.max_value
        return (image * 0.5 + 0.5) * (hi - lo) + lo

    @torch.no_grad()
    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, 2, L) at mel.sample_rate -> latents (B, 8, 16, ceil(L / frame_samples)).
        The audio is zero-padded to whole latent frames first, as ACE-Step does."""
        pad = -audio.shape[-1] % self.frame_samples
        audio = F.pad(audio.to(self.mel.fb.device).float(), (0, pad))
        return self.encode_mel(self.mel(audio))

    @torch.no_grad()
    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, 2, 128, F) log-mel -> latents (B, 8, 16, ceil(F / 8)); F is padded with silence."""
        m = self.cfg.dcae.time_multiple
        pad = -mel.shape[-1] % m
        if pad:
            fill = self.mel.silence().to(mel)[None, None, :, None].expand(*mel.shape[:3], pad)
            mel = torch.cat([mel, fill], dim=-1)
        image = self.normalise(mel.float()).to(self.device, self.dtype)
        z = self.dcae.encoder(image)                                          # (B, 8, 16, F / 8)
        return ((z.float() - self.cfg.dcae.shift) * self.cfg.dcae.scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 8, 16, T) -> log-mel (B, 2, 128, 8T)."""
        z = latents.to(self.device, self.dtype) / self.cfg.dcae.scale + self.cfg.dcae.shift
        return self.denormalise(self.dcae.decoder(z).float())

    def vocode(self, mel: torch.Tensor):
        """Log-mel -> audio through the configured `latents.dcae.vocoder` callable."""
        if self._vocoder is None:
            ref = self.cfg.dcae.vocoder
            if not ref or ":" not in ref:
                raise RuntimeError(
                    "latents.dcae.vocoder is not set: decoding latents to audio needs a "
                    "'module:callable' taking (mel, sample_rate) and returning audio (for the released "
                    "model, wrap ACE-Step's music_vocoder ADaMoSHiFiGANV1.decode); decode() gives the mel")
            module, name = ref.split(":", 1)
            self._vocoder = getattr(importlib.import_module(module), name)
        return self._vocoder(mel, self.cfg.mel.sample_rate)


# -- the REPA target encoders -------------------------------------------------------------------
class SslEncoder:
    """A wav2vec2-family encoder (MERT, mHuBERT): mono audio -> (frames, d) hidden states."""

    def __init__(self, name: str, model, extractor, cfg: SslTargetConfig, encoder_id: str):
        self.name, self.model, self.extractor, self.cfg = name, model, extractor, cfg
        self.encoder_id = encoder_id
        self.sample_rate = int(extractor.sampling_rate)
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def features(self, tracks: list[np.ndarray]) -> list[torch.Tensor]:
        """Mono tracks at self.sample_rate -> one (frames, d) float32 tensor each.

        Each track is cut into chunk_s chunks (the last one zero-padded, as ACE-Step's trainer
        does), the chunks of all tracks go through the model in batches, and each chunk keeps the
        frames its real samples cover."""
        chunk = int(round(self.cfg.chunk_s * self.sample_rate))
        pieces: list[tuple[int, np.ndarray]] = []                         # (track index, samples)
        for i, wav in enumerate(tracks):
            for start in range(0, max(len(wav), 1), chunk):
                pieces.append((i, wav[start:start + chunk]))
        outputs: list[list[torch.Tensor]] = [[] for _ in tracks]
        for b in range(0, len(pieces), self.cfg.batch_size):
            group = pieces[b:b + self.cfg.batch_size]
            values = [self.extractor(p, sampling_rate=self.sample_rate, return_tensors="np")["input_values"][0]
                      for _, p in group]
            batch = np.zeros((len(group), chunk), dtype=np.float32)
            for j, v in enumerate(values):
                batch[j, :len(v)] = v
            inputs = torch.from_numpy(batch).to(self.device, next(self.model.parameters()).dtype)
            hidden = self.model(inputs, output_hidden_states=True).hidden_states[self.cfg.layer]  # (b, N, d)
            for j, (i, p) in enumerate(group):
                keep = max(1, min(hidden.shape[1], math.ceil(len(p) * hidden.shape[1] / chunk)))
                outputs[i].append(hidden[j, :keep].float().cpu())
        return [torch.cat(parts, dim=0) for parts in outputs]


def pool_to_frames(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, d) features -> (frames, d) by averaging each latent frame's span (adaptive pooling)."""
    return F.adaptive_avg_pool1d(feats.T[None].float(), frames)[0].T


# -- loading, once per process -------------------------------------------------------------------
_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _compute_dtype(cfg: LatentsConfig, device: torch.device) -> torch.dtype:
    return _DTYPES[cfg.compute_dtype] if device.type == "cuda" else torch.float32


def _local_revision(path: Path) -> str:
    """A local checkpoint's revision: a short hash of its config and weight file names and sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return "local-" + h.hexdigest()[:12]


def _cached(key: tuple, build):
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def load_dcae(cfg: LatentsConfig, tiny_dir: str | Path, device: torch.device | str = "cpu") -> MusicDCAE:
    """The MusicDCAE of `cfg.dcae` (AutoencoderDC.from_pretrained of a hub id, local dir or twin)."""
    device = torch.device(device)
    dc: DcaeConfig = cfg.dcae
    key = ("dcae", dc.model_dump_json(), cfg.mel.model_dump_json(), str(Path(tiny_dir)), str(device),
           _compute_dtype(cfg, device))

    def build() -> MusicDCAE:
        from diffusers import AutoencoderDC

        ref = resolve_checkpoint(dc.checkpoint, tiny_dir)
        try:
            model = AutoencoderDC.from_pretrained(ref, subfolder=dc.subfolder, revision=dc.revision,
                                                  torch_dtype=_compute_dtype(cfg, device))
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"latents.dcae.checkpoint={dc.checkpoint!r} (subfolder {dc.subfolder!r}) could not be "
                f"loaded as an AutoencoderDC ({type(exc).__name__}: {str(exc)[:200]}). Point it at a local "
                "copy of ACE-Step/ACE-Step-v1-3.5B (with subfolder music_dcae_f8c8) or use tiny:dcae") from exc
        if model.config.in_channels != 2 or model.config.latent_channels != 8:
            raise RuntimeError(f"latents.dcae.checkpoint={dc.checkpoint!r} is an AutoencoderDC with "
                               f"in_channels={model.config.in_channels}, latent_channels="
                               f"{model.config.latent_channels}; the music DCAE is stereo-in, 8 latent channels")
        model = model.to(device).eval().requires_grad_(False)
        local = Path(ref) / (dc.subfolder or "")
        revision = dc.revision or (_local_revision(local) if local.is_dir() else "main")
        encoder_id = dc.checkpoint + (f"/{dc.subfolder}" if dc.subfolder else "")
        return MusicDCAE(model, cfg, encoder_id, revision).to(device)

    return _cached(key, build)


def load_ssl(name: str, cfg: SslTargetConfig, tiny_dir: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> SslEncoder:
    """A REPA target encoder by transformers AutoModel (+ Wav2Vec2FeatureExtractor) from_pretrained."""
    device = torch.device(device)
    key = ("ssl", name, cfg.model_dump_json(), str(Path(tiny_dir)), str(device), dtype)

    def build() -> SslEncoder:
        from transformers import AutoModel, Wav2Vec2FeatureExtractor

        ref = resolve_checkpoint(cfg.checkpoint, tiny_dir)
        try:
            model = AutoModel.from_pretrained(ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(ref, revision=cfg.revision,
                                                                 trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"latents.{name}.checkpoint={cfg.checkpoint!r} could not be loaded with transformers "
                f"AutoModel / Wav2Vec2FeatureExtractor ({type(exc).__name__}: {str(exc)[:200]}). Point it "
                f"at a local copy, use tiny:{name}, or set latents.{name}.enabled=false") from exc
        n_states = model.config.num_hidden_layers + 1
        if not -n_states <= cfg.layer < n_states:
            raise RuntimeError(f"latents.{name}.layer={cfg.layer} but {cfg.checkpoint!r} has {n_states} "
                               f"hidden states (0 .. {n_states - 1}, or negative from the end)")
        model = model.to(device, dtype).eval().requires_grad_(False)
        return SslEncoder(name, model, extractor, cfg, cfg.checkpoint)

    return _cached(key, build)


# -- tiny twins (tasks/models.py TINY_BUILDERS) --------------------------------------------------
def _dcae_config(widths: tuple, head_dim: int, enc_layers: tuple, dec_layers: tuple, scaling: float) -> dict:
    """AutoencoderDC f8c8 as ACE-Step's: stereo mel in, 8 latent channels, three ResBlock stages
    and an EfficientViT stage (four blocks: f8)."""
    blocks = ("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock")
    return dict(in_channels=2, latent_channels=8, attention_head_dim=head_dim,
                encoder_block_types=blocks, decoder_block_types=blocks,
                encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                encoder_layers_per_block=enc_layers, decoder_layers_per_block=dec_layers,
                encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
                upsample_block_type="interpolate", downsample_block_type="Conv",
                decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=scaling)


def tiny_dcae_config() -> dict:
    """The twin: four narrow blocks, one layer each."""
    return _dcae_config((16, 16, 32, 32), 8, (1, 1, 1, 1), (1, 1, 1, 1), 1.0)


def real_dcae_config() -> dict:
    """The released music_dcae_f8c8 architecture (for random-weight benchmarks)."""
    return _dcae_config((128, 256, 512, 1024), 32, (2, 2, 3, 3), (3, 3, 3, 3), 0.41407)


def build_tiny_dcae(path: Path) -> None:
    from diffusers import AutoencoderDC

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoencoderDC(**tiny_dcae_config())
    model.save_pretrained(Path(path) / TWIN_SUBFOLDER)


def _build_tiny_ssl(path: Path, sample_rate: int, hidden: int, seed: int) -> None:
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    # The real extractors' strides (5 * 2^6 = 320 samples per frame): 75 Hz at 24 kHz, 50 Hz at 16 kHz.
    config = HubertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=2 * hidden, conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2),
                          conv_kernel=(10, 3, 3, 3, 3, 2, 2), num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, feat_extract_norm="group", do_stable_layer_norm=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = HubertModel(config)
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(path)
    (Path(path) / "twin.json").write_text(json.dumps({"twin_of": "MERT-v1-330M" if sample_rate == 24000
                                                      else "mHuBERT-147"}))


def build_tiny_mert(path: Path) -> None:
    _build_tiny_ssl(path, 24000, hidden=32, seed=1)


def build_tiny_mhubert(path: Path) -> None:
    _build_tiny_ssl(path, 16000, hidden=24, seed=2)
