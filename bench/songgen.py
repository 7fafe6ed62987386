"""A wide generator of songs with a known key and tempo, for bench/rhythm.py and the rhythm tests.

tasks/synth.py's songs are built for the demo: a tonic-triad pad under every bar makes their key
trivial. These songs are harder and closer to pop: many progressions per mode (the minor ones
with a natural v, a harmonic-minor V with its raised leading tone, the Andalusian cadence,
Dorian and Mixolydian mixture, songs that start off the tonic), voicings in close and open
position with inversions, a bass line, a melody that takes the leading tone over a major V,
several drum grooves (or none), timbres, detuning, tempi 60-180 BPM (more of them near the
ends, where the metrical level is ambiguous), 3/4 and 4/4, lengths of 20-60 s and several
file formats. Every song cadences on its tonic at the end, as songs do.

`song_specs(n, seed, held_out)`: the tuning set draws from TUNING pools only; `held_out=True`
also draws from HELD_OUT pools (progressions, a timbre, a groove and a format) that the
method was never tuned on, and always uses at least one of them per song.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

NOTE_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
QUALITIES = {"M": (0, 4, 7), "m": (0, 3, 7), "dim": (0, 3, 6), "7": (0, 4, 7, 10), "m7": (0, 3, 7, 10),
             "maj7": (0, 4, 7, 11), "sus4": (0, 5, 7)}
# (semitones above the tonic, quality) per chord; one chord per bar (two with fast harmonic rhythm).
PROGRESSIONS = {
    "major": {
        "I-V-vi-IV": [(0, "M"), (7, "M"), (9, "m"), (5, "M")],
        "I-IV-V-I": [(0, "M"), (5, "M"), (7, "M"), (0, "M")],
        "I-vi-IV-V": [(0, "M"), (9, "m"), (5, "M"), (7, "M")],
        "vi-IV-I-V": [(9, "m"), (5, "M"), (0, "M"), (7, "M")],
        "ii7-V7-Imaj7": [(2, "m7"), (7, "7"), (0, "maj7"), (0, "maj7")],
        "I-bVII-IV-I": [(0, "M"), (10, "M"), (5, "M"), (0, "M")],          # Mixolydian mixture
        "I-iv-I-V": [(0, "M"), (5, "m"), (0, "M"), (7, "M")],              # minor iv borrowed
        "I-IV-bVI-bVII": [(0, "M"), (5, "M"), (8, "M"), (10, "M")],        # mixture from the minor
    },
    "minor": {
        "i-VI-III-VII": [(0, "m"), (8, "M"), (3, "M"), (10, "M")],
        "i-iv-v-i": [(0, "m"), (5, "m"), (7, "m"), (0, "m")],              # natural minor, no leading tone
        "i-VI-iv-V": [(0, "m"), (8, "M"), (5, "m"), (7, "M")],             # harmonic-minor dominant
        "i-iv-V7-i": [(0, "m"), (5, "m"), (7, "7"), (0, "m")],
        "i-VII-VI-V": [(0, "m"), (10, "M"), (8, "M"), (7, "M")],           # Andalusian cadence
        "i-III-VII-iv": [(0, "m"), (3, "M"), (10, "M"), (5, "m")],
        "VI-VII-i-i": [(8, "M"), (10, "M"), (0, "m"), (0, "m")],           # starts off the tonic
        "i-iidim-V-i": [(0, "m"), (2, "dim"), (7, "M"), (0, "m")],
        "i-IV-i-VII": [(0, "m"), (5, "M"), (0, "m"), (10, "M")],           # Dorian IV
    },
}
HELD_OUT_PROGRESSIONS = {
    "major": {"I-iii-IV-V": [(0, "M"), (4, "m"), (5, "M"), (7, "M")],
              "IV-V-iii-vi": [(5, "M"), (7, "M"), (4, "m"), (9, "m")]},
    "minor": {"i-VII-VI-VII": [(0, "m"), (10, "M"), (8, "M"), (10, "M")],
              "i-III-iv-V": [(0, "m"), (3, "M"), (5, "m"), (7, "M")]},
}
TIMBRES = ("sine", "saw", "square", "organ", "pluck", "strings", "piano")
HELD_OUT_TIMBRES = ("epiano",)
GROOVES = ("none", "rock", "four_floor", "shuffle", "sixteenths")
HELD_OUT_GROOVES = ("breakbeat",)
FORMATS = ("wav", "flac48", "ogg")
HELD_OUT_FORMATS = ("mp3",)
VOICINGS = ("close", "inversions", "open")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
TAIL_S = 1.5


@dataclass
class GenSong:
    bpm: float
    tonic: int                 # pitch class, C = 0
    scale: str                 # major | minor
    progression: str
    timbre: str
    groove: str
    voicing: str
    beats_per_bar: int
    bars: int
    chords_per_bar: int
    melody: bool
    detune_cents: float
    fmt: str
    seed: int

    @property
    def key(self) -> str:
        return NOTE_NAMES[self.tonic]

    def truth(self) -> dict:
        duration = self.bars * self.beats_per_bar * 60.0 / self.bpm + TAIL_S
        return {"bpm": self.bpm, "key": self.key, "scale": self.scale, "duration": duration,
                "beats_per_bar": self.beats_per_bar, "sections": [{"start": 0.0}],
                "progression": self.progression, "timbre": self.timbre, "groove": self.groove}


def song_specs(n: int, seed: int, held_out: bool = False) -> list[GenSong]:
    """n songs; every key and mode in turn (24 per cycle), the rest drawn at random."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        scale = ("major", "minor")[(i // 12) % 2]
        tonic = (i * 7 + (i // 24) * 5) % 12      # the circle of fifths, shifted each cycle
        progs = dict(PROGRESSIONS[scale])
        timbres, grooves, formats = TIMBRES, GROOVES, FORMATS
        if held_out:
            progs.update(HELD_OUT_PROGRESSIONS[scale])
            timbres, grooves, formats = TIMBRES + HELD_OUT_TIMBRES, GROOVES + HELD_OUT_GROOVES, \
                FORMATS + HELD_OUT_FORMATS
        names = sorted(progs)
        if held_out and i % 2 == 0:   # half the held-out songs use an unseen progression
            names = sorted(HELD_OUT_PROGRESSIONS[scale])
        r = rng.random()
        bpm = float(rng.uniform(60, 76) if r < 0.2 else rng.uniform(160, 180) if r < 0.35
                    else rng.uniform(76, 160))
        beats_per_bar = 3 if rng.random() < 0.15 else 4
        specs.append(GenSong(
            bpm=round(bpm, 1), tonic=tonic, scale=scale, progression=str(rng.choice(names)),
            timbre=str(rng.choice(HELD_OUT_TIMBRES if held_out and i % 4 == 1 else timbres)),
            groove=str(rng.choice(HELD_OUT_GROOVES if held_out and i % 4 == 3 else grooves)),
            voicing=str(rng.choice(VOICINGS)), beats_per_bar=beats_per_bar,
            bars=int(rng.integers(10, 22)), chords_per_bar=2 if rng.random() < 0.15 and bpm < 110 else 1,
            melody=bool(rng.random() < 0.8), detune_cents=float(rng.uniform(-25 if held_out else -15,
                                                                              25 if held_out else 15)),
            fmt=str(rng.choice(formats)), seed=seed * 10007 + i))
    return specs


# ---- synthesis ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _note(midi: float, n: int, sr: int, timbre: str) -> np.ndarray:
    f = 440.0 * 2 ** ((midi - 69) / 12)
    t = np.arange(n) / sr
    ks = np.arange(1, 13)
    ks = ks[ks * f < 0.45 * sr]
    decay = np.ones_like(ks, float) * 1.5
    if timbre == "sine":
        amp = (ks == 1).astype(float)
    elif timbre == "saw":
        amp = 1.0 / ks
    elif timbre == "square":
        amp = (ks % 2) / ks
    elif timbre == "organ":
        amp = np.where(np.isin(ks, (1, 2, 3, 4, 6, 8)), 1.0 / ks, 0.0)
    elif timbre == "pluck":
        amp, decay = 1.0 / ks, 2 + 3 * ks
    elif timbre == "strings":
        amp, decay = 1.0 / ks, np.full(len(ks), 0.3)
    elif timbre == "piano":
        amp, decay = 1.0 / ks ** 1.3, 1.5 + 1.2 * ks
    else:  # epiano: a two-operator FM tine
        index = 1.5 * np.exp(-4 * t)
        x = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * f * t)) * np.exp(-2.5 * t)
        return _envelope(x, n, sr, 0.003)
    partials = np.sin(2 * np.pi * np.outer(t, ks * f * (1 + 0.0004 * (ks - 1) * (timbre == "piano"))))
    x = (partials * (amp * np.exp(-np.outer(t, decay)))).sum(axis=1)
    return _envelope(x, n, sr, 0.08 if timbre == "strings" else 0.002 if timbre in ("pluck", "piano") else 0.01)


def _envelope(x: np.ndarray, n: int, sr: int, attack_s: float) -> np.ndarray:
    i = np.arange(n)
    env = np.minimum(1.0, i / (attack_s * sr)) * np.minimum(1.0, (n - i) / (0.01 * sr))
    return (x * env / (np.abs(x).max() + 1e-9)).astype(np.float32)


def _add(track: np.ndarray, sound: np.ndarray, at_s: float, sr: int, gain: float = 1.0) -> None:
    s = int(round(at_s * sr))
    e = min(len(track), s + len(sound))
    if 0 <= s < e:
        track[s:e] += gain * sound[: e - s]


def _chord_notes(root: int, quality: str, voicing: str, rng: np.random.Generator) -> list[int]:
    """MIDI notes of one chord around middle C in the given voicing."""
    pcs = [root + q for q in QUALITIES[quality]]
    base = 55 + (root - 55) % 12 if voicing != "open" else 48 + (root - 48) % 12
    notes = [base + q for q in QUALITIES[quality]]
    if voicing == "inversions":
        for _ in range(int(rng.integers(0, 3))):      # root position, 1st or 2nd inversion
            notes = notes[1:] + [notes[0] + 12]
        notes = [m - 12 if min(notes) > 64 else m for m in notes]
    elif voicing == "open":                          # root, fifth, tenth (+ seventh)
        notes = [base, base + 7, base + 12 + QUALITIES[quality][1]] + \
            ([base + 12 + QUALITIES[quality][3]] if len(pcs) == 4 else [])
    return notes


def _drums(song: GenSong, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n, np.float32)
    if song.groove == "none":
        return out
    beat = 60.0 / song.bpm
    tk = np.arange(int(0.25 * sr)) / sr
    kick = (np.sin(2 * np.pi * np.cumsum(45 + 100 * np.exp(-tk * 35)) / sr) * np.exp(-tk * 14)).astype(np.float32)
    snare = (rng.standard_normal(int(0.18 * sr)) * np.exp(-np.arange(int(0.18 * sr)) / sr * 22) * 0.5).astype(np.float32)
    hat = (np.diff(rng.standard_normal(int(0.05 * sr) + 1)) * np.exp(-np.arange(int(0.05 * sr)) / sr * 90) * 0.2
           ).astype(np.float32)
    bpb = song.beats_per_bar
    swing = 1 / 3 if song.groove == "shuffle" else 0.0
    for bar in range(song.bars):
        t0 = bar * bpb * beat
        for q in range(bpb):
            t = t0 + q * beat
            g = song.groove
            if g == "four_floor":
                _add(out, kick, t, sr)
                if q % 2:
                    _add(out, snare, t, sr, 0.8)
                _add(out, hat, t + beat / 2, sr, 1.3)
                continue
            if g == "breakbeat":   # kick on 1 and the and-of-2, snare on 2 and 4
                if q == 0 or (q == 2 and bpb == 4 and bar % 2):
                    _add(out, kick, t, sr)
                if q == 1:
                    _add(out, kick, t + beat / 2, sr, 0.8)
                if q % 2 == 1:
                    _add(out, snare, t, sr)
            elif bpb == 3:         # waltz: kick on 1, snare on 2 and 3
                _add(out, kick if q == 0 else snare, t, sr, 1.0 if q == 0 else 0.6)
            else:                  # rock / shuffle / sixteenths: kick 1 and 3, snare 2 and 4
                _add(out, kick if q % 2 == 0 else snare, t, sr)
            _add(out, hat, t, sr)
            _add(out, hat, t + beat * (0.5 + swing / 2), sr, 0.7)
            if g == "sixteenths":
                _add(out, hat, t + beat / 4, sr, 0.4)
                _add(out, hat, t + 3 * beat / 4, sr, 0.4)
    return out


def render(song: GenSong, sr: int = 44100) -> np.ndarray:
    """Mono float32 at sr, peak 0.8."""
    rng = np.random.default_rng(song.seed)
    n = int(song.truth()["duration"] * sr)
    table = {**PROGRESSIONS[song.scale], **HELD_OUT_PROGRESSIONS[song.scale]}
    prog = table[song.progression]
    beat = 60.0 / song.bpm
    bar = beat * song.beats_per_bar
    tune = song.detune_cents / 100
    chords_at, t = [], 0.0
    span = bar / song.chords_per_bar
    for b in range(song.bars):
        for c in range(song.chords_per_bar):
            k = b * song.chords_per_bar + c
            chord = prog[k % len(prog)]
            if b == song.bars - 1:            # every song cadences on its tonic
                chord = (0, "m" if song.scale == "minor" else "M") if c == song.chords_per_bar - 1 or \
                    song.chords_per_bar == 1 else (7, "M" if song.scale == "minor" and rng.random() < 0.6 else
                                                   "m" if song.scale == "minor" else "M")
            elif b == song.bars - 2 and song.chords_per_bar == 1:
                chord = (7, "7") if rng.random() < 0.5 else prog[k % len(prog)]
            chords_at.append((t, span, chord))
            t += span
    harmony, bass, melody = (np.zeros(n, np.float32) for _ in range(3))
    last_len = int((span + TAIL_S) * sr)
    scale = SCALES[song.scale]
    prev_m = 72 + song.tonic % 12
    for j, (start, length_s, (rel, quality)) in enumerate(chords_at):
        root = song.tonic + rel
        length = last_len if j == len(chords_at) - 1 else int(length_s * sr)
        strum = 0.012 if song.timbre in ("pluck", "piano", "epiano") else 0.0
        for v, m in enumerate(_chord_notes(root, quality, song.voicing, rng)):
            _add(harmony, _note(m + tune, length, sr, song.timbre), start + v * strum, sr, 0.12)
        bass_root = 36 + (root - 36) % 12
        steps = max(1, int(round(length_s / beat)))
        for q in range(steps):   # root on strong beats, sometimes the fifth between
            m = bass_root + (7 if q % 2 and rng.random() < 0.4 else 0)
            _add(bass, _note(m + tune, int(beat * sr * 0.9), sr, "sine" if song.timbre != "saw" else "saw"),
                 start + q * beat, sr, 0.32)
        if not song.melody:
            continue
        chord_pcs = {(root + q) % 12 for q in QUALITIES[quality]}
        pitch_set = sorted({(song.tonic + s) % 12 for s in scale} - {(p + 1) % 12 for p in chord_pcs}
                           - {(p - 1) % 12 for p in chord_pcs} | chord_pcs)
        t, end = start, start + length_s
        while t < end - 1e-6:
            dur = beat * float(rng.choice([0.5, 0.5, 1.0, 1.0, 2.0]))
            dur = min(dur, end - t)
            on_beat = abs((t - start) / beat - round((t - start) / beat)) < 1e-6
            cands = [m for m in range(prev_m - 5, prev_m + 6) if m % 12 in (chord_pcs if on_beat else pitch_set)]
            cands = [m for m in cands if 62 <= m <= 84] or [prev_m]
            m = int(rng.choice(cands))
            if j == len(chords_at) - 1 and t == start:
                m = 72 + song.tonic % 12 if abs(72 + song.tonic % 12 - prev_m) <= 6 else 60 + song.tonic % 12
                dur = end - t
            _add(melody, _note(m + tune, int(dur * sr), sr, song.timbre if song.timbre != "strings" else "saw"),
                 t, sr, 0.16)
            prev_m, t = m, t + dur
    mix = harmony + bass * float(rng.uniform(0.6, 1.3)) + melody * float(rng.uniform(0.6, 1.4)) \
        + _drums(song, n, sr, rng) * float(rng.uniform(0.5, 1.2))
    mix += 0.002 * rng.standard_normal(n).astype(np.float32)
    return (0.8 * mix / max(1e-6, float(np.abs(mix).max()))).astype(np.float32)


def write(song: GenSong, path_stem: str) -> str:
    """Render and write in the song's format; returns the file name."""
    import soundfile as sf
    sr, ext, kwargs = {"wav": (44100, "wav", {"subtype": "FLOAT"}), "flac48": (48000, "flac", {}),
                       "ogg": (44100, "ogg", {}), "mp3": (44100, "mp3", {})}[song.fmt]
    path = f"{path_stem}.{ext}"
    y = render(song, sr)
    with sf.SoundFile(path, "w", sr, 1, **kwargs) as f:
        for i in range(0, len(y), 32768):   # libsndfile's Vorbis/MP3 encoders crash on large writes
            f.write(y[i:i + 32768])
    return path
