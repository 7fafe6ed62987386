"""Caption stage over HTTP: a real server process (tasks.caption_server, loopback only,
bounded, killed by PID) serves the tiny twin through the same adapter; the stage's openai
backend gets the answers the adapter gives in process, an answer the server reports cut
(finish_reason "length") is retried once with the larger budget, a structured answer lands in
the stage's rows with its recaption and finish_reason, 4xx become rows, timeouts
and unreachable servers raise TransientError (Prefect retries), bad requests are refused."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from schemas.caption import CAPTION_SCHEMA
from schemas.common import STATUS_ERROR
from schemas.config import load_config
from tasks import audio
from tasks.caption import SAMPLE_RATE, CaptionStage, Generation, OmniThinker, clip_window
from tasks.caption_http import encode_wav
from tasks.caption_server import Batcher, make_handler, parse_args
from tasks.models import resolve_checkpoint
from tasks.stage import TransientError
from test_caption import GOOD_JSON, GOOD_VARIANTS, corpus_songs, track_row  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parent.parent
SERVED = "qwen-omni-twin"
STARTUP_S = 90


@pytest.fixture(scope="module")
def twin(tiny_models_dir) -> str:
    return resolve_checkpoint("tiny:qwen_omni", tiny_models_dir)  # built here, not by the server


@pytest.fixture(scope="module")
def server(twin):
    """The server as its own process on 127.0.0.1 (free port), for this module only."""
    cmd = [sys.executable, "-m", "tasks.caption_server", "--checkpoint", twin, "--served-model", SERVED,
           "--host", "127.0.0.1", "--port", "0", "--device", "cpu", "--batch-size", "4",
           "--max-seconds", "300"]
    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not any("listening on" in ln for ln in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"caption server did not start (rc={proc.poll()}): {log.read()[-2000:]}")
            time.sleep(0.1)
        url = next(ln for ln in lines if "listening on" in ln).split("listening on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def make_stage(tiny_models_dir):
    def make(*overrides: str) -> CaptionStage:
        cfg = load_config("tiny", [f"models.tiny_dir={tiny_models_dir}", "device=cpu", "caption.backend=openai",
                                   f"caption.served_model={SERVED}", "caption.max_new_tokens=16",
                                   "caption.clip_s=10", "caption.on_malformed=reject", *overrides], environ={})
        stage = CaptionStage(cfg)
        stage.setup()
        return stage
    return make


@pytest.fixture(scope="module")
def songs(synth_corpus) -> list[dict]:
    return [track_row(path, {"tempo_phrase": "120 BPM", "key_phrase": None})
            for path, _ in corpus_songs(synth_corpus, "song")][:3]


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_stage_over_http_gets_what_the_adapter_says_in_process(server, make_stage, songs, twin):
    stage = make_stage(f"caption.url={server}", "caption.batch_size=1", "caption.retry_max_new_tokens=32")
    rows = stage.process(songs)
    pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    assert [r["backend"] for r in rows] == ["openai"] * 3 and rows[0]["model"] == SERVED
    # the twin never ends an answer: the server says "length" at 16 tokens, the stage asks again
    # with 32, and the server's second answer (32 tokens, cut again) is the row's
    for row in rows:
        assert row["raw"] and row["reason"].startswith("truncated_caption: 32 tokens, no end of answer")
        assert row["finish_reason"] == "length"
    # The same clips as the server decodes them (16-bit WAV), through the adapter here.
    cfg = stage.cfg.caption
    model = OmniThinker(twin, "cpu")
    for row, song in zip(rows, songs):
        start, seconds = clip_window(song["duration"], cfg.clip_s)
        clip = audio.load_track(song, SAMPLE_RATE, 1, stage.cfg.audio, start, seconds)[0]
        heard, _ = sf.read(io.BytesIO(encode_wav(clip)), dtype="float32")
        gen = model.generate([heard], [cfg.prompt], cfg.system_prompt, cfg.retry_budget, cfg.temperature)[0]
        assert row["raw"] == gen.text


class ScriptedModel:
    """Stands in for OmniThinker behind the real server code: answers are cut below `ends_at`
    tokens and whole from there on; every generate() budget is recorded."""

    def __init__(self, ends_at: int):
        self.ends_at, self.budgets = ends_at, []

    def generate(self, clips, prompts, systems, max_new_tokens, temperature=0.0):
        self.budgets.append(max_new_tokens)
        if max_new_tokens < self.ends_at:
            return [Generation('{"description": "A bright', 90, max_new_tokens, "length") for _ in clips]
        return [Generation(GOOD_JSON, 90, self.ends_at, "stop") for _ in clips]


@pytest.fixture
def scripted_server():
    """tasks.caption_server's handler and batcher in this process, on 127.0.0.1, over a ScriptedModel."""
    from http.server import ThreadingHTTPServer

    model = ScriptedModel(ends_at=20)
    args = parse_args(["--checkpoint", SERVED])
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Batcher(model, 4, 0.02), SERVED, args))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", model
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_server_reports_why_an_answer_ended_and_the_stage_retries_a_cut_one(scripted_server, make_stage,
                                                                                  songs):
    url, model = scripted_server
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    body = {"model": SERVED, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(tone)).decode(), "format": "wav"}},
        {"type": "text", "text": "Describe."}]}]}
    cut, whole = post(url, {**body, "max_tokens": 16})[1], post(url, {**body, "max_tokens": 32})[1]
    assert (cut["choices"][0]["finish_reason"], cut["usage"]["completion_tokens"]) == ("length", 16)
    assert (whole["choices"][0]["finish_reason"], whole["usage"]["completion_tokens"]) == ("stop", 20)

    model.budgets.clear()
    rows = make_stage(f"caption.url={url}", "caption.max_new_tokens=16", "caption.retry_max_new_tokens=32", "caption.batch_size=1").process(songs[:2])
    assert sorted(model.budgets) == [16, 16, 32, 32]  # each song: cut at 16, whole at 32
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["raw"] for r in rows] == [GOOD_JSON, GOOD_JSON]


def test_a_structured_answer_over_http_lands_in_the_stage_output_with_its_variants(scripted_server, make_stage,
                                                                                    songs):
    url, _ = scripted_server
    rows = make_stage(f"caption.url={url}", "caption.max_new_tokens=32",
                      "caption.retry_max_new_tokens=32").process(songs[:2])
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)  # what the runner writes for the partition
    assert table.column("status").to_pylist() == ["ok", "ok"]
    assert table.column("finish_reason").to_pylist() == ["stop", "stop"]
    assert table.column("recaption").to_pylist() == [GOOD_VARIANTS, GOOD_VARIANTS]
    assert table.column("description").to_pylist() == ["A bright pop song with synths and a female singer."] * 2
    assert table.column("tags").to_pylist()[0][:3] == ["pop", "dance pop", "synthesizer"]
    assert table.column("tags").to_pylist()[0][-1] == "120 bpm"  # the rhythm phrase of these songs


def test_concurrent_requests_all_get_answers(server, make_stage, songs):
    rows = make_stage(f"caption.url={server}", "caption.batch_size=3").process(songs)
    assert [r["track_id"] for r in rows] == [s["track_id"] for s in songs]
    assert all(r["raw"] for r in rows)


def test_a_refused_request_is_that_tracks_error_row(server, make_stage, songs):
    rows = make_stage(f"caption.url={server}", "caption.served_model=some-other-model").process(songs[:2])
    assert [r["status"] for r in rows] == [STATUS_ERROR, STATUS_ERROR]
    assert rows[0]["reason"].startswith("server_rejected: HTTP 404") and "some-other-model" in rows[0]["reason"]


def test_a_slow_or_absent_server_raises_transient_error(server, make_stage, songs):
    with pytest.raises(TransientError, match="timeout_s"):
        make_stage(f"caption.url={server}", "caption.timeout_s=0.01").process(songs[:1])
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TransientError, match="unreachable"):
        make_stage(f"caption.url=http://127.0.0.1:{port}/v1").process(songs[:1])


def test_the_server_lists_its_model_and_refuses_bad_requests(server):
    with urllib.request.urlopen(server + "/models", timeout=10) as response:
        assert [m["id"] for m in json.load(response)["data"]] == [SERVED]

    def wav_part(samples: np.ndarray) -> dict:
        return {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(samples)).decode(),
                                                       "format": "wav"}}
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    ok = {"model": SERVED, "max_tokens": 4, "temperature": 0,
          "messages": [{"role": "user", "content": [wav_part(tone), {"type": "text", "text": "Describe."}]}]}
    status, body = post(server, ok)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"  # the twin never ends an answer
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] > 50

    no_audio = {**ok, "messages": [{"role": "user", "content": "Describe."}]}
    assert post(server, no_audio)[0] == 400
    silent = {**ok, "messages": [{"role": "user", "content": [wav_part(np.zeros(SAMPLE_RATE * 2, np.float32))]}]}
    status, body = post(server, silent)
    assert status == 400 and "silent" in body["error"]["message"]
    garbage = {**ok, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}]}
    assert post(server, garbage)[0] == 400
    assert post(server, {**ok, "max_tokens": 10**6})[0] == 400
