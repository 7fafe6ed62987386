"""Caption stage (DAG step 5): Qwen2.5-Omni describes each kept track, in words and tags.

Runs on tracks that aesthetics kept, after rhythm (its BPM and key phrases are merged into
the tags). The model hears caption.clip_s seconds from the middle of the track (16 kHz
mono from our loader) and answers caption.prompt in one generation: a JSON object with the
description, the phrase lists and ACE-Step's description variants, which
tasks/caption_parse.py reads into `description`, `tags` (phrases normalised) and `recaption`
(the keys ACE-Step's trainer reads); `finish_reason` says whether the answer ended or was cut.
Two backends give the same rows:
  - transformers: the Qwen2.5-Omni *thinker* only (text out; the talker and token2wav are
    never built) with its processor, batched generate() in this process;
  - openai: an OpenAI-compatible chat-completions server with audio input, as teams serve
    Qwen-Omni with vLLM (tasks/caption_http.py; tasks/caption_server.py serves our adapter).
Reason codes beyond schemas.common.REASONS:
  - malformed_caption: the model's text has no usable description or tags (raw kept);
  - truncated_caption: the answer ran out of tokens before its end token (transformers: no
    end-of-turn token within max_new_tokens; OpenAI: finish_reason "length") at
    caption.max_new_tokens and again at caption.retry_max_new_tokens (raw kept). A cut
    answer is always retried, even when it parses: labelled lines cut mid-list parse too;
  - server_rejected: the server refused the request (HTTP 4xx); timeouts and 5xx are not
    rows but TransientError, so Prefect retries the partition.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from transformers import Qwen2_5OmniProcessor

from schemas.caption import CAPTION_SCHEMA, CaptionConfig
from schemas.common import STATUS_ERROR, STATUS_OK, STATUS_REJECTED
from tasks import audio
from tasks.caption_parse import MalformedCaption, caption_fields
from tasks.models import loading, resolve_checkpoint, resolve_device
from tasks.stage import Stage

SAMPLE_RATE = 16000          # the processor's WhisperFeatureExtractor rate
# Token ids of the released tokenizer that the thinker's config refers to.
VISION_START_TOKEN_ID = 151652
# The special tokens Qwen2_5OmniProcessor reads off its tokenizer, as released.
PROCESSOR_TOKENS = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


# ---- the transformers backend: Qwen2.5-Omni thinker + processor -----------------------------

class AudioOmniProcessor(Qwen2_5OmniProcessor):
    """Qwen2_5OmniProcessor without its image and video processors.

    The released processor also loads a Qwen2-VL video processor, which needs torchvision
    (not installed here: each torchvision wheel is built for one exact torch). Captioning audio needs
    only the tokenizer, the WhisperFeatureExtractor and the chat template; the inherited
    __call__ reads the vision processors' merge_size alone, and only for image/video tokens.
    """
    attributes = ["feature_extractor", "tokenizer"]

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None, **kwargs):
        super(Qwen2_5OmniProcessor, self).__init__(feature_extractor, tokenizer, chat_template=chat_template)
        self.image_processor = self.video_processor = SimpleNamespace(merge_size=2)
        for name, token in PROCESSOR_TOKENS.items():  # tokenizers that do not name them get the released ones
            setattr(self, name, getattr(tokenizer, name, None) or token)


@dataclass
class Generation:
    """One answer, from either backend."""
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None    # tokens generated, the end token included (OpenAI's usage count)
    finish_reason: str               # OpenAI's words: "stop" (ended with an end token), "length" (cut
                                     # at the token budget); servers may say others ("abort", ...)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


class LastPositionHead(torch.nn.Module):
    """The thinker's lm_head scoring only the last position, the one generate() reads.

    Unlike most causal LMs in transformers, the thinker's forward has no logits_to_keep: the
    prefill of a 30 s clip (~1,000 positions x 152k vocabulary) would materialise 0.57 GiB of
    float32 logits per track on CPU (0.28 GiB bf16 on GPU), and dominate the twin's time.
    """

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden[:, -1:, :])  # (B, T, H) -> (B, 1, V)


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def thinker_config(ref: str):
    """The thinker's config from a full Qwen2.5-Omni checkpoint (or a thinker-only one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(ref)
    config = getattr(config, "thinker_config", config)
    if getattr(config, "vision_start_token_id", None) is None:
        # read by the position-id code of every forward; some configs leave it out
        config.vision_start_token_id = VISION_START_TOKEN_ID
    return config


class OmniThinker:
    """Qwen2.5-Omni's thinker and processor: 16 kHz clips and prompts in, text out.

    `ref` is a checkpoint directory or hub id of the full model; from_pretrained strips the
    `thinker.` prefix and leaves the talker/token2wav weights unread. `setting` names where
    `ref` came from in load errors (the stage's config field, the server's flag).
    """

    def __init__(self, ref: str, device: torch.device | str = "cpu", dtype: str = "auto",
                 attn_implementation: str | None = None, setting: str = "caption.checkpoint"):
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        self.device = torch.device(device)
        self.ref = ref
        with loading(setting, ref, f"set {setting} to a local copy of Qwen/Qwen2.5-Omni-7B (or a hub id "
                     "this machine can download) or to tiny:qwen_omni"):
            self.processor = AudioOmniProcessor.from_pretrained(ref)
            model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
                ref, config=thinker_config(ref), dtype=_dtype(dtype, self.device),
                attn_implementation=attn_implementation)
        model.visual = None  # audio in, text out: the vision tower (0.68 B params in the release) never runs
        model.lm_head = LastPositionHead(model.lm_head)
        self.model = model.to(self.device).eval()
        self.end_ids = {self.processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}

    def _text(self, system: str, prompt: str) -> str:
        conversation = [{"role": "system", "content": [{"type": "text", "text": system}]},
                        {"role": "user", "content": [{"type": "audio", "audio": "clip"},
                                                     {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def inputs(self, clips: list[np.ndarray], prompts: list[str], system: str | list[str]):
        """The model inputs for a batch: left-padded input_ids with one <|AUDIO|> per 40 ms, and
        log-mel input_features with feature_attention_mask, on the model's device.

        The reference processor pads every clip to its feature extractor's n_samples (300 s in
        the release); we pad the batch only to its longest clip, rounded up to a whole hop past
        half a window, so every frame the mask keeps sees zeros after the clip as in the
        reference, and the mask counts ceil(samples / hop) frames as the reference does. The
        thinker reads only the masked frames, so the answers are the same (test ..._parity_...)."""
        systems = [system] * len(clips) if isinstance(system, str) else system
        texts = [self._text(s, p) for s, p in zip(systems, prompts)]
        features = self.processor.feature_extractor
        longest = max(len(c) for c in clips) + features.n_fft // 2
        max_length = min(-(-longest // features.hop_length) * features.hop_length, features.n_samples)
        inputs = self.processor(text=texts, audio=list(clips), padding=True, return_tensors="pt",
                                audio_kwargs={"max_length": max_length, "sampling_rate": SAMPLE_RATE})
        inputs = inputs.to(self.device)
        inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
        return inputs

    @torch.no_grad()
    def generate(self, clips: list[np.ndarray], prompts: list[str], system: str | list[str],
                 max_new_tokens: int, temperature: float = 0.0) -> list[Generation]:
        """One answer per (clip, prompt); the batch is left-padded and generated together.
        finish_reason is "stop" when the answer reached an end token, "length" when it was cut
        at max_new_tokens."""
        inputs = self.inputs(clips, prompts, system)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = self.processor.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  eos_token_id=sorted(self.end_ids), **sampling)
        prompt_len = inputs["input_ids"].shape[1]
        results = []
        for i, row in enumerate(out[:, prompt_len:].tolist()):
            # generate() stops at an end token or at max_new_tokens; rows that ended early in a
            # batch are padded after their end token
            ended = next((j for j, t in enumerate(row) if t in self.end_ids), None)
            tokens = row if ended is None else row[:ended]
            results.append(Generation(
                text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                prompt_tokens=int(inputs["attention_mask"][i].sum()),
                completion_tokens=len(row) if ended is None else ended + 1,
                finish_reason="length" if ended is None else "stop"))
        return results


# ---- the stage ------------------------------------------------------------------------------

def clip_window(duration: float, clip_s: float) -> tuple[float, float]:
    """(start, seconds) of the clip the model hears: the middle clip_s seconds."""
    seconds = min(clip_s, duration)
    return max((duration - seconds) / 2.0, 0.0), seconds


class CaptionStage(Stage):
    name = "caption"
    version = "3"                # 2: cut answers retried / truncated_caption; audio frames as the reference
                                 # 3: one answer also holds ACE-Step's variants: recaption, finish_reason
    inputs = ("aesthetics", "rhythm")
    schema = CAPTION_SCHEMA
    uses_gpu = True

    def fingerprint(self) -> dict:
        # how the server is reached does not change what it says
        found = super().fingerprint()
        for key in ("timeout_s", "api_key", "url"):
            (found["section"] or {}).pop(key, None)
        return found

    def setup(self) -> None:
        cfg: CaptionConfig = self.cfg.caption
        if cfg.backend == "openai":
            from tasks.caption_http import ChatEndpoint

            self.backend = ChatEndpoint(cfg)
            self.model_name = cfg.served_model
        else:
            device = resolve_device(self.cfg.device)
            ref = resolve_checkpoint(cfg.checkpoint, self.cfg.models.tiny_dir)
            self.backend = OmniThinker(ref, device, cfg.dtype, cfg.attn_implementation)
            self.model_name = cfg.checkpoint

    def _generate(self, clips: list[np.ndarray], max_new_tokens: int) -> list[Generation | Exception]:
        cfg: CaptionConfig = self.cfg.caption
        if cfg.backend == "openai":
            return self.backend.caption(clips, max_new_tokens)
        return self.backend.generate(clips, [cfg.prompt] * len(clips), cfg.system_prompt,
                                     max_new_tokens, cfg.temperature)

    def _answers(self, clips: list[np.ndarray]) -> list[Generation | Exception]:
        """One answer per clip; answers cut at max_new_tokens are generated again, together,
        with caption.retry_max_new_tokens. Regenerated rather than continued: the chat API has
        no portable way to continue an answer, and cut answers should be rare at the default."""
        cfg: CaptionConfig = self.cfg.caption
        answers = self._generate(clips, cfg.max_new_tokens)
        cut = [i for i, a in enumerate(answers) if isinstance(a, Generation) and a.truncated]
        if cut and cfg.retry_budget > cfg.max_new_tokens:
            for i, answer in zip(cut, self._generate([clips[i] for i in cut], cfg.retry_budget)):
                answers[i] = answer
        return answers

    def _row(self, track: dict, answer: Generation | Exception) -> dict:
        cfg: CaptionConfig = self.cfg.caption
        row = {"track_id": track["track_id"], "backend": cfg.backend, "model": self.model_name}
        if isinstance(answer, Exception):
            return {**row, "status": STATUS_ERROR, "reason": f"server_rejected: {str(answer)[:300]}"}
        row["raw"], row["finish_reason"] = answer.text, answer.finish_reason
        if answer.truncated and cfg.on_malformed != "keep_raw":
            tokens = answer.completion_tokens or cfg.retry_budget
            retried = (f"after a retry at caption.retry_max_new_tokens={cfg.retry_budget}"
                       if cfg.retry_budget > cfg.max_new_tokens else
                       f"no retry: caption.retry_max_new_tokens={cfg.retry_budget} = max_new_tokens")
            return {**row, "status": STATUS_REJECTED,
                    "reason": f"truncated_caption: {tokens} tokens, no end of answer ({retried}; "
                              "raise it if answers are long)"}
        try:
            fields = caption_fields(answer.text, track.get("rhythm"), cfg)
        except MalformedCaption as exc:
            return {**row, "status": STATUS_REJECTED, "reason": f"malformed_caption: {exc}"}
        return {**row, **fields, "status": STATUS_OK, "reason": None}

    def process(self, tracks: list[dict]) -> list[dict]:
        cfg: CaptionConfig = self.cfg.caption
        rows: dict[str, dict] = {}
        for b in range(0, len(tracks), cfg.batch_size):
            batch, clips = [], []
            for track in tracks[b:b + cfg.batch_size]:
                start, seconds = clip_window(float(track["duration"]), cfg.clip_s)
                try:
                    clip = audio.load_track(track, SAMPLE_RATE, 1, self.cfg.audio, start, seconds)[0]
                except audio.AudioError as exc:
                    rows[track["track_id"]] = {"track_id": track["track_id"], "status": STATUS_REJECTED,
                                               "reason": exc.reason, "backend": cfg.backend}
                    continue
                batch.append((track, start, len(clip) / SAMPLE_RATE))
                clips.append(clip)
            if not clips:
                continue
            for (track, start, seconds), answer in zip(batch, self._answers(clips)):
                rows[track["track_id"]] = {**self._row(track, answer), "clip_start": start, "clip_s": seconds}
        return [rows[t["track_id"]] for t in tracks]


STAGE = CaptionStage
