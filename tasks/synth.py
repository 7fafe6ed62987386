"""The synthetic corpus: small, reproducible songs with known facts, plus deliberately bad files.

`acepipe synth OUT --n N --seed S` writes OUT/audio/ (songs in WAV, FLAC, OGG and, with
ffmpeg, M4A; an exact duplicate; odd sample rates; a non-UTF-8 name), OUT/audio/bad/
(truncated, zero-byte, not audio, silent, 0.2 s, 8 channels, NaN samples),
OUT/lyrics.parquet (the canonical lyrics database, with distractors) and
OUT/ground_truth.json (BPM, key, scale, beats, downbeats, sections, vocals, language,
expected outcome of every file). Songs have drums at an exact tempo, chords, bass and a
melody in a known key, a verse/chorus structure, and some have vocals sung by espeak-ng.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr

from tasks.synth_lyrics import SONG_LYRICS, distractor_lyrics, sung_text

NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
MAJOR = [0, 2, 4, 5, 7, 9, 11]
MINOR = [0, 2, 3, 5, 7, 8, 10]
# Scale degrees (0-based) of one chord per bar, by section; tonic-heavy so the key is clear.
PROGRESSIONS = {
    "major": {"intro": [0, 0, 3, 4], "verse": [0, 4, 5, 3], "chorus": [3, 4, 0, 0], "outro": [0, 3, 4, 0]},
    "minor": {"intro": [0, 0, 3, 4], "verse": [0, 5, 2, 6], "chorus": [3, 4, 0, 0], "outro": [0, 3, 4, 0]},
}
TIMBRES = ("sine", "saw", "organ")


@dataclass
class SongSpec:
    bpm: float
    key: str
    scale: str
    structure: list[tuple[str, float]] = field(default_factory=lambda: [
        ("intro", 1), ("verse", 4), ("chorus", 4), ("verse", 2), ("chorus", 4)])
    timbre: str = "sine"
    swing: float = 0.0
    seed: int = 0
    vocals: np.ndarray | None = None   # mono, at the render rate, laid from the first verse
    beats_per_bar: int = 4


def song_truth(spec: SongSpec) -> dict:
    """Exact beat and downbeat times, sections and duration of a spec."""
    beat = 60.0 / spec.bpm
    bars = sum(b for _, b in spec.structure)
    n_beats = int(round(bars * spec.beats_per_bar))
    beats = [round(i * beat, 4) for i in range(n_beats)]
    downbeats = beats[:: spec.beats_per_bar]
    sections, t = [], 0.0
    for label, b in spec.structure:
        end = t + b * spec.beats_per_bar * beat
        sections.append({"label": label, "start": round(t, 4), "end": round(end, 4)})
        t = end
    return {"bpm": spec.bpm, "key": spec.key, "scale": spec.scale, "beats": beats,
            "downbeats": downbeats, "sections": sections, "duration": round(t + 1.0, 4)}


def _midi_hz(m: float) -> float:
    return 440.0 * 2 ** ((m - 69) / 12)


def _tone(freq: float, n: int, sr: int, timbre: str) -> np.ndarray:
    t = np.arange(n) / sr
    if timbre == "saw":
        x = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 7))
    elif timbre == "organ":
        x = np.sin(2 * np.pi * freq * t) + 0.5 * np.sin(4 * np.pi * freq * t) + 0.25 * np.sin(6 * np.pi * freq * t)
    else:
        x = np.sin(2 * np.pi * freq * t)
    env = np.minimum(1.0, np.arange(n) / (0.01 * sr)) * np.exp(-1.5 * t)
    return (x * env).astype(np.float32)


def _drums(spec: SongSpec, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n, np.float32)
    beat = 60.0 / spec.bpm
    k_len, s_len, h_len = int(0.25 * sr), int(0.18 * sr), int(0.05 * sr)
    tk = np.arange(k_len) / sr
    kick = np.sin(2 * np.pi * (50 + 90 * np.exp(-tk * 30)) * tk) * np.exp(-tk * 12)
    snare = rng.standard_normal(s_len) * np.exp(-np.arange(s_len) / sr * 25) * 0.6
    hat = np.diff(rng.standard_normal(h_len + 1)) * np.exp(-np.arange(h_len) / sr * 80) * 0.25
    truth = song_truth(spec)
    for i, b in enumerate(truth["beats"]):
        pos = i % spec.beats_per_bar
        for sample, at in ((kick, b) if pos in (0, 2) else (snare, b),
                           (hat, b), (hat, b + beat * (0.5 + spec.swing / 2))):
            s = int(at * sr)
            e = min(n, s + len(sample))
            if s < n:
                out[s:e] += sample[: e - s]
    return out


def render_song(spec: SongSpec, sr: int = 44100) -> np.ndarray:
    """(samples, 2) float32 stereo: drums, chords, bass and melody (plus vocals if given)."""
    rng = np.random.default_rng(spec.seed)
    truth = song_truth(spec)
    n = int(truth["duration"] * sr)
    scale = MAJOR if spec.scale == "major" else MINOR
    tonic = 60 + NOTE_NAMES.index(spec.key)
    bar = 60.0 / spec.bpm * spec.beats_per_bar
    harmony = np.zeros(n, np.float32)
    bass = np.zeros(n, np.float32)
    melody = np.zeros(n, np.float32)
    for section in truth["sections"]:
        degrees = PROGRESSIONS[spec.scale].get(section["label"], PROGRESSIONS[spec.scale]["verse"])
        bars = int(round((section["end"] - section["start"]) / bar))
        for j in range(bars):
            start = section["start"] + j * bar
            s, length = int(start * sr), int(bar * sr)
            length = min(length, n - s)
            if length <= 0:
                continue
            d = degrees[j % len(degrees)]
            chord = [tonic + scale[(d + k) % 7] + 12 * ((d + k) // 7) for k in (0, 2, 4)]
            for m in chord:
                harmony[s:s + length] += 0.12 * _tone(_midi_hz(m), length, sr, spec.timbre)
            bass[s:s + length] += 0.3 * _tone(_midi_hz(chord[0] - 24), length, sr, "sine")
            eighth = bar / 8
            for q in range(8):  # melody on chord tones and scale steps, tonic-leaning
                choice = rng.choice([0, 2, 4, 0, 7, rng.integers(0, 7)])
                m = tonic + 12 + scale[(d + int(choice)) % 7]
                ms, ml = int((start + q * eighth) * sr), int(eighth * sr)
                ml = min(ml, n - ms)
                if ml > 0:
                    melody[ms:ms + ml] += 0.1 * _tone(_midi_hz(m), ml, sr, spec.timbre)
    drums = _drums(spec, n, sr, rng)
    mix_l = harmony * 0.9 + bass + melody * 1.1 + drums
    mix_r = harmony * 1.1 + bass + melody * 0.9 + drums
    mix = np.stack([mix_l, mix_r], axis=1)
    if spec.vocals is not None:
        v0 = int(truth["sections"][1]["start"] * sr) if len(truth["sections"]) > 1 else 0
        v = spec.vocals[: max(0, n - v0)]
        mix[v0:v0 + len(v)] += 1.6 * v[:, None]
    return (0.8 * mix / max(1e-6, np.abs(mix).max())).astype(np.float32)


def espeak_vocals(text: str, voice: str, sr: int, speed: int = 140) -> np.ndarray | None:
    """Mono vocals sung (read) by espeak-ng at `sr`, or None when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "v.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav, text],
                       check=True, capture_output=True)
        x, rate = sf.read(wav, dtype="float32")
    x = soxr.resample(x, rate, sr) if rate != sr else x
    return (x / max(1e-6, np.abs(x).max())).astype(np.float32)


def _bad_files(bad: Path, sr: int, rng: np.random.Generator) -> list[dict]:
    bad.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(3 * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    files = []

    def add(name: str, expect: str, **facts):
        files.append({"file": f"audio/bad/{name}", "kind": "bad", "expect": expect, **facts})

    sf.write(bad / "truncated.wav", np.tile(tone, 4), sr, subtype="PCM_16")
    data = (bad / "truncated.wav").read_bytes()
    (bad / "truncated.wav").write_bytes(data[: len(data) // 2])
    add("truncated.wav", "truncated")
    (bad / "zero-bytes.flac").write_bytes(b"")
    add("zero-bytes.flac", "empty")
    (bad / "not-audio.wav").write_text("This is a text file with an audio extension.\n" * 20)
    add("not-audio.wav", "unreadable")
    sf.write(bad / "silent.wav", np.zeros(int(15 * sr), np.float32), sr)
    add("silent.wav", "silent", duration=15.0)
    sf.write(bad / "blip-0.2s.wav", tone[: int(0.2 * sr)], sr)
    add("blip-0.2s.wav", "too_short", duration=0.2)
    eight = np.stack([tone * (0.5 + 0.05 * c) for c in range(8)], axis=1)
    sf.write(bad / "eight-channels.wav", eight, sr)
    add("eight-channels.wav", "unsupported_channels", channels=8)
    nan = tone.copy()
    nan[rng.integers(0, len(nan), 50)] = np.nan
    _write_float_wav(bad / "nan-samples.wav", nan, sr)
    add("nan-samples.wav", "non_finite")
    return files


def _write_float_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    """IEEE-float WAV written by hand: libsndfile adds a PEAK chunk with a timestamp,
    which would make the corpus differ from run to run."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    ch = 1 if audio.ndim == 1 else audio.shape[1]
    fmt = (3).to_bytes(2, "little") + ch.to_bytes(2, "little") + sr.to_bytes(4, "little") \
        + (sr * ch * 4).to_bytes(4, "little") + (ch * 4).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    path.write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)


def _write_song(path: Path, audio: np.ndarray, sr: int, fmt: str) -> None:
    if fmt in ("m4a", "ogg") and shutil.which("ffmpeg"):
        # ffmpeg with bitexact: libsndfile's OGG writer picks a random stream serial.
        codec = ["-c:a", "aac", "-b:a", "128k"] if fmt == "m4a" else ["-c:a", "libvorbis", "-q:a", "4"]
        with tempfile.TemporaryDirectory() as tmp:
            wav = os.path.join(tmp, "s.wav")
            sf.write(wav, audio, sr)
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", wav, *codec,
                            "-fflags", "+bitexact", "-flags:a", "+bitexact", "-map_metadata", "-1",
                            str(path)], check=True)
    else:
        sf.write(path, audio, sr, format={"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}[fmt],
                 subtype={"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}[fmt])


def generate_corpus(out_dir: str | Path, n: int = 12, seed: int = 0) -> dict:
    """Write the corpus under out_dir and return its ground truth (also ground_truth.json)."""
    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = 44100
    formats = ["flac", "wav", "ogg", "m4a" if shutil.which("ffmpeg") else "flac", "flac"]
    songs, lyric_rows = [], []
    for i in range(n):
        scale = "major" if i % 2 == 0 else "minor"
        key = NOTE_NAMES[int(rng.integers(0, 12))]
        bpm = float(rng.choice([96, 100, 108, 112, 120, 128, 136, 140]))
        spec = SongSpec(bpm=bpm, key=key, scale=scale, timbre=TIMBRES[i % 3], seed=seed * 1000 + i)
        vocal = i % 2 == 0
        language = lyric_id = None
        if vocal:
            lang, voice, title, lyrics = SONG_LYRICS[(i // 2) % len(SONG_LYRICS)]
            lyric_id = f"lyr-{i:04d}"
            language = lang
            spec.vocals = espeak_vocals(sung_text(lyrics), voice, sr)
            lyric_rows.append({"lyric_id": lyric_id, "title": title, "artist": f"Synth Artist {i}",
                               "language": lang, "lyrics": lyrics})
        audio = render_song(spec, sr)
        fmt = formats[i % len(formats)]
        rate = sr
        name = f"song-{i:03d}.{fmt}"
        if i == 1:  # an odd, low sample rate: valid input, resampled by consumers
            rate, name, fmt = 8000, f"song-{i:03d}-8k.wav", "wav"
        elif i == 3:
            rate, name, fmt = 96000, f"song-{i:03d}-96k.flac", "flac"
        if rate != sr:
            audio = soxr.resample(audio, sr, rate)
        if i == 5:  # a file name that is not UTF-8
            raw = os.fsencode(audio_dir) + f"/song-{i:03d}-".encode() + b"\xff\xfe.wav"
            sf.write(raw, audio, rate)
            rel = "audio/" + os.fsdecode(raw).rsplit("/", 1)[1]
            display = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            extra = {"file_hex": ("audio/" + os.fsdecode(raw).rsplit("/", 1)[1]).encode("utf-8", "surrogateescape").hex()}
            rel = display
        else:
            _write_song(audio_dir / name, audio, rate, fmt)
            rel, extra = f"audio/{name}", {}
        truth = song_truth(spec)
        songs.append({"file": rel, "kind": "song", "expect": "ok", **truth, "vocals": vocal,
                      "language": language, "lyric_id": lyric_id, "sample_rate": rate,
                      "channels": 2, "timbre": spec.timbre, "format": fmt, **extra})
    first = next(s for s in songs if "file_hex" not in s)
    dup_name = "audio/" + Path(first["file"]).stem + "-duplicate" + Path(first["file"]).suffix
    shutil.copyfile(out / first["file"], out / dup_name)
    songs.append({**first, "file": dup_name, "kind": "duplicate"})
    songs.extend(_bad_files(audio_dir / "bad", sr, rng))
    for j, (lang, title, lyrics) in enumerate(distractor_lyrics(max(10, n), seed)):
        lyric_rows.append({"lyric_id": f"dis-{j:04d}", "title": title, "artist": "Nobody",
                           "language": lang, "lyrics": lyrics})
    for lang, _voice, title, lyrics in SONG_LYRICS:  # unsung canonical texts are distractors too
        if not any(r["title"] == title for r in lyric_rows):
            lyric_rows.append({"lyric_id": f"unsung-{lang}", "title": title, "artist": "Nobody",
                               "language": lang, "lyrics": lyrics})
    pq.write_table(pa.Table.from_pylist(lyric_rows), out / "lyrics.parquet")
    fields = ("file", "kind", "expect", "bpm", "key", "scale", "beats", "downbeats", "sections",
              "vocals", "language", "lyric_id", "duration", "sample_rate", "channels", "timbre")
    truth = {"seed": seed, "n": n, "lyrics_db": "lyrics.parquet",
             "songs": [{**{k: s.get(k) for k in fields}, **({"file_hex": s["file_hex"]} if "file_hex" in s else {})}
                       for s in songs]}
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False))
    return truth


def spec_dict(spec: SongSpec) -> dict:
    """A JSON-able view of a spec (without the vocal samples)."""
    d = asdict(spec)
    d.pop("vocals")
    return d
