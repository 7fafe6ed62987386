"""Transcribe stage (DAG step 3): Whisper language, text, segments and word timestamps.

Runs on tracks the aesthetics stage kept. Each track (16 kHz mono from our loader) is cut
into 30 s windows, and the windows of a group of tracks are processed in batches:
  1. scan: one encoder pass and one decoder step per window give its no-speech and
     language probabilities (whisper's own values at the start-of-transcript position);
  2. decode: the most vocal windows of each track (at most transcribe.max_windows, lowest
     no-speech first: the vocal part of long tracks) are decoded in batches, greedy, with
     whisper's temperature fallback for windows whose output looks like a loop or is
     unconfident; the encoder features of the scan are reused;
  3. judge: a window's text is dropped as silence (no-speech high and unconfident, as in
     whisper) or as a hallucination (compression ratio, one word repeated); a track with
     fewer than transcribe.min_words kept words is `instrumental`, with the reason.
Instrumental tracks stay `ok` (the flag is data for the lyrics and pack stages). Windows
are decoded independently (no previous-text prompt), which is what makes them batchable.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from schemas.common import STATUS_OK, STATUS_REJECTED
from schemas.transcribe import TRANSCRIBE_SCHEMA
from tasks import audio
from tasks.models import resolve_checkpoint, resolve_device
from tasks.stage import Stage

SAMPLE_RATE = 16000          # whisper.audio.SAMPLE_RATE
WINDOW_S = 30                # whisper's fixed input length
HOP_LENGTH = 160             # mel frames are 10 ms
TIME_PRECISION = 0.02        # one timestamp token
CHECKPOINT_NAME = "model.pt"


def load_model(ref: str, device: torch.device | str = "cpu", download_root: str | None = None):
    """A Whisper model from an official name, a checkpoint file {"dims", "model_state_dict"},
    or a directory holding model.pt."""
    import whisper

    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if path.is_file():
        return whisper.load_model(str(path), device=device).eval()
    if ref in whisper.available_models():
        try:
            return whisper.load_model(ref, device=device, download_root=download_root).eval()
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(f"transcribe.model={ref!r}: could not download or read it "
                               f"({type(exc).__name__}: {str(exc)[:200]}); put the .pt file in "
                               "transcribe.download_root or set transcribe.model to its path") from exc
    raise RuntimeError(f"transcribe.model={ref!r} is neither a file nor a directory with {CHECKPOINT_NAME} "
                       f"nor a whisper model name ({', '.join(whisper.available_models())})")


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
    """Timestamped segments of one window's tokens: <|t0|> text <|t1|><|t1|> text <|t2|>.

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


def repetition(text: str) -> float:
    """Share of the words taken by the most frequent one (0 for fewer than 6 words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 6:
        return 0.0
    return Counter(words).most_common(1)[0][1] / len(words)


@dataclass(eq=False)
class Window:
    track: int                       # index into the tracks of the group
    offset: float                    # seconds from the track start
    samples: np.ndarray
    no_speech: float = 1.0
    language_probs: np.ndarray | None = None
    features: torch.Tensor | None = None
    result: object = None            # whisper DecodingResult
    verdict: str = ""                # "" kept, else why the text was dropped
    segments: list[dict] = field(default_factory=list)


class TranscribeStage(Stage):
    name = "transcribe"
    version = "1"
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

    def _mel(self, samples: np.ndarray) -> torch.Tensor:
        import whisper

        wav = whisper.pad_or_trim(torch.from_numpy(samples), SAMPLE_RATE * WINDOW_S)
        mel = whisper.log_mel_spectrogram(wav, self.model.dims.n_mels, device=self.device)
        return mel.half() if self.fp16 else mel  # (n_mels, 3000)

    @torch.no_grad()
    def _scan(self, windows: list[Window]) -> None:
        """Encoder features, no-speech and language probabilities of each window."""
        tok = self._tokenizer(None)
        for b in range(0, len(windows), self.cfg.transcribe.batch_size):
            batch = windows[b:b + self.cfg.transcribe.batch_size]
            feats = self.model.embed_audio(torch.stack([self._mel(w.samples) for w in batch]))
            sot = torch.full((len(batch), 1), tok.sot, dtype=torch.long, device=self.device)
            logits = self.model.logits(sot, feats)[:, 0].float()  # (B, n_vocab)
            no_speech = logits.softmax(-1)[:, tok.no_speech].cpu().numpy()
            lang = logits[:, self.language_tokens].softmax(-1).cpu().numpy()
            for i, w in enumerate(batch):
                w.no_speech, w.language_probs = float(no_speech[i]), lang[i]
                w.features = feats[i].cpu()

    def _verdict(self, w: Window) -> str:
        cfg, r = self.cfg.transcribe, w.result
        if r.no_speech_prob > cfg.no_speech_threshold and r.avg_logprob < cfg.logprob_threshold:
            return "no_speech"
        if r.compression_ratio > cfg.compression_ratio_threshold:
            return "compression"
        if repetition(r.text) > cfg.max_repetition:
            return "repetition"
        return ""

    @torch.no_grad()
    def _decode(self, windows: list[Window], languages: list[str]) -> None:
        """Batched greedy decoding with whisper's temperature fallback."""
        import whisper

        cfg = self.cfg.transcribe
        todo = list(windows)
        for t_index, temperature in enumerate(cfg.temperatures):
            todo.sort(key=lambda w: languages[w.track])  # one language per batch
            for b in range(0, len(todo), cfg.batch_size):
                batch = todo[b:b + cfg.batch_size]
                by_lang: dict[str, list[Window]] = {}
                for w in batch:
                    by_lang.setdefault(languages[w.track], []).append(w)
                for lang, group in by_lang.items():
                    options = whisper.DecodingOptions(
                        task="transcribe", language=lang, temperature=temperature,
                        sample_len=cfg.sample_len, fp16=self.fp16, without_timestamps=False)
                    feats = torch.stack([w.features for w in group]).to(self.device)
                    for w, result in zip(group, whisper.decode(self.model, feats, options)):
                        w.result = result
            if t_index == len(cfg.temperatures) - 1:
                break
            # whisper retries loops and unconfident text, but not confident silence
            todo = [w for w in todo if w.result.compression_ratio > cfg.compression_ratio_threshold
                    or (w.result.avg_logprob < cfg.logprob_threshold
                        and w.result.no_speech_prob <= cfg.no_speech_threshold)]
            if not todo:
                break

    def _segments(self, w: Window, language: str) -> None:
        """Segments (and words) of a kept window, in track time."""
        from whisper.timing import add_word_timestamps

        tok = self._tokenizer(language)
        duration = len(w.samples) / SAMPLE_RATE
        segs = split_segments(w.result.tokens, tok, duration)
        words_ok = False
        if self.cfg.transcribe.word_timestamps and segs:
            for s in segs:
                s["seek"] = 0
            try:
                add_word_timestamps(segments=segs, model=self.model, tokenizer=tok,
                                    mel=self._mel(w.samples),
                                    num_frames=math.ceil(len(w.samples) / HOP_LENGTH),
                                    last_speech_timestamp=0.0)
                words_ok = True
            except Exception:  # noqa: BLE001 - alignment of garbage text may fail; keep the text
                words_ok = False
        r = w.result
        for s in segs:
            words = s.get("words", []) if words_ok else []
            w.segments.append({
                "start": round(w.offset + float(s["start"]), 3), "end": round(w.offset + float(s["end"]), 3),
                "text": s["text"], "avg_logprob": float(r.avg_logprob),
                "no_speech_prob": float(r.no_speech_prob),
                "compression_ratio": float(r.compression_ratio),
                "words": [{"word": x["word"], "start": round(w.offset + float(x["start"]), 3),
                           "end": round(w.offset + float(x["end"]), 3),
                           "probability": float(x["probability"])} for x in words],
            })

    def _group(self, tracks: list[dict]) -> list[dict]:
        cfg = self.cfg.transcribe
        rows = [{"track_id": t["track_id"], "status": STATUS_OK, "reason": None} for t in tracks]
        windows: list[Window] = []
        step = SAMPLE_RATE * WINDOW_S
        for i, track in enumerate(tracks):
            try:
                wav = audio.load_track(track, SAMPLE_RATE, 1, self.cfg.audio)[0]
            except audio.AudioError as exc:
                rows[i].update(status=STATUS_REJECTED, reason=exc.reason)
                continue
            for start in range(0, len(wav), step):
                chunk = wav[start:start + step]
                if len(chunk) >= SAMPLE_RATE // 10 or start == 0:  # drop a <0.1 s tail
                    windows.append(Window(i, start / SAMPLE_RATE, chunk))
        self._scan(windows)

        per_track: dict[int, list[Window]] = {}
        for w in windows:
            per_track.setdefault(w.track, []).append(w)
        languages: dict[int, str] = {}
        chosen: list[Window] = []
        for i, ws in per_track.items():
            picked = sorted(ws, key=lambda w: w.no_speech)[:cfg.max_windows]
            picked.sort(key=lambda w: w.offset)
            weights = np.array([1.0 - w.no_speech for w in picked]) + 1e-6
            probs = np.average(np.stack([w.language_probs for w in picked]), axis=0, weights=weights)
            lang = cfg.language or self.language_codes[int(np.argmax(probs))]
            languages[i] = lang
            rows[i].update(language=lang, language_prob=float(probs[self.language_codes.index(lang)]),
                           no_speech_prob=float(min(w.no_speech for w in ws)))
            chosen.extend(picked)
            keep = {id(w) for w in picked}
            for w in ws:
                if id(w) not in keep:
                    w.features = None  # only decoded windows keep their encoder output
        self._decode(chosen, languages)

        for w in chosen:
            w.verdict = self._verdict(w)
            w.features = None
            if not w.verdict:
                self._segments(w, languages[w.track])
        for i, ws in per_track.items():
            decoded = [w for w in ws if w.result is not None]
            segments = [s for w in decoded for s in w.segments]
            text = " ".join(s["text"] for s in segments)
            n_words = len(re.findall(r"\w+", text))
            reason = None
            if n_words < cfg.min_words:
                dropped = Counter(w.verdict for w in decoded if w.verdict)
                detail = ", ".join(f"{v} in {n} of {len(decoded)} windows" for v, n in dropped.items())
                reason = f"too_few_words: {n_words} < {cfg.min_words}" + (f" ({detail})" if detail else "")
            rows[i].update(
                text=text, windows=len(decoded), instrumental=reason is not None, instrumental_reason=reason,
                segments=[{k: v for k, v in s.items() if k != "words"} for s in segments],
                words=[x for s in segments for x in s["words"]])
        return rows

    def process(self, tracks: list[dict]) -> list[dict]:
        # Groups of batch_size tracks bound the audio and encoder output held at once.
        rows: list[dict] = []
        size = self.cfg.transcribe.batch_size
        for b in range(0, len(tracks), size):
            rows.extend(self._group(tracks[b:b + size]))
        return rows


STAGE = TranscribeStage
