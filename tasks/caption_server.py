"""A small OpenAI-compatible chat-completions server for Qwen2.5-Omni: audio in, text out.

Serves tasks.caption.OmniThinker, the adapter the caption stage runs in process, for
tests, demos and small teams without vLLM (at scale, serve the model with vLLM; the stage's
openai backend speaks to either):
    python -m tasks.caption_server --checkpoint Qwen/Qwen2.5-Omni-7B --port 8000
Requests that arrive together are generated as one batch (up to --batch-size, waiting at
most --batch-wait-ms for company). Endpoints: POST /v1/chat/completions (one `input_audio`
part, base64 in any format our loader reads, plus text parts), GET /v1/models, GET /health.
Binds 127.0.0.1 unless --host says otherwise; --max-seconds bounds its life (tests).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import queue
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from schemas.caption import QWEN_SYSTEM_PROMPT
from schemas.config import AudioConfig
from tasks import audio
from tasks.caption import SAMPLE_RATE, OmniThinker
from tasks.models import resolve_checkpoint, resolve_device


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Job:
    clip: np.ndarray
    system: str
    prompt: str
    max_tokens: int
    temperature: float
    done: Future = field(default_factory=Future)


class Batcher:
    """One thread owns the model; requests queue here and are generated in batches."""

    def __init__(self, model: OmniThinker, batch_size: int, wait_s: float):
        self.model, self.batch_size, self.wait_s = model, batch_size, wait_s
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._loop, name="caption-batcher", daemon=True).start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.done

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.batch_size and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            groups: dict[tuple, list[Job]] = {}
            for job in batch:  # one generate() per sampling setting
                groups.setdefault((job.max_tokens, job.temperature), []).append(job)
            for (max_tokens, temperature), jobs in groups.items():
                try:
                    gens = self.model.generate([j.clip for j in jobs], [j.prompt for j in jobs],
                                               [j.system for j in jobs], max_tokens, temperature)
                    for job, gen in zip(jobs, gens):
                        job.done.set_result(gen)
                except Exception as exc:  # noqa: BLE001 - each waiting request gets a 500
                    for job in jobs:
                        job.done.set_exception(exc)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise BadRequest(400, "message content must be a string or a list of content parts")


def _decode_audio(part: dict, audio_cfg: AudioConfig) -> np.ndarray:
    spec = part.get("input_audio") or {}
    try:
        data = base64.b64decode(spec.get("data", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, f"input_audio.data is not base64: {exc}") from exc
    suffix = "." + str(spec.get("format") or "wav").lower().strip(".")
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:  # our loader reads paths (and probes them)
        tmp.write(data)
        tmp.flush()
        try:
            return audio.load(tmp.name, SAMPLE_RATE, 1, audio_cfg)[0]
        except audio.AudioError as exc:
            raise BadRequest(400, f"input_audio refused: {exc.reason}") from exc


def parse_chat(body: dict, served_model: str, audio_cfg: AudioConfig, max_tokens_cap: int) -> Job:
    """A chat-completions body -> a Job, or BadRequest saying what is wrong with it."""
    if body.get("model") not in (None, served_model):
        raise BadRequest(404, f"model {body.get('model')!r} is not served here (this server: {served_model!r})")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list")
    system = "\n".join(_text(m.get("content", "")) for m in messages if m.get("role") == "system")
    system = system or QWEN_SYSTEM_PROMPT  # what the model was tuned with
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise BadRequest(400, "no user message")
    content = user[-1].get("content")
    parts = content if isinstance(content, list) else []
    audio_parts = [p for p in parts if isinstance(p, dict) and p.get("type") == "input_audio"]
    if len(audio_parts) != 1:
        raise BadRequest(400, f"the last user message needs exactly one input_audio part (got {len(audio_parts)})")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    temperature = body.get("temperature", 1.0)  # OpenAI's default
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_cap:
        raise BadRequest(400, f"max_tokens must be an integer in 1..{max_tokens_cap}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(400, "temperature must be a number >= 0")
    return Job(_decode_audio(audio_parts[0], audio_cfg), system, _text(content), max_tokens, float(temperature))


def make_handler(batcher: Batcher, served_model: str, args) -> type[BaseHTTPRequestHandler]:
    # cache_mb=0: request audio lives in temp files whose names may come back
    audio_cfg = AudioConfig(max_duration_s=args.max_audio_s, cache_mb=0)

    class Handler(BaseHTTPRequestHandler):
        server_version = "acepipe-caption/1"

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"
                                          if status < 500 else "server_error", "code": status}})

        def log_message(self, fmt, *log_args) -> None:
            if args.verbose:
                super().log_message(fmt, *log_args)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": served_model, "object": "model",
                                                             "owned_by": "acepipe"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > args.max_body_mb * 2**20:
                return self._error(413, f"request body over {args.max_body_mb} MB")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                job = parse_chat(body if isinstance(body, dict) else {}, served_model, audio_cfg, args.max_tokens)
            except json.JSONDecodeError as exc:
                return self._error(400, f"body is not JSON: {exc}")
            except BadRequest as exc:
                return self._error(exc.status, str(exc))
            try:
                gen = batcher.submit(job).result(timeout=args.request_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the client retries 5xx
                return self._error(500, f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served_model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "finish_reason": gen.finish_reason}],
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                          "total_tokens": gen.prompt_tokens + gen.completion_tokens},
            })

    return Handler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tasks.caption_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="local dir, hub id, or tiny:qwen_omni")
    p.add_argument("--tiny-dir", default=".cache/tiny-models", help="where tiny: twins are built")
    p.add_argument("--served-model", default=None, help="model name clients send (default: --checkpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask")
    p.add_argument("--max-audio-s", type=float, default=600.0)
    p.add_argument("--max-body-mb", type=float, default=100.0)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--max-seconds", type=float, default=None, help="shut down after this long")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ref = resolve_checkpoint(args.checkpoint, args.tiny_dir)
    model = OmniThinker(ref, resolve_device(args.device), args.dtype, setting="--checkpoint")
    served_model = args.served_model or args.checkpoint
    batcher = Batcher(model, args.batch_size, args.batch_wait_ms / 1000)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(batcher, served_model, args))
    server.daemon_threads = True
    host, port = server.server_address[:2]
    if args.max_seconds:
        stop = threading.Timer(args.max_seconds, server.shutdown)
        stop.daemon = True
        stop.start()
    # the line a supervisor (or a test) waits for
    print(f"caption server listening on http://{host}:{port}/v1 (model {served_model!r}, pid {os.getpid()})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
