"""The one audio loader on every kind of bad input, plus down-mix, resampling and windows."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from schemas.config import AudioConfig
from tasks import audio
from tasks.audio import AudioError

SR = 22050


def tone(seconds, sr=SR, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1)


@pytest.fixture
def cfg():
    return AudioConfig(min_duration_s=1.0, max_duration_s=60.0)


def reason_of(path, cfg, **kw):
    with pytest.raises(AudioError) as err:
        audio.load(path, 16000, 1, cfg, **kw)
    return err.value.code


def test_good_file_is_resampled_to_the_consumer_rate(tmp_path, cfg):
    p = tmp_path / "a.flac"
    sf.write(p, tone(2.0), SR)
    x = audio.load(str(p), 16000, 1, cfg)
    assert x.shape == (1, 32000)
    # soxr keeps the tone: the spectrum peaks at 440 Hz
    spec = np.abs(np.fft.rfft(x[0]))
    assert abs(np.argmax(spec) * 16000 / len(x[0]) - 440) < 2


@pytest.mark.parametrize("rate", [8000, 96000])
def test_odd_sample_rates_are_accepted(tmp_path, cfg, rate):
    p = tmp_path / f"r{rate}.wav"
    sf.write(p, tone(1.5, sr=rate), rate)
    assert audio.load(str(p), 44100, 2, cfg).shape == (2, int(1.5 * 44100))


def test_zero_byte_file_is_empty(tmp_path, cfg):
    p = tmp_path / "z.wav"
    p.write_bytes(b"")
    assert reason_of(str(p), cfg) == "empty"


def test_text_file_is_unreadable(tmp_path, cfg):
    p = tmp_path / "t.wav"
    p.write_text("this is not audio\n" * 50)
    assert reason_of(str(p), cfg) == "unreadable"


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_truncated_file_is_detected(tmp_path, cfg, ext):
    p = tmp_path / f"cut.{ext}"
    sf.write(p, tone(4.0) + 0.01 * np.random.default_rng(0).standard_normal((4 * SR, 1)), SR)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])  # header still claims 4 s
    assert reason_of(str(p), cfg) == "truncated"


def test_too_short_and_too_long(tmp_path, cfg):
    short = tmp_path / "s.wav"
    sf.write(short, tone(0.2), SR)
    assert reason_of(str(short), cfg) == "too_short"
    long = tmp_path / "l.wav"
    sf.write(long, tone(3.0), SR)
    assert reason_of(str(long), AudioConfig(max_duration_s=2.0)) == "too_long"


def test_digital_silence(tmp_path, cfg):
    p = tmp_path / "sil.wav"
    sf.write(p, np.zeros((SR * 2, 1), np.float32), SR)
    assert reason_of(str(p), cfg) == "silent"


def test_nan_samples(tmp_path, cfg):
    p = tmp_path / "nan.wav"
    x = tone(2.0)
    x[100:200] = np.nan
    sf.write(p, x, SR, subtype="FLOAT")
    assert reason_of(str(p), cfg) == "non_finite"


def test_eight_channels_are_unsupported_but_5_1_is_downmixed(tmp_path, cfg):
    p8 = tmp_path / "c8.wav"
    sf.write(p8, tone(1.5, channels=8), SR)
    assert reason_of(str(p8), cfg) == "unsupported_channels"
    p6 = tmp_path / "c6.wav"
    x = np.zeros((int(1.5 * SR), 6), np.float32)
    x[:, 2] = tone(1.5)[:, 0]  # centre channel only
    sf.write(p6, x, SR)
    st = audio.load(str(p6), SR, 2, cfg)
    assert st.shape[0] == 2 and np.allclose(st[0], st[1]) and np.abs(st).max() > 0.2


def test_reason_strings_say_what_to_change(tmp_path, cfg):
    p = tmp_path / "s.wav"
    sf.write(p, tone(0.2), SR)
    with pytest.raises(AudioError) as err:
        audio.load(str(p), 16000, 1, cfg)
    assert "audio.min_duration_s" in err.value.reason


def test_window_load_decodes_only_the_window(tmp_path, cfg):
    p = tmp_path / "w.wav"
    x = np.concatenate([tone(2.0, freq=220), tone(2.0, freq=880)])
    sf.write(p, x, SR)
    win = audio.load(str(p), SR, 1, cfg, offset_s=2.0, duration_s=1.0)
    assert win.shape == (1, SR)
    spec = np.abs(np.fft.rfft(win[0]))
    assert abs(np.argmax(spec) * SR / win.shape[1] - 880) < 3


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")
def test_ffmpeg_fallback_reads_aac(tmp_path, cfg):
    wav = tmp_path / "src.wav"
    sf.write(wav, tone(2.0, sr=44100, channels=2), 44100)
    m4a = tmp_path / "a.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    info = audio.probe(str(m4a))
    assert info.codec == "aac" and info.channels == 2
    x = audio.load(str(m4a), 16000, 1, cfg)
    assert abs(x.shape[1] - 32000) < 16000 * 0.1


def test_non_utf8_path(tmp_path, cfg):
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.wav"
    sf.write(raw, tone(1.5), SR)
    assert audio.load(raw, 16000, 1, cfg).shape == (1, 24000)
    assert "\\x" in audio.display_path(raw)


def test_decode_cache_serves_a_second_consumer(tmp_path, cfg):
    p = tmp_path / "c.wav"
    sf.write(p, tone(2.0), SR)
    audio.DECODE_CACHE.clear()
    audio.load(str(p), 16000, 1, cfg)
    misses = audio.DECODE_CACHE.misses
    audio.load(str(p), 44100, 2, cfg)
    assert audio.DECODE_CACHE.misses == misses  # second rate came from the cached decode


def test_a_file_replaced_after_its_first_decode_is_decoded_again(tmp_path, cfg):
    p = tmp_path / "r.wav"
    sf.write(p, tone(2.0, freq=440.0), SR)
    audio.DECODE_CACHE.clear()
    first = audio.load(str(p), SR, 1, cfg)
    sf.write(p, tone(2.5, freq=880.0), SR)            # same path, new content
    os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
    second = audio.load(str(p), SR, 1, cfg)
    assert second.shape[1] == int(2.5 * SR) != first.shape[1]
