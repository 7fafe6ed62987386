"""The caption stage's second backend: an OpenAI-compatible chat-completions server with audio.

How teams run Qwen2.5-Omni at scale: `vllm serve Qwen/Qwen2.5-Omni-7B` (or our
tasks/caption_server.py for small setups and tests) behind caption.url. Each clip goes as
one request, a 16 kHz mono 16-bit WAV in an `input_audio` content part followed by the
prompt; caption.batch_size requests are in flight at once so the server can batch them.
An answer's finish_reason "length" (cut at max_tokens) is what the stage retries with
caption.retry_max_new_tokens, as it does for the transformers backend.
A timeout, a refused connection, 429 or 5xx raises TransientError (Prefect retries the
partition with back-off); any other 4xx is that track's answer: a `server_rejected` row.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

from schemas.caption import CaptionConfig
from tasks.caption import Generation
from tasks.stage import TransientError

SAMPLE_RATE = 16000


class ServerRejected(RuntimeError):
    """The server answered 4xx: retrying the same request would not help."""


def encode_wav(clip: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """Mono float samples -> 16-bit PCM WAV bytes (what goes over the wire)."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(clip, dtype=np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def chat_request(clip: np.ndarray, cfg: CaptionConfig, max_tokens: int) -> dict:
    """The chat-completions body for one clip (OpenAI's audio-input message format)."""
    audio_part = {"type": "input_audio",
                  "input_audio": {"data": base64.b64encode(encode_wav(clip)).decode("ascii"), "format": "wav"}}
    return {
        "model": cfg.served_model,
        "messages": [
            {"role": "system", "content": cfg.system_prompt},
            {"role": "user", "content": [audio_part, {"type": "text", "text": cfg.prompt}]},
        ],
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
    }


class ChatEndpoint:
    """caption(clips, max_tokens) -> the assistant's answer per clip, or a ServerRejected for a 4xx."""

    def __init__(self, cfg: CaptionConfig):
        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + "/chat/completions"

    def _post(self, body: dict) -> Generation | ServerRejected:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if exc.code >= 500 or exc.code in (408, 429):
                raise TransientError(f"caption server {self.url} answered HTTP {exc.code}: {detail}") from exc
            return ServerRejected(f"HTTP {exc.code} from {self.url}: {detail}")
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientError(f"caption server {self.url} unreachable or slower than "
                                 f"caption.timeout_s={self.cfg.timeout_s}: {reason}") from exc
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ServerRejected(f"response from {self.url} has no choices[0].message.content: "
                                  f"{json.dumps(payload)[:200]}")
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        # a server that leaves finish_reason out is taken at its word that the answer is whole
        return Generation(text=text, prompt_tokens=usage.get("prompt_tokens"),
                          completion_tokens=usage.get("completion_tokens"),
                          finish_reason=choice.get("finish_reason") or "stop")

    def caption(self, clips: list[np.ndarray], max_tokens: int) -> list[Generation | ServerRejected]:
        bodies = [chat_request(clip, self.cfg, max_tokens) for clip in clips]
        with ThreadPoolExecutor(max_workers=min(len(bodies), self.cfg.batch_size) or 1) as pool:
            return list(pool.map(self._post, bodies))
