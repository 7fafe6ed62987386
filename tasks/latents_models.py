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
from tasks.models import ModelLoadError, loading, resolve_checkpoint

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
        self.hop = math.prod(model.config.conv_stride)                   # samples per feature frame (320)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalise(self, wav: np.ndarray) -> np.ndarray:
        """The extractor's zero-mean, unit-variance scaling (when it has do_normalize) over the
        whole track: ACE-Step's trainer normalises the track, then chunks it."""
        if not getattr(self.extractor, "do_normalize", False) or len(wav) == 0:
            return np.asarray(wav, dtype=np.float32)
        return self.extractor.zero_mean_unit_var_norm([np.asarray(wav, dtype=np.float32)], None)[0]

    @torch.no_grad()
    def features(self, tracks: list[np.ndarray]) -> list[torch.Tensor]:
        """Mono tracks at self.sample_rate -> one (frames, d) float32 tensor each.

        Each track is normalised as a whole, cut into chunk_s chunks (the last one zero-padded,
        as ACE-Step's trainer does), the chunks of all tracks go through the model in batches, and
        each chunk keeps ceil(samples / hop) frames, the ones its real samples reach."""
        chunk = int(round(self.cfg.chunk_s * self.sample_rate))
        pieces: list[tuple[int, np.ndarray]] = []                         # (track index, samples)
        for i, wav in enumerate(tracks):
            wav = self.normalise(wav)
            for start in range(0, max(len(wav), 1), chunk):
                pieces.append((i, wav[start:start + chunk]))
        dtype = next(self.model.parameters()).dtype
        outputs: list[list[torch.Tensor]] = [[] for _ in tracks]
        for b in range(0, len(pieces), self.cfg.batch_size):
            group = pieces[b:b + self.cfg.batch_size]
            batch = np.zeros((len(group), chunk), dtype=np.float32)       # (b, chunk), zero after the track
            for j, (_, p) in enumerate(group):
                batch[j, :len(p)] = p
            inputs = torch.from_numpy(batch).to(self.device, dtype)
            hidden = self.model(inputs, output_hidden_states=True).hidden_states[self.cfg.layer]  # (b, N, d)
            for j, (i, p) in enumerate(group):
                keep = max(1, min(hidden.shape[1], math.ceil(len(p) / self.hop)))
                outputs[i].append(hidden[j, :keep].float().cpu())
        return [torch.cat(parts, dim=0) for parts in outputs]


def pool_to_frames(feats: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, d) features -> (frames, d) by averaging each latent frame's span (adaptive pooling)."""
    return F.adaptive_avg_pool1d(feats.T[None].float(), frames)[0].T


# -- loading, once per process -------------------------------------------------------------------
_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compute_dtype(cfg: LatentsConfig, device: torch.device) -> torch.dtype:
    """The dtype every model of the stage runs in: latents.compute_dtype on a GPU, float32 on a CPU."""
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
    dtype = compute_dtype(cfg, device)
    key = ("dcae", dc.model_dump_json(), cfg.mel.model_dump_json(), str(Path(tiny_dir)), str(device), dtype)

    def build() -> MusicDCAE:
        from diffusers import AutoencoderDC

        with loading("latents.dcae.checkpoint", dc.checkpoint,
                     f"it must hold an AutoencoderDC in subfolder {dc.subfolder!r}: point it at a local copy "
                     "of ACE-Step/ACE-Step-v1-3.5B (subfolder music_dcae_f8c8) or use tiny:dcae"):
            ref = resolve_checkpoint(dc.checkpoint, tiny_dir)
            model = AutoencoderDC.from_pretrained(ref, subfolder=dc.subfolder, revision=dc.revision,
                                                  torch_dtype=dtype)
        if model.config.in_channels != 2 or model.config.latent_channels != 8:
            raise ModelLoadError(f"latents.dcae.checkpoint={dc.checkpoint!r} is an AutoencoderDC with "
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
    """A REPA target encoder by transformers AutoModel (+ Wav2Vec2FeatureExtractor) from_pretrained,
    in `dtype` (the stage passes compute_dtype(), as for the DCAE)."""
    device = torch.device(device)
    key = ("ssl", name, cfg.model_dump_json(), str(Path(tiny_dir)), str(device), dtype)

    def build() -> SslEncoder:
        from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

        remote = cfg.trust_remote_code
        with loading(f"latents.{name}.checkpoint", cfg.checkpoint,
                     f"point it at a local copy of a transformers wav2vec2-family model (MERT needs "
                     f"latents.{name}.trust_remote_code=true), use tiny:{name}, or set "
                     f"latents.{name}.enabled=false"):
            ref = resolve_checkpoint(cfg.checkpoint, tiny_dir)
            config = AutoConfig.from_pretrained(ref, revision=cfg.revision, trust_remote_code=remote)
            # MERT's remote code builds transformers' HuBERT encoder, which reads conv_pos_batch_norm
            # (transformers >= 4.48) that MERTConfig lacks; False is the weight-normed conv it was trained with.
            if not hasattr(config, "conv_pos_batch_norm"):
                config.conv_pos_batch_norm = False
            model = AutoModel.from_pretrained(ref, config=config, revision=cfg.revision, trust_remote_code=remote,
                                              torch_dtype=dtype)
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(ref, revision=cfg.revision)
        n_states = model.config.num_hidden_layers + 1
        if not -n_states <= cfg.layer < n_states:
            raise ModelLoadError(f"latents.{name}.layer={cfg.layer} but {cfg.checkpoint!r} has {n_states} "
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


# MERT's twin is remote code, as m-a-p/MERT-v1-330M is: a config class of its own (no
# conv_pos_batch_norm) and a model that builds transformers' HuBERT blocks from it. Written into the
# twin directory and loaded by AutoModel with trust_remote_code, so the tiny profile takes the
# released model's loading path, workaround included.
MERT_TWIN_CONFIG_CODE = '''"""MERT-style config of acepipe's tiny MERT twin: a class of its own, without
conv_pos_batch_norm."""
import copy

from transformers import PretrainedConfig


class MERTTwinConfig(PretrainedConfig):
    model_type = "mert_twin"
    defaults = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    hidden_act="gelu", hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0,
                    feat_proj_dropout=0.0, feat_proj_layer_norm=True, layerdrop=0.0, layer_norm_eps=1e-5,
                    initializer_range=0.02, conv_dim=[16] * 7, conv_stride=[5, 2, 2, 2, 2, 2, 2],
                    conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_bias=False, feat_extract_norm="layer",
                    feat_extract_activation="gelu", num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                    do_stable_layer_norm=True, sample_rate=24000)

    def __init__(self, **kwargs):
        values = {key: kwargs.pop(key, copy.deepcopy(value)) for key, value in self.defaults.items()}
        super().__init__(**kwargs)
        for key, value in values.items():
            setattr(self, key, value)
        self.num_feat_extract_layers = len(self.conv_dim)
'''

MERT_TWIN_MODEL_CODE = '''"""MERT-style model of acepipe's tiny MERT twin: transformers' HuBERT blocks built from
MERTTwinConfig, so (transformers >= 4.48) the positional conv reads config.conv_pos_batch_norm,
which that config lacks."""
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.hubert.modeling_hubert import (HubertEncoder, HubertEncoderStableLayerNorm,
                                                        HubertFeatureEncoder, HubertFeatureProjection)

from .configuration_mert_twin import MERTTwinConfig


class MERTTwinModel(PreTrainedModel):
    config_class = MERTTwinConfig
    base_model_prefix = "mert"
    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__(config)
        self.feature_extractor = HubertFeatureEncoder(config)
        self.feature_projection = HubertFeatureProjection(config)
        self.encoder = (HubertEncoderStableLayerNorm if config.do_stable_layer_norm else HubertEncoder)(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            module.bias.data.zero_()

    def forward(self, input_values, output_attentions=None, output_hidden_states=None, return_dict=None):
        features = self.feature_extractor(input_values).transpose(1, 2)     # (B, N, conv_dim[-1])
        hidden = self.feature_projection(features)                          # (B, N, d)
        out = self.encoder(hidden, output_attentions=bool(output_attentions),
                           output_hidden_states=bool(output_hidden_states), return_dict=True)
        return BaseModelOutput(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                               attentions=out.attentions)
'''


def _ssl_dims(hidden: int, **extra) -> dict:
    """The twins' sizes, with the real extractors' strides (5 * 2^6 = 320 samples per frame):
    75 Hz at 24 kHz, 50 Hz at 16 kHz."""
    return dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
                conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **extra)


def _save_extractor(path: Path, sample_rate: int, twin_of: str) -> None:
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(path)
    (Path(path) / "twin.json").write_text(json.dumps({"twin_of": twin_of}))


def build_tiny_mert(path: Path) -> None:
    """MERT-v1-330M's twin: remote code (above) at 24 kHz. Its weights are a HubertModel's of the
    same blocks, saved on their own so config.json stays MERT-style (no conv_pos_batch_norm)."""
    from safetensors.torch import save_file
    from transformers import HubertConfig, HubertModel

    path = Path(path)
    dims = _ssl_dims(32, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=False)
    (path / "configuration_mert_twin.py").write_text(MERT_TWIN_CONFIG_CODE)
    (path / "modeling_mert_twin.py").write_text(MERT_TWIN_MODEL_CODE)
    config = {"model_type": "mert_twin", "architectures": ["MERTTwinModel"], "sample_rate": 24000,
              "auto_map": {"AutoConfig": "configuration_mert_twin.MERTTwinConfig",
                           "AutoModel": "modeling_mert_twin.MERTTwinModel"}, **dims}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = HubertModel(HubertConfig(**dims, conv_pos_batch_norm=False, mask_time_prob=0.0))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    _save_extractor(path, 24000, "MERT-v1-330M")


def build_tiny_mhubert(path: Path) -> None:
    """mHuBERT-147's twin: a transformers HubertModel at 16 kHz, as the released model is."""
    from transformers import HubertConfig, HubertModel

    config = HubertConfig(**_ssl_dims(24, feat_extract_norm="group", do_stable_layer_norm=False))
    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = HubertModel(config)
    model.save_pretrained(path)
    _save_extractor(path, 16000, "mHuBERT-147")
