"""Rhythm, key and structure stage (DAG step 6): beats, downbeats, BPM, meter, key, sections.

Runs on tracks that aesthetics kept. Beat This (tasks/beat_model.py, our torch front end in
tasks/beat_frontend.py) gives beats and downbeats; Essentia's RhythmExtractor2013
(rhythm.beat_tracker=essentia) or the stage's own comb tempogram and metrical-level classifier
(rhythm.beat_tracker=onset, tasks/tempo.py, ~50x faster than Essentia) give them without weights.
A second tempo is recorded beside the tracker's (rhythm.cross_check, cross_check_bpm): the onset
tempo by default, which costs almost nothing since its candidates give every path's confidence
anyway; Essentia's on request (the old behaviour, too slow for the stage's 50x real time per
core). The BPM is read from the beat grid (median inter-beat interval) after a metrical-level
check: Beat This grids with 8 beats per bar are halved; Essentia grids are doubled when the
onsets between ticks are as strong as those on them, and halved when every other tick is weak. Every path's `bpm_confidence` is the onset
classifier's calibrated probability of the candidate tempo the path agrees with. Key, scale and
`key_confidence` come from tasks/key.py (rhythm.key_method=evidence) or Essentia's KeyExtractor,
gated by confidence and by tonalness (energy share in spectral peaks), so noise gets no key.
Structure comes from tasks/structure.py. `caption_phrases` writes the numbers as words.

A track without a trustworthy tempo or key keeps status ok with bpm/key null and a
`no_tempo_reason`/`no_key_reason` ("too_short: ...", "low_confidence: ...", "not_tonal: ...",
"out_of_range: ...", "weak_key: ..."); only audio the loader refuses becomes a reject.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.rhythm import RHYTHM_SCHEMA, RhythmConfig
from tasks import audio, tempo
from tasks import key as key_mod
from tasks.beat_frontend import FPS, LogMelSpect, onset_envelope
from tasks.beat_frontend import SAMPLE_RATE as BEAT_SR
from tasks.beat_model import BeatThisTracker
from tasks.beat_model import build_tiny as _build_tiny
from tasks.models import resolve_checkpoint, resolve_device
from tasks.stage import Stage
from tasks.structure import NoveltySegmenter, Segmenter, chroma, power_frames

ESSENTIA_SR = 44100
DOUBLE_IF_MID = 0.7          # onsets between ticks at least this strong as on them: ticks are half tempo
HALVE_IF_ALTERNATE = 0.66    # every other tick weaker than this: ticks are double tempo
REGULAR_TOL = 0.1            # an inter-beat interval within 10% of the median counts as regular


def build_tiny(path: Path) -> None:
    """The Beat This tiny twin (models.TINY_BUILDERS["beat_this"])."""
    _build_tiny(path)


# ---- phrases for captions -------------------------------------------------------------

def tempo_phrase(bpm: float | None) -> str | None:
    return None if bpm is None else f"{int(round(bpm))} BPM"


def key_phrase(key: str | None, scale: str | None) -> str | None:
    return None if not key or not scale else f"{key} {scale}"


def caption_phrases(bpm: float | None, key: str | None, scale: str | None) -> list[str]:
    """The caption's musical phrases: ["128 BPM", "A minor"], leaving out what is unknown."""
    return [p for p in (tempo_phrase(bpm), key_phrase(key, scale)) if p]


# ---- tempo --------------------------------------------------------------------------------

def onset_strength(env: np.ndarray, times: np.ndarray) -> float:
    """Mean of the onset envelope's maximum within +-40 ms of each time (0 when none fall inside)."""
    idx = np.round(np.asarray(times) * FPS).astype(int)
    idx = idx[(idx >= 2) & (idx < len(env) - 2)]
    if not len(idx):
        return 0.0
    return float(np.mean([env[i - 2:i + 3].max() for i in idx]))


def metrical_level(beats: np.ndarray, env: np.ndarray, min_bpm: float, max_bpm: float) -> np.ndarray:
    """Double or halve a beat grid whose level the onsets contradict (see module docstring)."""
    if len(beats) < 8:
        return beats
    bpm = 60.0 / float(np.median(np.diff(beats)))
    on = onset_strength(env, beats)
    if on <= 0:
        return beats
    mids = (beats[1:] + beats[:-1]) / 2
    if onset_strength(env, mids) >= DOUBLE_IF_MID * on and 2 * bpm <= max_bpm:
        return np.sort(np.concatenate([beats, mids]))
    even, odd = onset_strength(env, beats[0::2]), onset_strength(env, beats[1::2])
    if min(even, odd) < HALVE_IF_ALTERNATE * max(even, odd) and bpm / 2 >= min_bpm:
        return beats[0::2] if even >= odd else beats[1::2]
    return beats


def grid_stats(beats: np.ndarray) -> tuple[float | None, float]:
    """(BPM from the regular inter-beat intervals, share of intervals within 10% of the median)."""
    if len(beats) < 4:
        return None, 0.0
    ibi = np.diff(beats)
    med = float(np.median(ibi))
    if med <= 0:
        return None, 0.0
    regular = np.abs(ibi - med) <= REGULAR_TOL * med
    if not regular.any():   # med is itself an interval, but float rounding can leave none
        return 60.0 / med, 0.0
    # The period is the slope of beat time over beat number, fitted over the regular
    # intervals: it averages away the trackers' frame quantisation (~1% at 128 BPM).
    slope = float(np.sum(ibi[regular]) / max(1, regular.sum()))
    return 60.0 / slope, float(np.mean(regular))


def meter_from_downbeats(beats: np.ndarray, downbeats: np.ndarray) -> int | None:
    """Median beats per bar between consecutive downbeats (None with fewer than 3 downbeats)."""
    if len(downbeats) < 3 or len(beats) < 4:
        return None
    idx = np.searchsorted(beats, downbeats)
    per_bar = np.diff(idx)
    per_bar = per_bar[per_bar > 0]
    return int(np.median(per_bar)) if len(per_bar) else None


def meter_from_accents(beats: np.ndarray, env: np.ndarray) -> tuple[int | None, np.ndarray]:
    """3 or 4 beats per bar from how much the beat's position in the bar explains its accent
    (onset strength), and the downbeats at the strongest position. (None, []) when unclear."""
    if len(beats) < 12:
        return None, np.array([])
    acc = np.array([onset_strength(env, [b]) for b in beats])
    best = (0.0, None, 0)
    for m in (3, 4):
        n = len(acc) // m * m
        if n < 2 * m:
            continue
        phases = acc[:n].reshape(-1, m)                          # (bars, m)
        explained = phases.mean(axis=0).var() / (acc[:n].var() + 1e-9)
        if explained > best[0]:
            best = (explained, m, int(np.argmax(phases.mean(axis=0))))
    if best[1] is None or best[0] < 0.1:
        return None, np.array([])
    return best[1], beats[best[2]::best[1]]


def essentia_rhythm(wav44: np.ndarray) -> tuple[float, np.ndarray, float]:
    """(bpm, ticks in s, confidence 0-5.32) from RhythmExtractor2013 (multifeature)."""
    import essentia.standard as es

    bpm, ticks, conf, _, _ = es.RhythmExtractor2013(method="multifeature")(wav44)
    return float(bpm), np.asarray(ticks, float), float(conf)


# ---- key ----------------------------------------------------------------------------------

def tonalness(power: np.ndarray) -> float:
    """Share of 100-5000 Hz energy in spectral peaks (10x over the local median): noise ~0.02,
    tonal music 0.4-0.9. `power` is tasks.structure.power_frames output."""
    from scipy.ndimage import median_filter

    hz = np.fft.rfftfreq(2 * (power.shape[1] - 1), 1 / BEAT_SR)
    band = power[:, (hz >= 100) & (hz <= 5000)]
    local = median_filter(band, size=(1, 21), mode="nearest")
    return float((band * (band > 10 * local)).sum() / (band.sum() + 1e-12))


def essentia_key(wav44: np.ndarray, profile: str) -> tuple[str, str, float]:
    import essentia.standard as es

    key, scale, strength = es.KeyExtractor(profileType=profile, sampleRate=ESSENTIA_SR)(wav44)
    return str(key), str(scale), float(strength)


# ---- one track ----------------------------------------------------------------------------

def analyze_track(wav44: np.ndarray, wav22: np.ndarray, spect: np.ndarray, cfg: RhythmConfig,
                  segmenter: Segmenter | None, beat_this: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                  timings: dict | None = None, hpcp_frames: key_mod.HpcpFrames | None = None) -> dict:
    """All output fields of one track. `beat_this` is (beats, downbeats, beat probabilities at the
    beats) from the tracker, or None on the Essentia path."""
    timings = timings if timings is not None else {}   # CPU seconds of this process per component
    hpcp_frames = hpcp_frames or key_mod.HpcpFrames()
    duration = len(wav22) / BEAT_SR
    env = onset_envelope(spect)
    env = env / (env.mean() + 1e-9)
    check = None if cfg.cross_check in ("none", cfg.beat_tracker) else cfg.cross_check
    row: dict = {"bpm": None, "bpm_confidence": 0.0, "tempo_source": cfg.beat_tracker, "cross_check": check,
                 "cross_check_bpm": None, "cross_check_confidence": None, "beats": [], "downbeats": [],
                 "meter": None, "key": None, "scale": None, "key_strength": 0.0, "key_confidence": 0.0,
                 "tonalness": None,
                 "segments": [], "no_tempo_reason": None, "no_key_reason": None}

    # tempo: every path's confidence is the onset classifier's calibrated probability of the
    # candidate tempo it agrees with (tasks/tempo.py), so a metrical-level error is never certain
    t0 = time.process_time()
    power = power_frames(wav22)   # shared with the key's tonalness gate
    cands = tempo.candidates(env, tempo.low_band_envelope(spect), chroma(power), tempo.mid_band_envelope(spect)) \
        if duration >= cfg.min_tempo_s else []
    probs = tempo.tempo_probabilities(cands) if cands else np.array([])
    pulse = max((c["features"][0] for c in cands), default=0.0)   # autocorrelation comb of the winner
    ess_beats = None
    if duration >= cfg.min_tempo_s and "essentia" in (cfg.beat_tracker, check):
        try:
            _, ticks, conf = essentia_rhythm(wav44)
            ess_beats = metrical_level(ticks, env, cfg.min_bpm, cfg.max_bpm)
            ess_bpm, _ = grid_stats(ess_beats)
            if check == "essentia":
                row["cross_check_bpm"] = None if ess_bpm is None else round(ess_bpm, 2)
                row["cross_check_confidence"] = round(conf, 3)
        except RuntimeError as exc:  # Essentia raises RuntimeError on inputs it cannot handle
            row["cross_check_confidence"] = 0.0 if check == "essentia" else None
            print(f"rhythm: RhythmExtractor2013 failed: {exc}", file=sys.stderr)
    onset_beats = np.array([])
    if cands and "onset" in (cfg.beat_tracker, check):
        best = cands[int(np.argmax(probs))]
        onset_beats = tempo.beat_grid(env, best["period"], best["phase"])
        if check == "onset":
            onset_bpm, _ = grid_stats(onset_beats)
            row["cross_check_bpm"] = None if onset_bpm is None else round(onset_bpm, 2)
            row["cross_check_confidence"] = round(tempo.calibrate(float(probs.max()))
                                                  * min(1.0, pulse / tempo.MIN_PULSE), 3)
    timings["tempo"] = time.process_time() - t0
    if beat_this is not None:
        beats, downbeats, _ = beat_this
        meter = meter_from_downbeats(beats, downbeats)
        if meter == 8 and len(beats) >= 8:   # eighth-note grid: keep the beats in phase with the downbeats
            phase = int(np.searchsorted(beats, downbeats[0])) % 2 if len(downbeats) else 0
            beats, meter = beats[phase::2], 4
    elif cfg.beat_tracker == "essentia":
        beats = ess_beats if ess_beats is not None else np.array([])
    else:
        beats = onset_beats
    if beat_this is None:
        meter, downbeats = meter_from_accents(beats, env)
    bpm, regular = grid_stats(beats)
    agree = sum(p for c, p in zip(cands, probs) if bpm and abs(c["bpm"] - bpm) <= 0.04 * bpm)
    confidence = regular * tempo.calibrate(float(agree)) * min(1.0, pulse / tempo.MIN_PULSE)
    row["bpm_confidence"] = round(float(confidence), 3)
    if duration < cfg.min_tempo_s:
        row["no_tempo_reason"] = f"too_short: {duration:.1f} s < rhythm.min_tempo_s={cfg.min_tempo_s:g}"
    elif bpm is None:
        row["no_tempo_reason"] = f"few_beats: {len(beats)} beats found"
    elif not cfg.min_bpm <= bpm <= cfg.max_bpm:
        row["no_tempo_reason"] = (f"out_of_range: {bpm:.1f} BPM outside rhythm.min_bpm..max_bpm "
                                  f"({cfg.min_bpm:g}-{cfg.max_bpm:g})")
    elif confidence < cfg.min_tempo_confidence:
        row["no_tempo_reason"] = (f"low_confidence: {confidence:.2f} < rhythm.min_tempo_confidence="
                                  f"{cfg.min_tempo_confidence:g} ({bpm:.1f} BPM, {regular:.0%} regular beats)")
    else:
        row.update(bpm=round(bpm, 2), beats=[round(float(b), 3) for b in beats],
                   downbeats=[round(float(d), 3) for d in downbeats], meter=meter)

    # key
    t0 = time.process_time()
    row["tonalness"] = round(tonalness(power), 3)
    if duration < cfg.min_key_s:
        row["no_key_reason"] = f"too_short: {duration:.1f} s < rhythm.min_key_s={cfg.min_key_s:g}"
    elif row["tonalness"] < cfg.min_tonalness:
        row["no_key_reason"] = (f"not_tonal: tonalness {row['tonalness']:.2f} < rhythm.min_tonalness="
                                f"{cfg.min_tonalness:g} (noise or unpitched percussion)")
    elif cfg.key_method == "evidence":
        name, scale, strength, confidence = key_mod.estimate_key(*hpcp_frames(wav44))
        row.update(key_strength=round(strength, 3), key_confidence=round(confidence, 3))
        if confidence < cfg.min_key_confidence:
            row["no_key_reason"] = (f"weak_key: key_confidence {confidence:.2f} < rhythm.min_key_confidence="
                                    f"{cfg.min_key_confidence:g} (best guess {name} {scale})")
        else:
            row.update(key=name, scale=scale)
    else:
        name, scale, strength = essentia_key(wav44, cfg.key_profile)
        row["key_strength"] = round(strength, 3)
        if strength < cfg.min_key_strength:
            row["no_key_reason"] = (f"weak_key: strength {strength:.2f} < rhythm.min_key_strength="
                                    f"{cfg.min_key_strength:g} (best guess {name} {scale})")
        else:
            row.update(key=name, scale=scale)
    timings["key"] = time.process_time() - t0

    # structure
    t0 = time.process_time()
    if segmenter is not None:
        grid = np.asarray(row["beats"]) if row["bpm"] is not None else None
        row["segments"] = [s.as_dict() for s in segmenter.segment(wav22, spect, grid, duration)]
    timings["structure"] = time.process_time() - t0
    row["tempo_phrase"] = tempo_phrase(row["bpm"])
    row["key_phrase"] = key_phrase(row["key"], row["scale"])
    return row


# ---- the stage ----------------------------------------------------------------------------

class RhythmStage(Stage):
    name = "rhythm"
    version = "4"   # 2: key_confidence, calibrated bpm_confidence, evidence key method, onset tempo;
    # 3: rhythm.cross_check (onset by default) in cross_check/_bpm/_confidence, essentia_* columns gone,
    # tempo classifier refitted; 4: snare-band tempo evidence, tempo classifier refitted
    inputs = ("aesthetics",)
    schema = RHYTHM_SCHEMA
    uses_gpu = True

    @classmethod
    def check(cls, cfg) -> None:
        ref = cfg.rhythm.checkpoint
        if cfg.rhythm.beat_tracker == "beat_this" and not ref.startswith("tiny:") \
                and ("/" in ref or ref.endswith(".ckpt")) and not Path(ref).expanduser().exists():
            raise ValueError(f"rhythm.checkpoint={ref!r}: no such file; fix the path, use a released "
                             "name (final0, small0, ...) or set rhythm.beat_tracker=onset (no weights "
                             "needed; rhythm.beat_tracker=essentia is the slower alternative)")

    def setup(self) -> None:
        cfg = self.cfg.rhythm
        self.device = resolve_device(self.cfg.device)
        self.frontend = LogMelSpect().to(self.device)
        self.tracker = None
        if cfg.beat_tracker == "beat_this":
            ref = resolve_checkpoint(cfg.checkpoint, self.cfg.models.tiny_dir)
            self.tracker = BeatThisTracker(ref, self.device, cfg.chunk_frames, cfg.border_frames,
                                           cfg.batch_size, cfg.float16)
        self.segmenter = NoveltySegmenter(cfg.segment_kernel_beats, cfg.min_segment_beats,
                                          cfg.same_section) if cfg.structure else None
        self.hpcp_frames = key_mod.HpcpFrames()
        self.timings: dict[str, float] = {}

    def _tick(self, name: str, since: float) -> None:
        # CPU time (bench/rhythm.py's speed measure, one thread); work on a GPU is not in it
        self.timings[name] = self.timings.get(name, 0.0) + time.process_time() - since

    def process(self, tracks: list[dict]) -> list[dict]:
        cfg = self.cfg.rhythm
        rows = [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in tracks]
        loaded = []   # (row index, wav44, wav22, spect)
        for i, track in enumerate(tracks):
            t0 = time.process_time()
            try:
                wav44 = audio.load_track(track, ESSENTIA_SR, 1, self.cfg.audio)[0]
                wav22 = audio.load_track(track, BEAT_SR, 1, self.cfg.audio)[0]
            except audio.AudioError as exc:
                rows[i].update(status=STATUS_REJECTED, reason=exc.reason)
                continue
            self._tick("load", t0)
            t0 = time.process_time()
            with torch.inference_mode():
                spect = self.frontend(torch.from_numpy(wav22).to(self.device))   # (T, 128)
            self._tick("frontend", t0)
            loaded.append((i, wav44, wav22, spect))
        # Beat This over the whole batch (its chunks are batched across tracks)
        grids: dict[int, tuple] = {}
        if self.tracker is not None and loaded:
            t0 = time.process_time()
            logits = self.tracker.logits([s for _, _, _, s in loaded])
            for (i, _, _, _), (b, d) in zip(loaded, logits):
                beats, downbeats = self.tracker.beats(b, d)
                frames = np.clip(np.round(beats * FPS).astype(int), 0, len(b) - 1)
                grids[i] = (beats, downbeats, torch.sigmoid(b[frames]).numpy() if len(frames) else np.array([]))
            self._tick("beat_this", t0)
        for i, wav44, wav22, spect in loaded:
            parts: dict[str, float] = {}
            rows[i].update(analyze_track(wav44, wav22, spect.cpu().numpy(), cfg, self.segmenter,
                                         grids.get(i), parts, self.hpcp_frames))
            for name, seconds in parts.items():
                self.timings[name] = self.timings.get(name, 0.0) + seconds
        return rows


STAGE = RhythmStage


# ---- acepipe analyze ----------------------------------------------------------------------

def file_track(path: str | bytes) -> dict:
    """A catalog-like row for a plain file (what the stage reads), probed by the one loader."""
    info = audio.probe(path)
    raw = os.fsencode(path)
    return {"track_id": audio.display_path(raw), "uri": audio.display_path(raw), "uri_raw": raw,
            "duration": info.duration, "sample_rate": info.sample_rate, "channels": info.channels,
            "codec": info.codec}


def cli_analyze(args) -> int:
    """`acepipe analyze FILE... [--json]`: the stage on files, one result per file, no store."""
    from schemas.config import load_config

    cfg = load_config(args.config, args.overrides)
    stage = RhythmStage(cfg)
    stage.setup()
    failed = 0
    for path in args.files:
        try:
            track = file_track(path)
        except audio.AudioError as exc:
            row = {"track_id": path, "status": STATUS_REJECTED, "reason": exc.reason}
        else:
            row = stage.process([track])[0]
        row = {"file": path, **{k: v for k, v in row.items() if k != "track_id"}}
        failed += row["status"] != STATUS_OK
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        else:
            print(_summary_line(row), flush=True)
    return 1 if failed == len(args.files) else 0


def _summary_line(row: dict) -> str:
    if row["status"] != STATUS_OK:
        return f"{row['file']}: {row['status']} ({row['reason']})"
    tempo = (f"{row['bpm']:.1f} BPM (confidence {row['bpm_confidence']:.2f}, meter {row['meter']})"
             if row["bpm"] is not None else f"no tempo ({row['no_tempo_reason']})")
    if row["cross_check_bpm"] is not None:
        tempo += f", {row['cross_check']} {row['cross_check_bpm']:.1f}"
    key = (f"{row['key_phrase']} (strength {row['key_strength']:.2f})" if row["key"]
           else f"no key ({row['no_key_reason']})")
    sections = " ".join(f"{s['label']}@{s['start']:.1f}" for s in row["segments"])
    return f"{row['file']}: {tempo}; {key}; {len(row['beats'])} beats; sections: {sections}"
