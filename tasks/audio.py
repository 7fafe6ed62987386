"""The one audio loader: decode (soundfile, ffmpeg fallback), guard, down-mix, resample (soxr).

Every stage reads audio through `load`. Decoded audio is kept in a small per-process
cache, so stages that run one after another in the same worker decode a file once and
resample it per consumer (16 kHz for Aesthetics and Whisper, 22.05 kHz for Beat This,
44.1 kHz for the DCAE, ...). Failures raise AudioError whose `reason` is a code from
schemas.common.REASONS plus a detail a person can act on.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from schemas.config import AudioConfig

PathLike = str | bytes | os.PathLike


class AudioError(Exception):
    """A track the loader refuses; `code` is one of schemas.common.REASONS."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True)
class AudioInfo:
    duration: float
    sample_rate: int
    channels: int
    frames: int
    codec: str


def display_path(path: PathLike) -> str:
    """A printable form of a path whose bytes may not be UTF-8."""
    if isinstance(path, bytes):
        return path.decode("utf-8", errors="backslashreplace")
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_url(path: PathLike) -> bool:
    text = display_path(path)
    return "://" in text and not text.startswith("file://")


def _open_bytes(path: PathLike) -> bytes:
    import fsspec

    with fsspec.open(display_path(path), "rb") as fh:
        return fh.read()


def _source(path: PathLike):
    """What soundfile can open: local path bytes (non-UTF-8 names survive) or an in-memory
    file for remote URLs."""
    if _is_url(path):
        return io.BytesIO(_open_bytes(path))
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    return os.fsencode(path)


def _riff_shortfall(path: PathLike) -> int:
    """Bytes a RIFF/WAVE file's data chunk claims beyond the end of the file.

    libsndfile silently clamps a cut WAV to what is there, so a truncated upload would
    pass as a shorter song; the header's declared size is the only witness.
    """
    if _is_url(path):
        return 0
    src = _source(path)
    with open(src, "rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return 0
        size = os.path.getsize(src)
        while True:
            chunk = fh.read(8)
            if len(chunk) < 8:
                return 0
            cid, clen = chunk[:4], int.from_bytes(chunk[4:], "little")
            if cid == b"data":
                return max(0, fh.tell() + clen - size) if clen != 0xFFFFFFFF else 0
            fh.seek(clen + (clen & 1), 1)


def _ffprobe(path: PathLike, ffmpeg: str) -> AudioInfo:
    ffprobe = ffmpeg[:-6] + "ffprobe" if ffmpeg.endswith("ffmpeg") else "ffprobe"
    cmd = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries",
           "stream=codec_name,sample_rate,channels,duration:format=duration",
           "-of", "json"]
    data = None
    if _is_url(path):
        data = _open_bytes(path)
        cmd.append("pipe:0")
    else:
        cmd.append(os.fsencode(_source(path)))
    try:
        out = subprocess.run(cmd, input=data, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise AudioError("unreadable", f"soundfile cannot read it and {ffprobe} is not installed") from None
    if out.returncode != 0:
        raise AudioError("unreadable", f"not a decodable audio file ({out.stderr.decode(errors='replace').strip()[:160] or 'ffprobe failed'})")
    meta = json.loads(out.stdout or b"{}")
    streams = meta.get("streams") or []
    if not streams:
        raise AudioError("unreadable", "the container has no audio stream")
    st = streams[0]
    duration = float(st.get("duration") or meta.get("format", {}).get("duration") or 0.0)
    sr = int(st.get("sample_rate") or 0)
    return AudioInfo(duration, sr, int(st.get("channels") or 0), int(round(duration * sr)),
                     str(st.get("codec_name") or "unknown"))


def probe(path: PathLike, cfg: AudioConfig | None = None) -> AudioInfo:
    """Header facts without decoding the audio. Raises AudioError('unreadable'|'empty')."""
    cfg = cfg or AudioConfig()
    if not _is_url(path):
        try:
            size = os.path.getsize(_source(path))
        except OSError as exc:
            raise AudioError("unreadable", f"cannot stat the file ({exc.strerror})") from None
        if size == 0:
            raise AudioError("empty", "the file has zero bytes")
    try:
        info = sf.info(_source(path))
        result = AudioInfo(float(info.duration), int(info.samplerate), int(info.channels),
                           int(info.frames), f"{info.format}/{info.subtype}".lower())
    except (sf.LibsndfileError, RuntimeError, TypeError):
        result = _ffprobe(path, cfg.ffmpeg)
    if result.frames <= 0 or result.sample_rate <= 0:
        raise AudioError("empty", "the file holds no audio frames")
    missing = _riff_shortfall(path) if result.codec.startswith("wav") else 0
    if missing:
        raise AudioError("truncated", f"the WAV header declares {missing} more bytes of audio "
                         "than the file holds (an interrupted copy or upload); re-fetch the file")
    return result


def _decode_ffmpeg(path: PathLike, cfg: AudioConfig, info: AudioInfo,
                   offset_s: float, duration_s: float | None) -> np.ndarray:
    cmd = [cfg.ffmpeg, "-v", "error", "-nostdin"]
    if offset_s:
        cmd += ["-ss", f"{offset_s:.6f}"]
    data = None
    if _is_url(path):
        data = _open_bytes(path)
        cmd += ["-i", "pipe:0"]
    else:
        cmd += ["-i", os.fsencode(_source(path))]
    if duration_s is not None:
        cmd += ["-t", f"{duration_s:.6f}"]
    cmd += ["-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(info.channels),
            "-ar", str(info.sample_rate), "pipe:1"]
    out = subprocess.run(cmd, input=data, capture_output=True, timeout=600)
    if out.returncode != 0:
        raise AudioError("truncated", f"ffmpeg failed mid-stream ({out.stderr.decode(errors='replace').strip()[:160]})")
    return np.frombuffer(out.stdout, dtype=np.float32).reshape(-1, info.channels)


def _decode(path: PathLike, cfg: AudioConfig, info: AudioInfo,
            offset_s: float, duration_s: float | None) -> np.ndarray:
    """(frames, channels) float32 at the native rate; reads only the window asked for."""
    if info.codec.startswith(("wav", "flac", "ogg", "aiff", "mp3", "w64", "caf")):
        start = int(round(offset_s * info.sample_rate))
        stop = None if duration_s is None else start + int(round(duration_s * info.sample_rate))
        try:
            audio, _ = sf.read(_source(path), start=start, stop=stop, dtype="float32",
                               always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioError("truncated", f"decoding stopped early ({exc})") from None
    else:
        audio = _decode_ffmpeg(path, cfg, info, offset_s, duration_s)
    expected = info.frames - int(round(offset_s * info.sample_rate))
    if duration_s is not None:
        expected = min(expected, int(round(duration_s * info.sample_rate)))
    # libsndfile returns short reads silently for a cut file: compare with the header.
    if expected > 0 and len(audio) < 0.98 * expected - info.sample_rate * 0.05:
        raise AudioError("truncated", f"header says {expected / info.sample_rate:.2f} s, "
                         f"only {len(audio) / info.sample_rate:.2f} s could be decoded")
    return audio


class _DecodeCache:
    """Bytes-bounded LRU of native-rate decodes, shared by the stages of one process."""

    def __init__(self) -> None:
        self._items: OrderedDict[tuple, tuple[np.ndarray, AudioInfo]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return item

    def put(self, key: tuple, item: tuple[np.ndarray, AudioInfo], limit: int) -> None:
        size = item[0].nbytes
        if size > limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self._bytes += size
            while self._bytes > limit:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


DECODE_CACHE = _DecodeCache()


def _check_layout(info: AudioInfo, cfg: AudioConfig) -> None:
    if info.channels not in cfg.allowed_channels:
        raise AudioError("unsupported_channels", f"{info.channels} channels; allowed: "
                         f"{cfg.allowed_channels} (set audio.allowed_channels to accept it)")
    if info.duration < cfg.min_duration_s:
        raise AudioError("too_short", f"{info.duration:.2f} s < audio.min_duration_s={cfg.min_duration_s}")
    if info.duration > cfg.max_duration_s:
        raise AudioError("too_long", f"{info.duration:.1f} s > audio.max_duration_s={cfg.max_duration_s}")


def check_samples(audio: np.ndarray, cfg: AudioConfig) -> tuple[float, float]:
    """Raise on NaN/Inf or digital silence; return (peak_dbfs, rms_dbfs)."""
    if audio.size == 0:
        raise AudioError("empty", "no samples were decoded")
    finite = np.isfinite(audio)
    if not finite.all():
        bad = int((~finite).sum())
        raise AudioError("non_finite", f"{bad} of {audio.size} samples are NaN or Inf")
    peak = float(np.max(np.abs(audio)))
    peak_db = 20 * np.log10(max(peak, 1e-12))
    if peak_db < cfg.silence_dbfs:
        raise AudioError("silent", f"peak {peak_db:.1f} dBFS < audio.silence_dbfs={cfg.silence_dbfs}")
    rms_db = 10 * np.log10(max(float(np.mean(np.square(audio, dtype=np.float64))), 1e-24))
    return peak_db, rms_db


# ITU-R BS.775 down-mix of 5.1 (L R C LFE Ls Rs) to stereo; LFE is dropped.
_DOWNMIX_51 = np.array([[1, 0], [0, 1], [0.7071, 0.7071], [0, 0], [0.7071, 0], [0, 0.7071]],
                       dtype=np.float32)


def remix(audio: np.ndarray, channels: int) -> np.ndarray:
    """(frames, C) -> (frames, channels) for channels 1 or 2 (mono, stereo, 5.1 in)."""
    if audio.shape[1] == 6:
        audio = audio @ _DOWNMIX_51
    if channels == 1:
        return audio.mean(axis=1, keepdims=True)
    if channels == 2:
        if audio.shape[1] == 1:
            return np.repeat(audio, 2, axis=1)
        return audio[:, :2]
    raise ValueError(f"remix to {channels} channels is not supported (1 or 2)")


def _stamp(path: PathLike) -> tuple[int, int] | None:
    """(size, mtime) of a local file, so a file replaced after its first decode is decoded
    again instead of served from the cache; None for remote URLs (objects there are immutable
    in practice, and a stat would cost a round trip)."""
    if _is_url(path):
        return None
    try:
        st = os.stat(_source(path))
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def load(path: PathLike, sr: int, channels: int = 1, cfg: AudioConfig | None = None,
         offset_s: float = 0.0, duration_s: float | None = None,
         info: AudioInfo | None = None) -> np.ndarray:
    """Decode, guard, down-mix and resample: float32 array of shape (channels, samples).

    With `duration_s`, only that window is decoded where the format allows. Raises
    AudioError with a reason code on every refusal.
    """
    cfg = cfg or AudioConfig()
    info = info or probe(path, cfg)
    _check_layout(info, cfg)
    key = (os.fsencode(path) if not isinstance(path, bytes) else path, _stamp(path), offset_s, duration_s)
    cached = DECODE_CACHE.get(key)
    if cached is None:
        native = _decode(path, cfg, info, offset_s, duration_s)
        check_samples(native, cfg)
        DECODE_CACHE.put(key, (native, info), cfg.cache_mb * 2**20)
    else:
        native = cached[0]
    mixed = remix(native, channels)
    if info.sample_rate != sr:
        mixed = soxr.resample(mixed, info.sample_rate, sr, quality="HQ")
    return np.ascontiguousarray(mixed.T, dtype=np.float32)


def info_of(track: dict) -> AudioInfo:
    """The AudioInfo of a catalog row (so stages do not probe the file again)."""
    sr = int(track["sample_rate"])
    return AudioInfo(float(track["duration"]), sr, int(track["channels"]),
                     int(round(float(track["duration"]) * sr)), str(track["codec"]))


def load_track(track: dict, sr: int, channels: int = 1, cfg: AudioConfig | None = None,
               offset_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """`load` for a catalog row: what every stage calls."""
    return load(track["uri_raw"], sr, channels, cfg, offset_s, duration_s, info=info_of(track))
