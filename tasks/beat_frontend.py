"""Beat This's log-mel front end, in plain torch (the package's own one needs torchaudio).

The definition is the reference's: mono 22050 Hz, periodic Hann STFT (n_fft 1024, hop 441,
centred with reflect padding, scaled by 1/sqrt(n_fft) as torch.stft(normalized=True) does),
magnitude, 128 triangular mel bands on the Slaney scale from 30 to 11000 Hz without area
normalisation, then log1p(1000 x). 50 frames per second. Used by tasks/rhythm.py for the
beat tracker, and its frames feed the onset envelope and the structure features too.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SAMPLE_RATE = 22050
N_FFT = 1024
HOP = 441
N_MELS = 128
F_MIN = 30.0
F_MAX = 11000.0
LOG_MULTIPLIER = 1000.0
FPS = SAMPLE_RATE / HOP   # 50.0

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < _MIN_LOG_HZ, f / _F_SP,
                    _MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / _MIN_LOG_HZ) / _LOGSTEP)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < _MIN_LOG_MEL, m * _F_SP, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)))


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) triangular filters, peak 1, Slaney mel spacing."""
    fft_hz = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    widths = np.diff(edges)                                                          # (n_mels + 1,)
    ramps = edges[None, :] - fft_hz[:, None]                                         # (F, n_mels + 2)
    rising = -ramps[:, :-2] / widths[:-1]
    falling = ramps[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))                              # (F, n_mels)


class LogMelSpect(torch.nn.Module):
    """(samples,) mono waveform at 22050 Hz -> (frames, 128) log-mel, frames = 1 + samples // 441."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT, periodic=True), persistent=False)
        self.register_buffer("mel_fb", torch.from_numpy(mel_filterbank()).float(), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.shape[-1] <= N_FFT // 2:  # reflect padding needs more samples than half a frame
            wav = torch.nn.functional.pad(wav, (0, N_FFT // 2 + 1 - wav.shape[-1]))
        spec = torch.stft(wav, N_FFT, hop_length=HOP, win_length=N_FFT, window=self.window,
                          center=True, pad_mode="reflect", normalized=True, onesided=True,
                          return_complex=True).abs()          # (513, T)
        mel = self.mel_fb.T @ spec                            # (128, T)
        return torch.log1p(LOG_MULTIPLIER * mel).T            # (T, 128)


def onset_envelope(spect: np.ndarray) -> np.ndarray:
    """(T,) spectral flux of a (T, 128) log-mel: summed positive band differences, frame 0 = 0."""
    flux = np.maximum(0.0, np.diff(spect, axis=0)).sum(axis=1)
    return np.concatenate([[0.0], flux]).astype(np.float32)
