"""Engine fixtures.

- `openai_stub`: factory of tiny local OpenAI-compatible HTTP servers (127.0.0.1, stdlib only) with a
  chosen behaviour: "ok" (echoes the prompt), "500" (every request fails, health checks included),
  "slow" (chat requests sleep past the client timeout, health checks answer), "flaky" (the first
  `fail_first` chat requests get 500). They record request bodies and the peak number in flight.
- `bundled_model_path`: the bundled model converted once (in $DITTO_CACHE or ~/.cache/ditto).
- `vllm_engine`: ONE in-process vLLM engine per test session, obtained through get_engine. Its very
  first call (the reproducibility prompts) is recorded in `vllm_first_outputs`.
- `vllm_server`: ONE `python -m vllm.entrypoints.openai.api_server` per session on a free port.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from engines.base import Sampling
from models.config.engine import EngineConfig

# Every real-engine test uses this config, so the session shares one engine (and vLLM's compile cache).
VLLM_CONFIG = EngineConfig(kind="vllm", seed=0, max_model_len=2048)
# One request: vLLM's engine core may start stepping before all requests of a call have arrived,
# so only a single-request call has a batch composition (and so RNG use) fixed across engines.
REPRO_CHATS = [
    [{"role": "system", "content": "You are Sherlock Holmes, the detective of Baker Street."},
     {"role": "user", "content": "Tell me about your most curious case."}]
]
REPRO_SAMPLING = Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.1, max_tokens=24)


class StubServer:
    def __init__(self, mode: str = "ok", delay: float = 0.0, fail_first: int = 0, model: str = "stub-model"):
        self.mode, self.delay, self.fail_first, self.model = mode, delay, fail_first, model
        self.bodies: list[dict] = []
        self.chat_hits = 0
        self.health_hits = 0
        self.in_flight = 0
        self.peak = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                with stub._lock:
                    stub.health_hits += 1
                if stub.mode == "500":
                    return self._send(500, {"error": "broken"})
                if self.path.endswith("/models"):
                    return self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]})
                return self._send(200, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub._lock:
                    stub.chat_hits += 1
                    stub.bodies.append(body)
                    stub.in_flight += 1
                    stub.peak = max(stub.peak, stub.in_flight)
                    hit = stub.chat_hits
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    if stub.mode == "500" or (stub.mode == "flaky" and hit <= stub.fail_first):
                        return self._send(500, {"error": "internal"})
                    if stub.mode == "slow":
                        time.sleep(90)
                    if stub.mode == "400":
                        return self._send(400, {"error": "bad request"})
                    text = "echo: " + body["messages"][-1]["content"]
                    if body.get("response_format") or body.get("structured_outputs"):
                        text = json.dumps([{"question": "Why?"}])
                    return self._send(200, {
                        "id": "x", "object": "chat.completion", "model": body.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 7, "completion_tokens": len(text.split()),
                                  "total_tokens": 7 + len(text.split())}})
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def openai_stub():
    servers: list[StubServer] = []

    def make(mode: str = "ok", **kw) -> StubServer:
        s = StubServer(mode, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    from engines.bundled import prepare_bundled_model

    return prepare_bundled_model()


@pytest.fixture(scope="session")
def vllm_first_outputs(vllm_engine):
    return vllm_engine.first_outputs


@pytest.fixture(scope="session")
def vllm_engine(bundled_model_path):
    from engines.base import close_engines, get_engine

    engine = get_engine(VLLM_CONFIG)
    # Recorded before any other test uses the engine: the reproducibility test compares a fresh
    # engine's first call with this one.
    engine.first_outputs = [g.text for g in engine.generate(REPRO_CHATS, REPRO_SAMPLING)]
    yield engine
    close_engines()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(bundled_model_path, tmp_path_factory):
    """A real OpenAI-compatible vLLM server with the bundled model, on 127.0.0.1."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundled_model_path),
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
           "--max-model-len", "2048", "--kv-cache-memory-bytes", str(1 << 30), "--disable-log-stats",
           "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 420
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server did not start in time:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
