"""The synthetic corpus: small, reproducible songs with known facts, plus deliberately bad files.

Not a pipeline stage: it feeds the demo, the tests and the benchmarks. `render_song` turns a
`SongSpec` (tempo, key, scale, structure, timbre, swing, metre, optional vocals) into stereo
audio whose beats, downbeats and sections `song_truth` gives exactly. `generate_corpus` (also
`acepipe synth OUT --n N --seed S`) writes OUT/audio/ (WAV and FLAC, one OGG/Vorbis, one M4A
with ffmpeg, an exact duplicate, 8 kHz and 96 kHz songs, a non-UTF-8 name), OUT/audio/bad/
(one file per rejection kind), OUT/lyrics.parquet (canonical lyrics and distractors) and
OUT/ground_truth.json. Same seed, same bytes.
"""
from __future__ import annotations

import functools
import io
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

from tasks.synth_lyrics import SONG_LYRICS, distractor_lyrics, variant_lyrics

# Essentia's spelling, so a detected key compares with the truth as a string; the other
# spellings are accepted in a SongSpec (pitch_class maps both).
NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
_ENHARMONIC = {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb", "Cb": "B", "Fb": "E",
               "E#": "F", "B#": "C"}
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
# Scale degrees (0-based) of one chord per bar, by section label (others play the verse):
# I-V-vi-IV / i-VI-III-VII verses, cadencing choruses; tonic-heavy so the key is clear.
PROGRESSIONS = {
    "major": {"intro": [0, 0, 3, 4], "verse": [0, 4, 5, 3], "chorus": [3, 4, 0, 0],
              "bridge": [5, 3, 0, 4], "outro": [0, 3, 4, 0]},
    "minor": {"intro": [0, 0, 3, 4], "verse": [0, 5, 2, 6], "chorus": [3, 4, 0, 0],
              "bridge": [5, 6, 0, 0], "outro": [0, 3, 4, 0]},
}
TIMBRES = ("sine", "saw", "organ", "pluck")
VOCAL_OVER_MUSIC_DB = 6.0   # vocals this much louder (RMS) than the accompaniment under them
SR = 44100
TAIL_S = 1.0                # ring-out after the last bar
# Corpus song structures: 14 bars each, so 90-150 BPM stays within 10-40 s.
STRUCTURES = [
    [("intro", 1), ("verse", 4), ("chorus", 4), ("verse", 2), ("chorus", 3)],
    [("intro", 2), ("verse", 4), ("chorus", 2), ("verse", 4), ("chorus", 2)],
    [("verse", 4), ("chorus", 4), ("verse", 2), ("chorus", 2), ("outro", 2)],
]
CORPUS_BPMS = [90, 96, 100, 108, 112, 120, 128, 136, 140, 150]


@dataclass
class SongSpec:
    bpm: float
    key: str                # "A", "F#", "Bb" (or "A#": either spelling)
    scale: str              # "major" | "minor"
    structure: list[tuple[str, float]] = field(default_factory=lambda: [
        ("intro", 1), ("verse", 4), ("chorus", 4), ("verse", 2), ("chorus", 4)])
    timbre: str = "sine"
    swing: float = 0.0      # 0 straight eighths; 1/3 triplet swing (off-beats moved later)
    seed: int = 0
    vocals: np.ndarray | None = None   # mono at the render rate, laid from the first verse
    beats_per_bar: int = 4

    def __post_init__(self):
        pitch_class(self.key)
        if self.scale not in SCALES:
            raise ValueError(f"SongSpec.scale={self.scale!r}: use 'major' or 'minor'")
        if self.timbre not in TIMBRES:
            raise ValueError(f"SongSpec.timbre={self.timbre!r}: use one of {TIMBRES}")
        if not (20 <= self.bpm <= 400 and 0 <= self.swing < 1 and self.beats_per_bar >= 2 and self.structure):
            raise ValueError(f"SongSpec bpm={self.bpm} swing={self.swing} beats_per_bar={self.beats_per_bar} "
                             f"structure={self.structure}: need 20<=bpm<=400, 0<=swing<1, beats_per_bar>=2 "
                             "and at least one (label, bars) section")


def pitch_class(key: str) -> int:
    """0-11 for a key name, either spelling ("A#" and "Bb" are both 10)."""
    name = _ENHARMONIC.get(key, key)
    if name not in NOTE_NAMES:
        raise ValueError(f"unknown key {key!r}: use one of {NOTE_NAMES} or a flat such as 'Bb'")
    return NOTE_NAMES.index(name)


def _vocal_placement(spec: SongSpec, sr: int) -> tuple[int, int, int] | None:
    """(start sample in the song, first and last+1 audible samples of the vocal track)."""
    if spec.vocals is None or not len(spec.vocals):
        return None
    sections = _sections(spec)
    verses = [s["start"] for s in sections if s["label"] == "verse"]
    start = verses[0] if verses else sections[min(1, len(sections) - 1)]["start"]
    audible = np.flatnonzero(np.abs(spec.vocals) > 0.02 * np.abs(spec.vocals).max())
    if not len(audible):
        return None
    return int(round(start * sr)), int(audible[0]), int(audible[-1]) + 1


def _sections(spec: SongSpec) -> list[dict]:
    bar = 60.0 / spec.bpm * spec.beats_per_bar
    sections, t = [], 0.0
    for label, bars in spec.structure:
        sections.append({"label": label, "start": round(t, 4), "end": round(t + bars * bar, 4)})
        t += bars * bar
    return sections


def song_truth(spec: SongSpec, sr: int = SR) -> dict:
    """Exact beat and downbeat times, sections, duration and (with vocals) the sung span, in s."""
    beat = 60.0 / spec.bpm
    n_beats = int(round(sum(b for _, b in spec.structure) * spec.beats_per_bar))
    beats = [round(i * beat, 4) for i in range(n_beats)]
    sections = _sections(spec)
    duration = round(sections[-1]["end"] + TAIL_S, 4)
    place = _vocal_placement(spec, sr)
    vocal_span = None
    if place:
        v0, a, b = place
        vocal_span = [round((v0 + a) / sr, 3), round(min(duration, (v0 + b) / sr), 3)]
    return {"bpm": spec.bpm, "key": spec.key, "scale": spec.scale, "beats": beats,
            "downbeats": beats[:: spec.beats_per_bar], "sections": sections, "duration": duration,
            "beats_per_bar": spec.beats_per_bar, "swing": spec.swing, "vocal_span": vocal_span}


def _midi_hz(m: float) -> float:
    return 440.0 * 2 ** ((m - 69) / 12)


@functools.lru_cache(maxsize=1024)
def _tone(midi: int, n: int, sr: int, timbre: str) -> np.ndarray:
    """One note of n samples: 10 ms attack (2 ms plucked), decay, 5 ms release (no clicks).
    Cached: songs repeat their notes, and synthesis is most of the corpus's time."""
    freq = _midi_hz(midi)
    t = np.arange(n) / sr
    if timbre == "saw":
        x = sum(np.sin(2 * np.pi * k * freq * t) / k for k in range(1, 7))
    elif timbre == "organ":
        x = sum(a * np.sin(2 * np.pi * k * freq * t) for k, a in ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)))
    elif timbre == "pluck":  # upper partials die first, as on a plucked string
        x = sum(np.sin(2 * np.pi * k * freq * t) * np.exp(-(2 + 3 * k) * t) / k for k in range(1, 6))
    else:
        x = np.sin(2 * np.pi * freq * t)
    attack = (0.002 if timbre == "pluck" else 0.01) * sr
    env = np.minimum(1.0, np.arange(n) / attack) * np.exp(-1.5 * t)
    env *= np.minimum(1.0, (n - np.arange(n)) / (0.005 * sr))
    x = (x * env).astype(np.float32)
    x.flags.writeable = False
    return x


def _add(track: np.ndarray, sound: np.ndarray, at_s: float, sr: int) -> None:
    s = int(round(at_s * sr))
    e = min(len(track), s + len(sound))
    if s < e:
        track[s:e] += sound[: e - s]


def _drums(spec: SongSpec, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Kick on beats 1 (accented) and 3, snare on the others, hats on (swung) eighths, a crash
    at each section start: sharp transients exactly on the grid."""
    out = np.zeros(n, np.float32)
    beat = 60.0 / spec.bpm

    def decay(seconds: float, rate: float) -> np.ndarray:
        return np.exp(-np.arange(int(seconds * sr)) / sr * rate)

    tk = np.arange(int(0.25 * sr)) / sr
    kick = (np.sin(2 * np.pi * np.cumsum(50 + 90 * np.exp(-tk * 30)) / sr) * decay(0.25, 12)).astype(np.float32)
    snare = (rng.standard_normal(int(0.18 * sr)) * decay(0.18, 25) * 0.6).astype(np.float32)
    hat = (np.diff(rng.standard_normal(int(0.05 * sr) + 1)) * decay(0.05, 80) * 0.25).astype(np.float32)
    crash = (np.diff(rng.standard_normal(int(1.2 * sr) + 1)) * decay(1.2, 4) * 0.15).astype(np.float32)
    for i, b in enumerate(song_truth(spec)["beats"]):
        pos = i % spec.beats_per_bar
        if pos == 0:
            _add(out, kick, b, sr)
        elif pos == 2 and spec.beats_per_bar == 4:
            _add(out, 0.8 * kick, b, sr)
        else:
            _add(out, snare, b, sr)
        _add(out, hat, b, sr)
        _add(out, 0.7 * hat, b + beat * (0.5 + spec.swing / 2), sr)
    for section in _sections(spec)[1:]:
        _add(out, crash, section["start"], sr)
    return out


def render_stems(spec: SongSpec, sr: int = SR) -> dict[str, np.ndarray]:
    """Mono stems (samples,) before panning and master gain: drums, bass, harmony, melody,
    pad and, when the spec has vocals, vocals placed from the first verse and levelled
    VOCAL_OVER_MUSIC_DB above the sum of the others where they sing."""
    rng = np.random.default_rng(spec.seed)
    truth = song_truth(spec, sr)
    n = int(truth["duration"] * sr)
    scale = SCALES[spec.scale]
    tonic = 60 + pitch_class(spec.key)
    beat = 60.0 / spec.bpm
    bar = beat * spec.beats_per_bar
    harmony, bass, melody = (np.zeros(n, np.float32) for _ in range(3))
    for section in truth["sections"]:
        degrees = PROGRESSIONS[spec.scale].get(section["label"], PROGRESSIONS[spec.scale]["verse"])
        for j in range(int(round((section["end"] - section["start"]) / bar))):
            start = section["start"] + j * bar
            length = int(bar * sr)
            d = degrees[j % len(degrees)]
            chord = [tonic + scale[(d + k) % 7] + 12 * ((d + k) // 7) for k in (0, 2, 4)]
            for m in chord:
                _add(harmony, 0.12 * _tone(m, length, sr, spec.timbre), start, sr)
            for half in range(2):  # bass: root, then root or fifth, on the strong beats
                m = chord[0] - 24 + (7 if half and d != 0 else 0)
                _add(bass, 0.3 * _tone(m, length // 2, sr, "sine"), start + half * bar / 2, sr)
            eighths = [start + q * beat + (beat * (0.5 + spec.swing / 2) if off else 0)
                       for q in range(spec.beats_per_bar) for off in (0, 1)] + [start + bar]
            for q in range(2 * spec.beats_per_bar):
                if q % 2 and rng.random() < 0.25:   # a rest on an off-beat now and then
                    continue
                # chord tones, leaning on the tonic; a passing scale step sometimes
                step = int(rng.choice([0, 2, 4, 0, 7, int(rng.integers(0, 7))]))
                m = tonic + 12 + scale[(d + step) % 7]
                _add(melody, 0.1 * _tone(m, int((eighths[q + 1] - eighths[q]) * sr), sr, spec.timbre),
                     eighths[q], sr)
    # A quiet tonic-triad pad under everything: key and mode are never in doubt.
    t = np.arange(n) / sr
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.5)
    pad = 0.04 * fade * sum(np.sin(2 * np.pi * _midi_hz(tonic - 12 + scale[d]) * t) for d in (0, 2, 4))
    stems = {"drums": _drums(spec, n, sr, rng), "bass": bass, "harmony": harmony, "melody": melody,
             "pad": pad.astype(np.float32)}
    place = _vocal_placement(spec, sr)
    if place is not None:
        v0, a, b = place
        vocals = np.zeros(n, np.float32)
        vocals[v0:v0 + len(spec.vocals)] = spec.vocals[: max(0, n - v0)]
        span = slice(v0 + a, min(n, v0 + b))
        rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-12)  # noqa: E731
        music = sum(stems.values())
        gain = rms(music[span]) * 10 ** (VOCAL_OVER_MUSIC_DB / 20) / rms(vocals[span])
        stems["vocals"] = vocals * np.float32(gain)
    return stems


def render_song(spec: SongSpec, sr: int = SR) -> np.ndarray:
    """(samples, 2) float32 stereo: drums, chords, bass, melody (and vocals if given), peak 0.8."""
    stems = render_stems(spec, sr)
    centre = stems["drums"] + stems["bass"] + stems["pad"] + stems.get("vocals", 0)
    mix = np.stack([centre + 0.9 * stems["harmony"] + 1.1 * stems["melody"],
                    centre + 1.1 * stems["harmony"] + 0.9 * stems["melody"]], axis=1)   # (n, 2)
    return (0.8 * mix / max(1e-6, float(np.abs(mix).max()))).astype(np.float32)


def espeak_vocals(text: str, voice: str, sr: int = SR, speed: int = 140) -> np.ndarray | None:
    """Mono vocals read by espeak-ng at `sr`, or None when espeak-ng or the voice is missing."""
    if shutil.which("espeak-ng") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "v.wav")
        done = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav, text],
                              capture_output=True)
        if done.returncode != 0 or not os.path.exists(wav):   # e.g. a voice this build lacks
            return None
        x, rate = sf.read(wav, dtype="float32")
    x = soxr.resample(x, rate, sr) if rate != sr else x
    return (x / max(1e-6, float(np.abs(x).max()))).astype(np.float32)


def spec_dict(spec: SongSpec) -> dict:
    """A JSON-able view of a spec (without the vocal samples)."""
    d = asdict(spec)
    d.pop("vocals")
    return d


# ---- files --------------------------------------------------------------------------------

def _write(path: bytes, data: bytes) -> None:
    """Write through a bytes path, so names that are not UTF-8 survive."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _float_wav(audio: np.ndarray, sr: int) -> bytes:
    """IEEE-float WAV built by hand: libsndfile adds a PEAK chunk with a timestamp,
    which would make the corpus differ from run to run."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    ch = 1 if audio.ndim == 1 else audio.shape[1]
    le = lambda v, k: int(v).to_bytes(k, "little")  # noqa: E731
    fmt = le(3, 2) + le(ch, 2) + le(sr, 4) + le(sr * ch * 4, 4) + le(ch * 4, 2) + le(32, 2)
    body = b"WAVE" + b"fmt " + le(len(fmt), 4) + fmt + b"data" + le(len(data), 4) + data
    return b"RIFF" + le(len(body), 4) + body


def _encode(audio: np.ndarray, sr: int, fmt: str) -> bytes:
    if fmt in ("wav", "flac"):
        buf = io.BytesIO()
        sf.write(buf, audio, sr, format=fmt.upper(), subtype="PCM_16")
        return buf.getvalue()
    # OGG and M4A through ffmpeg with bitexact flags: libsndfile's OGG writer picks a random
    # stream serial number, so its files differ from run to run.
    codec = ["-c:a", "aac", "-b:a", "128k"] if fmt == "m4a" else ["-c:a", "libvorbis", "-q:a", "4"]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "s.wav"), os.path.join(tmp, f"s.{fmt}")
        sf.write(src, audio, sr, subtype="PCM_16")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", src, *codec, "-fflags", "+bitexact",
                        "-flags:a", "+bitexact", "-map_metadata", "-1", dst], check=True)
        return Path(dst).read_bytes()


FIELDS = ("file", "kind", "expect", "bpm", "key", "scale", "beats", "downbeats", "sections", "vocals",
          "language", "lyric_id", "duration", "sample_rate", "channels", "timbre")


def _row(file: str, kind: str, expect: str, **facts) -> dict:
    """A ground-truth row with every field, null where it does not apply."""
    return {**dict.fromkeys(FIELDS), "file": file, "kind": kind, "expect": expect, **facts}


def _bad_files(bad: Path, sr: int, rng: np.random.Generator) -> list[dict]:
    bad.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(3 * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    rows = []

    def add(name: str, data: bytes, expect: str, **facts):
        _write(os.fsencode(bad / name), data)
        rows.append(_row(f"audio/bad/{name}", "bad", expect, **facts))

    whole = _encode(np.tile(tone, 4), sr, "wav")   # the header still claims all 12 s
    add("truncated.wav", whole[: len(whole) // 2], "truncated", sample_rate=sr, channels=1)
    add("zero-bytes.flac", b"", "empty")
    add("not-audio.wav", b"This is a text file with an audio extension.\n" * 20, "unreadable")
    add("silent.wav", _encode(np.zeros(15 * sr, np.float32), sr, "wav"), "silent",
        duration=15.0, sample_rate=sr, channels=1)
    add("blip-0.2s.wav", _encode(tone[: int(0.2 * sr)], sr, "wav"), "too_short",
        duration=0.2, sample_rate=sr, channels=1)
    eight = np.stack([tone * (0.5 + 0.05 * c) for c in range(8)], axis=1)
    add("eight-channels.wav", _encode(eight, sr, "wav"), "unsupported_channels",
        duration=3.0, sample_rate=sr, channels=8)
    nan = tone.copy()
    nan[rng.integers(0, len(nan), 50)] = np.nan
    add("nan-samples.wav", _float_wav(nan, sr), "non_finite", duration=3.0, sample_rate=sr, channels=1)
    return rows


def _file_plan(i: int, has_ffmpeg: bool) -> tuple[str, int, bytes]:
    """(format, sample rate, name) of corpus song i: the odd cases come first, so any n >= 6
    has them all; the rest alternate FLAC and WAV."""
    plan = {1: ("wav", 8000, b"-8k"), 2: ("ogg", SR, b""), 3: ("flac", 96000, b"-96k"),
            4: ("m4a" if has_ffmpeg else "flac", SR, b""), 5: ("wav", SR, b"-\xff\xfe")}
    fmt, rate, suffix = plan.get(i, (("flac", "wav")[i % 2], SR, b""))
    return fmt, rate, b"song-%03d%s.%s" % (i, suffix, fmt.encode())


def generate_corpus(out_dir: str | Path, n: int = 12, seed: int = 0) -> dict:
    """Write the corpus under out_dir and return its ground truth (also ground_truth.json)."""
    out = Path(out_dir)
    audio_dir = out / "audio"
    if audio_dir.exists():
        # a corpus written before (its ground truth is there) is replaced whole, so no song of a
        # larger earlier corpus stays on disk without ground truth; anything else is not ours
        if not (out / "ground_truth.json").is_file():
            raise FileExistsError(f"{audio_dir} exists and is not a synthetic corpus (no ground_truth.json "
                                  "beside it): choose a new directory")
        shutil.rmtree(audio_dir)
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    has_ffmpeg = shutil.which("ffmpeg") is not None
    rows, sung = [], {}   # sung: SONG_LYRICS index -> lyric_id
    for i in range(n):
        spec = SongSpec(bpm=float(rng.choice(CORPUS_BPMS)), key=NOTE_NAMES[int(rng.integers(0, 12))],
                        scale=("major", "minor")[i % 2], structure=STRUCTURES[i % len(STRUCTURES)],
                        timbre=TIMBRES[i % len(TIMBRES)], seed=seed * 1000 + i,
                        swing=1 / 3 if i % 5 == 4 else 0.0, beats_per_bar=3 if i % 7 == 6 else 4)
        language = lyric_id = None
        if i % 3 != 1:   # a third of the songs are instrumental
            k = len(sung) % len(SONG_LYRICS)
            text = SONG_LYRICS[k]
            spec.vocals = espeak_vocals(text.sung_text(), text.voice, SR)
            if spec.vocals is not None:
                lyric_id = sung.setdefault(k, f"lyr-{k:03d}")
                language = text.language
        audio = render_song(spec, SR)
        fmt, rate, name = _file_plan(i, has_ffmpeg)
        if rate != SR:
            audio = soxr.resample(audio, SR, rate)
        _write(os.fsencode(audio_dir) + b"/" + name, _encode(audio, rate, fmt))
        rel = b"audio/" + name
        truth = song_truth(spec, SR)
        rows.append(_row(rel.decode("utf-8", "backslashreplace"), "song", "ok", **truth,
                         vocals=lyric_id is not None, language=language, lyric_id=lyric_id,
                         sample_rate=rate, channels=2, timbre=spec.timbre, format=fmt,
                         **({} if rel.isascii() else {"file_hex": rel.hex()})))
    if rows:   # a byte-identical copy under another name: the same track_id
        first = rows[0]
        dup = first["file"].replace(".", "-duplicate.", 1)
        shutil.copyfile(out / first["file"], out / dup)
        rows.append({**first, "file": dup, "kind": "duplicate"})
    rows.extend(_bad_files(audio_dir / "bad", SR, rng))

    lyrics = [{"lyric_id": lid, "title": SONG_LYRICS[k].title, "artist": f"Synth Artist {k}",
               "language": SONG_LYRICS[k].language, "lyrics": SONG_LYRICS[k].lyrics} for k, lid in sung.items()]
    for k, text in enumerate(SONG_LYRICS):
        if k not in sung:   # canonical texts no song sings
            lyrics.append({"lyric_id": f"unsung-{k:03d}", "title": text.title, "artist": "Nobody",
                           "language": text.language, "lyrics": text.lyrics})
        elif k < 3:         # near-misses of sung ones
            lyrics.append({"lyric_id": f"var-{k:03d}", "title": text.title, "artist": "Cover Band",
                           "language": text.language, "lyrics": variant_lyrics(text, seed)})
    for j, (lang, title, text) in enumerate(distractor_lyrics(max(10, n), seed)):
        lyrics.append({"lyric_id": f"dis-{j:04d}", "title": title, "artist": "Nobody",
                       "language": lang, "lyrics": text})
    schema = pa.schema([(c, pa.string()) for c in ("lyric_id", "title", "artist", "language", "lyrics")])
    pq.write_table(pa.Table.from_pylist(lyrics, schema=schema), out / "lyrics.parquet")

    truth = {"seed": seed, "n": n, "songs": rows, "lyrics_db": "lyrics.parquet"}
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return truth
