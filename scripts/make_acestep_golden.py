"""Write tests/fixtures/acestep/acestep_golden.npz: what upstream ACE-Step computes from a fixed input
and our twins' weights, for tests/test_latents_parity.py to compare the latents stage against.

Runs upstream's own code from a checkout (never copied here):
  - acestep/music_dcae/music_dcae_pipeline.py MusicDCAE.encode: the vocoder's log-mel
    (music_log_mel.LogMelSpectrogram), the [-11, 3] -> [-1, 1] mapping, the AutoencoderDC encoder
    and (z - shift_factor) * scale_factor;
  - trainer.py Pipeline.infer_mert_ssl / infer_mhubert_ssl: whole-track normalisation, 5 s / 30 s
    chunks, zero padding, frames kept per chunk. trainer.py imports the whole training stack, so
    the two methods are taken from its syntax tree and run with a stand-in `self` holding our twins.
Upstream needs torchaudio and torchvision, which are not installable here; small stand-ins are
put in sys.modules first: MelScale (librosa.filters.mel(htk=False, norm="slaney"), which equals
torchaudio's slaney/slaney filterbank, applied as torchaudio's MelScale.forward does), Resample
(same-rate only: the identity, which torchaudio also returns), and torchvision's Normalize/Compose.
The trainer's resamplers are the identity here: the REPA inputs are given at 24 / 16 kHz already.

    python scripts/make_acestep_golden.py --upstream /path/to/ACE-Step [--out FILE.npz]
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DCAE_SECONDS, SR = 2.0, 44100
# (sample rate, track lengths in seconds): longer than one chunk (5 s / 30 s) and a shorter second
# track, so normalisation, chunking and the batch's zero padding all matter.
REPA_TRACKS = {"mert": (24000, (7.0, 3.3)), "mhubert": (16000, (31.0, 12.5))}
# The fixture keeps every 2nd mel frame and every 5th feature frame, so it stays a few hundred KB.
IMAGE_STRIDE, FEATURE_STRIDE = 2, 5


def golden_audio(channels: int, samples: int, seed: int) -> np.ndarray:
    """(channels, samples) float32 white noise in [-0.25, 0.25) whose level steps 4x up and down
    along the track. Integer hashing (splitmix64) and power-of-two gains: bit-identical everywhere."""
    i = np.arange(channels * samples, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 40)
    z = i * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    noise = (z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 23) - np.float32(1.0)   # [-1, 1)
    gain = np.where((np.arange(samples) * 7 // samples) % 2 == 0, 0.25, 0.0625).astype(np.float32)
    return noise.reshape(channels, samples) * gain[None, :]


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def rounded_state(module) -> dict[str, np.ndarray]:
    """The module's weights rounded to float16 in place (the fixture stores them in float16)."""
    import torch

    out = {}
    with torch.no_grad():
        for key, value in module.state_dict().items():
            half = value.half()
            value.copy_(half.float())
            out[key] = half.numpy()
    return out


def install_stand_ins() -> None:
    """torchaudio / torchvision modules with just what upstream's music_dcae uses."""
    import librosa
    import torch

    class MelScale(torch.nn.Module):
        def __init__(self, n_mels, sample_rate, f_min, f_max, n_stft, norm, mel_scale):
            super().__init__()
            assert norm == "slaney" and mel_scale == "slaney"
            fb = librosa.filters.mel(sr=sample_rate, n_fft=(n_stft - 1) * 2, n_mels=n_mels, fmin=f_min,
                                     fmax=f_max, htk=False, norm="slaney")            # (n_mels, n_stft)
            self.register_buffer("fb", torch.from_numpy(fb.T.copy()).float())

        def forward(self, spec):                                                   # (..., n_stft, frames)
            return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)

    class Resample(torch.nn.Module):
        def __init__(self, orig_freq, new_freq, **_):
            super().__init__()
            if orig_freq != new_freq:
                raise NotImplementedError("the stand-in Resample only passes same-rate audio through")

        def forward(self, wav):
            return wav

    audio = types.ModuleType("torchaudio")
    audio.transforms = types.ModuleType("torchaudio.transforms")
    audio.transforms.MelScale, audio.transforms.Resample = MelScale, Resample
    vision = types.ModuleType("torchvision")
    vision.transforms = types.ModuleType("torchvision.transforms")
    vision.transforms.Normalize = lambda mean, std: (lambda x: (x - mean) / std)
    vision.transforms.Compose = compose
    sys.modules.update({"torchaudio": audio, "torchaudio.transforms": audio.transforms,
                        "torchvision": vision, "torchvision.transforms": vision.transforms})


def compose(fns):
    def apply(x):
        for f in fns:
            x = f(x)
        return x
    return apply


def trainer_methods(upstream: Path, names: tuple[str, ...]) -> dict:
    """Upstream trainer.py's Pipeline methods `names`, compiled from its source alone."""
    import torch
    import torch.nn.functional as F

    tree = ast.parse((upstream / "trainer.py").read_text())
    pipeline = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pipeline")
    found = [n for n in pipeline.body if isinstance(n, ast.FunctionDef) and n.name in names]
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(upstream / "trainer.py"), "exec"), namespace)
    return {n: namespace[n] for n in names}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", type=Path, required=True, help="an ACE-Step checkout")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/acestep/acestep_golden.npz")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import AutoencoderDC

    from tasks.latents_models import TWIN_SUBFOLDER
    from tasks.models import build_tiny

    torch.set_grad_enabled(False)
    install_stand_ins()
    sys.path.insert(0, str(args.upstream.resolve()))
    from acestep.music_dcae.music_dcae_pipeline import MusicDCAE as UpstreamMusicDCAE
    from acestep.music_dcae.music_vocoder import ADaMoSHiFiGANV1

    fixture: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The DCAE: our twin's weights (rounded to float16), loaded by upstream's MusicDCAE; the
        # vocoder is a small one with upstream's default mel settings (only its mel_transform runs).
        twin = AutoencoderDC.from_pretrained(str(build_tiny("dcae", tmp / "tiny")), subfolder=TWIN_SUBFOLDER)
        for key, value in rounded_state(twin.encoder).items():
            fixture[f"dcae_encoder/{key}"] = value
        twin.save_pretrained(tmp / "dcae")
        vocoder = ADaMoSHiFiGANV1(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8], num_mels=8, upsample_initial_channel=128,
                                  resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))
        vocoder.save_pretrained(tmp / "vocoder")
        upstream = UpstreamMusicDCAE(source_sample_rate=SR, dcae_checkpoint_path=str(tmp / "dcae"),
                                     vocoder_checkpoint_path=str(tmp / "vocoder")).eval()
        images = []
        upstream.dcae.encoder.register_forward_hook(lambda module, inputs, output: images.append(inputs[0]))
        audio = golden_audio(2, int(DCAE_SECONDS * SR), seed=0)
        latents, latent_lengths = upstream.encode(torch.from_numpy(audio)[None], sr=SR)
        fixture.update({"dcae_audio_sha256": np.array(digest(audio)), "dcae_audio_shape": np.array(audio.shape),
                        "dcae_image": images[0][0, ..., ::IMAGE_STRIDE].numpy(),   # (2, 128, F / 2): encoder input
                        "dcae_latents": latents[0].numpy(), "dcae_latent_length": latent_lengths.numpy()})

        # The REPA targets: our twins' weights (rounded), run through upstream trainer's extraction.
        from transformers import AutoConfig, AutoModel

        methods = trainer_methods(args.upstream, ("infer_mert_ssl", "infer_mhubert_ssl"))
        for name, (rate, seconds) in REPA_TRACKS.items():
            path = build_tiny(name, tmp / "tiny")
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
            config.conv_pos_batch_norm = getattr(config, "conv_pos_batch_norm", False)  # as ACE-Step's trainer
            model = AutoModel.from_pretrained(str(path), config=config, trust_remote_code=True).eval()
            for key, value in rounded_state(model).items():
                fixture[f"{name}/{key}"] = value
            tracks = [golden_audio(1, int(s * rate), seed=1 + k)[0] for k, s in enumerate(seconds)]
            batch = torch.zeros(len(tracks), 2, max(len(t) for t in tracks))   # stereo, zero-padded
            for k, t in enumerate(tracks):
                batch[k, :, :len(t)] = torch.from_numpy(t)
            factor = 2 if name == "mert" else 3          # the trainer's wav_lengths are at 48 kHz
            pipeline = types.SimpleNamespace(**{f"resampler_{name}": lambda x: x,
                                            "mert_model" if name == "mert" else "hubert_model": model})
            feats = methods[f"infer_{name}_ssl"](pipeline, batch, torch.tensor([factor * len(t) for t in tracks]))
            fixture[f"{name}_audio_sha256"] = np.array([digest(t) for t in tracks])
            fixture[f"{name}_audio_samples"] = np.array([len(t) for t in tracks])
            for k, f in enumerate(feats):
                fixture[f"{name}_frames_{k}"] = np.array(f.shape[0])
                fixture[f"{name}_features_{k}"] = f[::FEATURE_STRIDE].numpy()
    fixture["image_stride"], fixture["feature_stride"] = np.array(IMAGE_STRIDE), np.array(FEATURE_STRIDE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **fixture)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KiB, {len(fixture)} arrays")


if __name__ == "__main__":
    main()
