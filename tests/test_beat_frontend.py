"""Our torch log-mel front end against an independent computation of Beat This's definition
(librosa's Slaney mel filters and STFT), and the onset envelope it feeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.beat_frontend import HOP, LogMelSpect, mel_filterbank, onset_envelope

librosa = pytest.importorskip("librosa")


def test_mel_filters_equal_librosa_slaney_unnormalised():
    ours = mel_filterbank()
    ref = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=128, fmin=30, fmax=11000, htk=False, norm=None).T
    assert ours.shape == (513, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("seconds", [0.3, 3.0])
def test_log_mel_equals_librosa_reference(seconds):
    rng = np.random.default_rng(0)
    t = np.arange(int(22050 * seconds)) / 22050
    wav = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    ours = LogMelSpect()(torch.from_numpy(wav)).numpy()
    # magnitude STFT, periodic Hann, centred with reflect padding, scaled by 1/sqrt(n_fft)
    mag = np.abs(librosa.stft(wav.astype(np.float64), n_fft=1024, hop_length=441, window="hann",
                              center=True, pad_mode="reflect")) / np.sqrt(1024)
    fb = librosa.filters.mel(sr=22050, n_fft=1024, n_mels=128, fmin=30, fmax=11000, htk=False, norm=None)
    ref = np.log1p(1000 * (fb @ mag)).T
    assert ours.shape == ref.shape == (1 + len(wav) // HOP, 128)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_very_short_input_gives_frames_not_an_error():
    assert LogMelSpect()(torch.zeros(100)).shape[1] == 128


def test_onset_envelope_peaks_at_clicks():
    wav = np.zeros(22050 * 2, np.float32)
    for at in (0.5, 1.0, 1.5):
        wav[int(at * 22050):int(at * 22050) + 200] = 0.8
    env = onset_envelope(LogMelSpect()(torch.from_numpy(wav)).numpy())
    peaks = sorted(np.argsort(env)[-3:])
    assert [round(p / 50, 1) for p in peaks] == [0.5, 1.0, 1.5]
