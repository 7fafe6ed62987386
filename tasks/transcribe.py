"""Transcribe stage (DAG step 3): Whisper language, text, segments and word timestamps.

Runs on tracks the aesthetics stage kept. The tracks of a group (16 kHz mono from our
loader) are transcribed together, in batches across tracks:
  1. scan: the log-mel of each whole track (as whisper.transcribe computes it) is cut into
     30 s windows; one encoder pass and one decoder step per window give its no-speech and
     language probabilities. The most vocal windows (transcribe.max_windows, lowest
     no-speech first: the vocal part of long tracks) are kept, and they set the language;
  2. decode in rounds: every track has its own seek pointer; a round decodes the window at
     the pointer of every active track in batches (beam search, whisper's temperature
     fallback, optionally the track's previous text as a prompt), then moves each pointer
     as whisper.transcribe does (to the last timestamp or word end, transcribe.seek);
  3. judge: a window's text is dropped as silence (no-speech high and unconfident, as in
     whisper) or as a hallucination (compression ratio, one word repeated); a track with
     fewer than transcribe.min_words kept words is `instrumental`, with the reason.
Instrumental tracks stay `ok` (the flag is data for the lyrics and pack stages).
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.transcribe import TRANSCRIBE_SCHEMA
from tasks import audio
from tasks.models import ModelLoadError, loading, resolve_checkpoint, resolve_device
from tasks.stage import Stage

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000          # whisper.audio.SAMPLE_RATE
WINDOW_S = 30                # whisper's fixed input length
HOP_LENGTH = 160             # mel frames are 10 ms
N_FRAMES = 3000              # mel frames in a window
FRAMES_PER_SECOND = 100
TIME_PRECISION = 0.02        # one timestamp token (two mel frames)
CHECKPOINT_NAME = "model.pt"

# (n_mels, n_vocab, n_audio_state, n_audio_layer, n_text_layer) of each released checkpoint:
# what identifies one when neither its hash nor its file name does. large-v1 and large-v2
# share theirs, so a renamed large-v1/v2 file cannot be told apart.
RELEASED_DIMS = {
    "tiny.en": (80, 51864, 384, 4, 4), "tiny": (80, 51865, 384, 4, 4),
    "base.en": (80, 51864, 512, 6, 6), "base": (80, 51865, 512, 6, 6),
    "small.en": (80, 51864, 768, 12, 12), "small": (80, 51865, 768, 12, 12),
    "medium.en": (80, 51864, 1024, 24, 24), "medium": (80, 51865, 1024, 24, 24),
    "large-v1": (80, 51865, 1280, 32, 32), "large-v2": (80, 51865, 1280, 32, 32),
    "large-v3": (128, 51866, 1280, 32, 32), "large-v3-turbo": (128, 51866, 1280, 32, 4),
}
_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """Streamed SHA256 of a file, remembered per (path, size, mtime) so a changed file is rehashed."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def _dims_key(dims) -> tuple:
    return (dims.n_mels, dims.n_vocab, dims.n_audio_state, dims.n_audio_layer, dims.n_text_layer)


def released_name(path: Path, dims) -> str | None:
    """Which released whisper model a checkpoint file is, for its alignment heads: by the
    SHA256 in whisper's download URLs, else by file name, else by dims when only one
    released model has them; None for a fine-tuned or unknown file."""
    import whisper

    sha = file_sha256(path)
    for name, url in whisper._MODELS.items():
        if url.split("/")[-2] == sha:
            return name
    stem = path.stem if path.name != CHECKPOINT_NAME else path.parent.name
    canonical = {"large": "large-v3", "turbo": "large-v3-turbo"}.get(stem, stem)
    if canonical in RELEASED_DIMS and RELEASED_DIMS[canonical] == _dims_key(dims):
        return stem
    matches = [n for n, d in RELEASED_DIMS.items() if d == _dims_key(dims)]
    return matches[0] if len(matches) == 1 else None


def load_model(ref: str, device: torch.device | str = "cpu", download_root: str | None = None):
    """A Whisper model from an official name, a checkpoint file {"dims", "model_state_dict"},
    or a directory holding model.pt. A released model given as a file gets its tuned
    alignment heads (whisper.load_model sets them only when loading by name)."""
    import whisper

    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file() and ref not in whisper.available_models():
        raise ModelLoadError(f"transcribe.model={ref!r} is neither a file nor a directory with {CHECKPOINT_NAME} "
                             f"nor a whisper model name ({', '.join(whisper.available_models())})")
    if not path.is_file():
        with loading("transcribe.model", ref, "put the .pt file in transcribe.download_root or set "
                     "transcribe.model to its path"):
            return whisper.load_model(ref, device=device, download_root=download_root).eval()
    with loading("transcribe.model", ref, f"{path} must be a whisper checkpoint (a dict of dims and "
                 "model_state_dict, as released); download it again or fix the path"):
        model = whisper.load_model(str(path), device=device).eval()
    name = released_name(path, model.dims)
    if name is None:
        log.warning("transcribe.model=%r is not a released whisper checkpoint (no SHA256, file name or "
                    "dims match): word timestamps use the fallback alignment heads (all heads of the "
                    "decoder's second half), which align words less precisely", ref)
    else:
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])
        model.alignment_heads = model.alignment_heads.to(model.device)
    return model


def build_tiny(path: Path) -> None:
    """Tiny twin: Whisper with 2+2 layers of width 64, random weights, saved as path/model.pt.

    n_vocab stays 51865 (the multilingual tokenizer ships with the package and its special
    token ids sit at the top of that range), n_mels 80, n_audio_ctx 1500 (30 s of mel frames
    after the stride-2 conv: the encoder checks it) and n_text_ctx 448.
    """
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                           n_audio_layer=2, n_vocab=51865, n_text_ctx=448, n_text_state=64,
                           n_text_head=2, n_text_layer=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Whisper(dims)
        # Whisper leaves this torch.empty (the real weights fill it): random garbage would
        # make outputs differ run to run and can overflow into NaN.
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, Path(path) / CHECKPOINT_NAME)


def split_segments(tokens: list[int], tokenizer, duration: float) -> list[dict]:
    """Timestamped segments of one fixed window's tokens: <|t0|> text <|t1|><|t1|> text <|t2|>.

    Tolerates what a confused model emits (no timestamps, unpaired or out-of-range ones):
    times are clamped to the window and a segment never ends before it starts.
    """
    segments: list[dict] = []
    start: float | None = None
    text: list[int] = []
    for tok in tokens:
        if tok >= tokenizer.timestamp_begin:
            t = min((tok - tokenizer.timestamp_begin) * TIME_PRECISION, duration)
            if text:
                begin = start if start is not None else (segments[-1]["end"] if segments else 0.0)
                segments.append({"start": begin, "end": max(t, begin), "tokens": text})
                text, start = [], None
            else:
                start = t
        elif tok < tokenizer.eot:
            text.append(tok)
    if text:
        begin = start if start is not None else (segments[-1]["end"] if segments else 0.0)
        segments.append({"start": begin, "end": max(duration, begin), "tokens": text})
    for seg in segments:
        seg["text"] = tokenizer.decode(seg["tokens"]).strip()
    return [s for s in segments if s["text"]]


def seek_segments(tokens: list[int], tokenizer, segment_size: int) -> tuple[list[dict], int, bool]:
    """whisper.transcribe's reading of one window's tokens, for seek=timestamps.

    Returns (segments with start/end in seconds from the window start and their tokens,
    timestamps included; mel frames to advance; whether the window ends on a single
    timestamp, i.e. no speech after it). Segments end at each pair of consecutive
    timestamps; text after the last pair is unfinished: it is left for the next window,
    which starts at that pair's timestamp.
    """
    begin = tokenizer.timestamp_begin
    is_time = [t >= begin for t in tokens]
    single_ending = is_time[-2:] == [False, True]
    cuts = [i + 1 for i in range(len(tokens) - 1) if is_time[i] and is_time[i + 1]]
    if not cuts:
        duration = segment_size * HOP_LENGTH / SAMPLE_RATE
        times = [t for t in tokens if t >= begin]
        if times and times[-1] != begin:  # no pair, but a timestamp: the last one ends the text
            duration = (times[-1] - begin) * TIME_PRECISION
        return [{"start": 0.0, "end": duration, "tokens": list(tokens)}], segment_size, single_ending
    if single_ending:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        piece = list(tokens[last:cut])
        segments.append({"start": (piece[0] - begin) * TIME_PRECISION,
                         "end": (piece[-1] - begin) * TIME_PRECISION, "tokens": piece})
        last = cut
    advance = segment_size if single_ending else (tokens[last - 1] - begin) * 2  # 2 frames a token
    return segments, advance, single_ending


def repetition(text: str) -> float:
    """Share of the words taken by the most frequent one (0 for fewer than 6 words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 6:
        return 0.0
    return Counter(words).most_common(1)[0][1] / len(words)


def batched_decode(model, features: torch.Tensor, options, prompts: list[list[int]]) -> list:
    """whisper.decode of a batch of windows whose prompts differ but have one length.

    whisper applies one DecodingOptions.prompt per call; the prompt only fills the first
    tokens of each row, so rows with prompts of equal length can share a call (the first
    prompt builds the task, each row's own prompt overwrites it). whisper 20250625 also
    repeats the tokens, not the audio features, per beam, so batched beam search fails
    there: the features are repeated here.
    """
    from whisper.decoding import DecodingTask

    class Task(DecodingTask):
        def _get_audio_features(self, mel):
            return super()._get_audio_features(mel).repeat_interleave(self.n_group, dim=0)

        def _detect_language(self, audio_features, tokens):  # tokens: (n_windows, sample_begin)
            # the language is always given; one per window (audio_features has one per beam)
            for row, prompt in enumerate(prompts):
                if prompt:  # after <|startofprev|>
                    tokens[row, 1:1 + len(prompt)] = torch.tensor(prompt)
            return [self.options.language] * tokens.shape[0], None

    options = replace(options, prompt=list(prompts[0]) or None)
    with torch.no_grad():
        return Task(model, options).run(features)


@dataclass(eq=False)
class Track:
    """One track's state through the scan and the decode rounds."""
    index: int                                   # into the tracks of the group
    wav: np.ndarray
    mel: torch.Tensor | None                     # (n_mels, frames + N_FRAMES): mel=track only
    frames: int                                  # mel frames of audio (10 ms)
    windows: list[tuple[int, int]] = field(default_factory=list)   # scan grid, [start, end) frames
    no_speech: list[float] = field(default_factory=list)
    language_probs: list[np.ndarray] = field(default_factory=list)
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # scan encoder output by start frame
    language: str = ""
    language_prob: float = 0.0
    clips: list[tuple[int, int]] = field(default_factory=list)
    clip: int = 0
    seek: int = 0
    rounds: int = 0
    tokens: list[int] = field(default_factory=list)   # kept tokens: the prompt source
    prompt_since: int = 0
    last_speech: float = 0.0
    segments: list[dict] = field(default_factory=list)
    verdicts: Counter = field(default_factory=Counter)
    # the current round
    segment_size: int = 0
    prompt: list[int] = field(default_factory=list)
    result: object = None                        # whisper DecodingResult


class TranscribeStage(Stage):
    name = "transcribe"
    version = "2"
    inputs = ("aesthetics",)
    schema = TRANSCRIBE_SCHEMA
    uses_gpu = True

    def setup(self) -> None:
        cfg = self.cfg.transcribe
        self.device = resolve_device(self.cfg.device)
        ref = resolve_checkpoint(cfg.model, self.cfg.models.tiny_dir)
        self.model = load_model(ref, self.device, cfg.download_root)
        self.fp16 = cfg.fp16 and self.device.type == "cuda"
        self.tokenizers: dict[str | None, object] = {}
        base = self._tokenizer(None)
        self.language_tokens = list(base.all_language_tokens)
        self.language_codes = list(base.all_language_codes)
        if not self.language_tokens:
            raise RuntimeError(f"transcribe.model={cfg.model!r} is English-only; a multilingual model "
                               "is needed for language detection")
        if cfg.language is not None and cfg.language not in self.language_codes:
            raise RuntimeError(f"transcribe.language={cfg.language!r} is not a whisper language code")

    def _tokenizer(self, language: str | None):
        from whisper.tokenizer import get_tokenizer

        if language not in self.tokenizers:
            self.tokenizers[language] = get_tokenizer(
                self.model.is_multilingual, num_languages=self.model.num_languages,
                language=language, task="transcribe")
        return self.tokenizers[language]

    def _track(self, index: int, wav: np.ndarray) -> Track:
        import whisper

        mel = None
        if self.cfg.transcribe.mel == "track":  # padded with 30 s of silence, as whisper.transcribe
            mel = whisper.log_mel_spectrogram(torch.from_numpy(wav), self.model.dims.n_mels,
                                              padding=SAMPLE_RATE * WINDOW_S, device=self.device)
        t = Track(index, wav, mel, len(wav) // HOP_LENGTH)
        starts = [s for s in range(0, t.frames, N_FRAMES) if s == 0 or t.frames - s >= 10]  # drop a <0.1 s tail
        t.windows = list(zip(starts, starts[1:] + [t.frames]))
        return t

    def _mel(self, t: Track, seek: int, size: int) -> torch.Tensor:
        """(n_mels, 3000) input for `size` frames from `seek`, zero-padded as whisper.transcribe does."""
        import whisper

        if t.mel is not None:
            mel = whisper.pad_or_trim(t.mel[:, seek:seek + size], N_FRAMES)
        else:
            wav = torch.from_numpy(t.wav[seek * HOP_LENGTH:(seek + size) * HOP_LENGTH])
            mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(wav, SAMPLE_RATE * WINDOW_S),
                                              self.model.dims.n_mels, device=self.device)
        mel = mel.to(self.device)
        return mel.half() if self.fp16 else mel

    @torch.no_grad()
    def _scan(self, tracks: list[Track]) -> None:
        """Encoder features, no-speech and language probabilities of each grid window."""
        tok = self._tokenizer(None)
        items = [(t, s, e) for t in tracks for s, e in t.windows]
        for b in range(0, len(items), self.cfg.transcribe.batch_size):
            batch = items[b:b + self.cfg.transcribe.batch_size]
            mels = torch.stack([self._mel(t, s, min(N_FRAMES, e - s)) for t, s, e in batch])
            feats = self.model.embed_audio(mels)
            sot = torch.full((len(batch), 1), tok.sot, dtype=torch.long, device=self.device)
            logits = self.model.logits(sot, feats)[:, 0].float()  # (B, n_vocab)
            no_speech = logits.softmax(-1)[:, tok.no_speech].cpu().numpy()
            lang = logits[:, self.language_tokens].softmax(-1).cpu().numpy()
            for i, (t, s, _) in enumerate(batch):
                t.no_speech.append(float(no_speech[i]))
                t.language_probs.append(lang[i])
                t.features[s] = feats[i]

    def _plan(self, t: Track) -> None:
        """Language and clips of a scanned track: its max_windows most vocal windows."""
        cfg = self.cfg.transcribe
        picked = sorted(sorted(range(len(t.windows)), key=lambda k: t.no_speech[k])[:cfg.max_windows])
        weights = np.array([1.0 - t.no_speech[k] for k in picked]) + 1e-6
        probs = np.average(np.stack([t.language_probs[k] for k in picked]), axis=0, weights=weights)
        t.language = cfg.language or self.language_codes[int(np.argmax(probs))]
        t.language_prob = float(probs[self.language_codes.index(t.language)])
        keep = {t.windows[k][0] for k in picked}
        t.features = {s: f for s, f in t.features.items() if s in keep}
        for k in picked:
            start, end = t.windows[k]
            if cfg.seek == "timestamps" and t.clips and t.clips[-1][1] == start:
                t.clips[-1] = (t.clips[-1][0], end)  # adjacent windows: one clip to seek through
            else:
                t.clips.append((start, end))
        t.seek = t.clips[0][0]

    def _next_window(self, t: Track) -> bool:
        """Move the track's pointer into its clips (as whisper.transcribe's clip loop); False when done."""
        while t.clip < len(t.clips):
            start, end = t.clips[t.clip]
            t.seek = max(t.seek, start)
            if t.seek < end:
                break
            t.clip += 1
        if t.clip >= len(t.clips) or t.rounds >= 2 * self.cfg.transcribe.max_windows:
            return False
        t.segment_size = min(N_FRAMES, t.frames - t.seek, t.clips[t.clip][1] - t.seek)
        if self.cfg.transcribe.seek == "fixed":
            t.segment_size = min(N_FRAMES, t.clips[t.clip][1] - t.seek)
        t.prompt = t.tokens[t.prompt_since:][-(self.model.dims.n_text_ctx // 2 - 1):]
        return True

    def _needs_fallback(self, r) -> bool:
        """whisper.transcribe's rule: loops and unconfident text are retried, confident silence is not."""
        cfg = self.cfg.transcribe
        silence = r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold
        return (r.compression_ratio > cfg.compression_ratio_threshold
                or r.avg_logprob < cfg.logprob_threshold) and not silence

    @torch.no_grad()
    def _decode(self, active: list[Track]) -> None:
        """One round: the current window of every active track, batched by language and prompt
        length, with whisper's temperature fallback."""
        import whisper

        cfg = self.cfg.transcribe
        feats = {}
        todo = [t for t in active if t.seek not in t.features]
        for b in range(0, len(todo), cfg.batch_size):
            batch = todo[b:b + cfg.batch_size]
            out = self.model.embed_audio(torch.stack([self._mel(t, t.seek, t.segment_size) for t in batch]))
            feats.update({id(t): f for t, f in zip(batch, out)})
        for t in active:
            if t.seek in t.features:  # the scan's encoder output of a window start, used once
                feats[id(t)] = t.features.pop(t.seek)
        todo = sorted(active, key=lambda t: (t.language, len(t.prompt)))
        for t_index, temperature in enumerate(cfg.temperatures):
            groups: dict[tuple, list[Track]] = {}
            for t in todo:
                groups.setdefault((t.language, len(t.prompt)), []).append(t)
            for (language, _), group in groups.items():
                # as whisper.transcribe: beams at temperature 0, one sampled path above
                beams = ({"beam_size": cfg.beam_size, "patience": cfg.patience if cfg.beam_size else None}
                         if temperature == 0 else {})
                options = whisper.DecodingOptions(
                    task="transcribe", language=language, temperature=temperature,
                    sample_len=cfg.sample_len, fp16=self.fp16, without_timestamps=False, **beams)
                for b in range(0, len(group), cfg.batch_size):
                    batch = group[b:b + cfg.batch_size]
                    results = batched_decode(self.model, torch.stack([feats[id(t)] for t in batch]),
                                             options, [t.prompt for t in batch])
                    for t, result in zip(batch, results):
                        t.result = result
            if t_index == len(cfg.temperatures) - 1:
                break
            todo = [t for t in todo if self._needs_fallback(t.result)]
            if not todo:
                break

    def _verdict(self, r) -> str:
        cfg = self.cfg.transcribe
        if r.no_speech_prob > cfg.no_speech_threshold and not r.avg_logprob > cfg.logprob_threshold:
            return "no_speech"  # whisper.transcribe's skip
        if r.compression_ratio > cfg.compression_ratio_threshold:
            return "compression"
        if repetition(r.text) > cfg.max_repetition:
            return "repetition"
        return ""

    def _advance(self, t: Track) -> None:
        """Keep the round's segments (with words) and move the track's pointer."""
        t.rounds += 1
        verdict = self._verdict(t.result)
        if verdict:
            # whisper skips silence the same way; a dropped loop is not worth seeking in, nor a prompt
            t.verdicts[verdict] += 1
            t.seek += t.segment_size
            if verdict != "no_speech":
                t.prompt_since = len(t.tokens)
        else:
            self._keep(t)
        if self.cfg.transcribe.seek == "fixed":
            t.seek = t.clips[t.clip][1]  # one window per clip

    def _keep(self, t: Track) -> None:
        from whisper.timing import add_word_timestamps
        from whisper.utils import get_end

        cfg, r = self.cfg.transcribe, t.result
        tok = self._tokenizer(t.language)
        offset = t.seek * HOP_LENGTH / SAMPLE_RATE
        if cfg.seek == "timestamps":
            segments, advance, single_ending = seek_segments(r.tokens, tok, t.segment_size)
            for s in segments:
                s["text"] = tok.decode([x for x in s["tokens"] if x < tok.eot])
        else:
            segments = split_segments(r.tokens, tok, t.segment_size * HOP_LENGTH / SAMPLE_RATE)
            advance, single_ending = t.segment_size, True
        for s in segments:
            s.update(seek=t.seek, start=offset + s["start"], end=offset + s["end"], words=[])
        window_seek = t.seek
        t.seek += advance
        if cfg.word_timestamps and segments:
            try:
                add_word_timestamps(segments=segments, model=self.model, tokenizer=tok,
                                    mel=self._mel(t, window_seek, t.segment_size),
                                    num_frames=t.segment_size, last_speech_timestamp=t.last_speech)
            except Exception as exc:  # noqa: BLE001 - aligning garbage text may fail; keep the text
                log.debug("word alignment failed at %.2f s: %s", offset, exc)
                for s in segments:
                    s["words"] = []
            if not single_ending:
                last_word_end = get_end(segments)
                if last_word_end is not None and last_word_end > offset:
                    t.seek = round(last_word_end * FRAMES_PER_SECOND)
            last_word_end = get_end(segments)
            if last_word_end is not None:
                t.last_speech = last_word_end
        # as whisper.transcribe, an instantaneous segment (e.g. <|t|> text <|t|>) says nothing
        kept = [s for s in segments if s["text"].strip() and (s["start"] != s["end"] or cfg.seek == "fixed")]
        if cfg.seek == "timestamps":
            t.tokens.extend(x for s in kept for x in s["tokens"])
        else:
            t.tokens.extend(r.tokens)
        if not cfg.condition_on_previous_text or r.temperature > 0.5:
            t.prompt_since = len(t.tokens)
        for s in kept:
            t.segments.append({
                "start": round(float(s["start"]), 3), "end": round(float(s["end"]), 3),
                "text": s["text"].strip(), "avg_logprob": float(r.avg_logprob),
                "no_speech_prob": float(r.no_speech_prob), "compression_ratio": float(r.compression_ratio),
                "words": [{"word": x["word"], "start": round(float(x["start"]), 3),
                           "end": round(float(x["end"]), 3), "probability": float(x["probability"])}
                          for x in s.get("words", [])],
            })

    def _group(self, rows_in: list[dict]) -> list[dict]:
        cfg = self.cfg.transcribe
        rows = [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in rows_in]
        tracks: list[Track] = []
        for i, row in enumerate(rows_in):
            try:
                wav = audio.load_track(row, SAMPLE_RATE, 1, self.cfg.audio)[0]
            except audio.AudioError as exc:
                rows[i].update(status=STATUS_REJECTED, reason=exc.reason)
                continue
            tracks.append(self._track(i, np.ascontiguousarray(wav, dtype=np.float32)))
        self._scan(tracks)
        for t in tracks:
            self._plan(t)
        active = [t for t in tracks if self._next_window(t)]
        while active:
            self._decode(active)
            for t in active:
                self._advance(t)
            active = [t for t in active if self._next_window(t)]
        for t in tracks:
            t.features, t.mel = {}, None
            text = " ".join(s["text"] for s in t.segments)
            n_words = len(re.findall(r"\w+", text))
            reason = None
            if n_words < cfg.min_words:
                detail = ", ".join(f"{v} in {n} of {t.rounds} windows" for v, n in t.verdicts.items())
                reason = f"too_few_words: {n_words} < {cfg.min_words}" + (f" ({detail})" if detail else "")
            rows[t.index].update(
                language=t.language, language_prob=t.language_prob, no_speech_prob=float(min(t.no_speech)),
                text=text, windows=t.rounds, instrumental=reason is not None, instrumental_reason=reason,
                segments=[{k: v for k, v in s.items() if k != "words"} for s in t.segments],
                words=[x for s in t.segments for x in s["words"]])
        return rows

    def process(self, tracks: list[dict]) -> list[dict]:
        # Groups of batch_size tracks bound the audio, mel and encoder output held at once.
        rows: list[dict] = []
        size = self.cfg.transcribe.batch_size
        for b in range(0, len(tracks), size):
            rows.extend(self._group(tracks[b:b + size]))
        return rows


STAGE = TranscribeStage
