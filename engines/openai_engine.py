"""Client for OpenAI-compatible servers (a pool of vLLM servers, or a hosted API).

One asyncio loop runs on its own thread; `submit()` (one request, a Future that completes when its
answer arrives) and `generate()` may be called from many shard threads at once. Requests are spread
over `config.base_urls` by least load (in flight + queued per slot), with at most
`config.max_concurrency` in flight per endpoint (default 256: a vLLM server schedules hundreds of
sequences at once, so fewer would leave its decode slots idle). Timeouts, connection errors, 429
and 5xx are retried with exponential backoff and jitter up to `config.max_retries` times; an endpoint
that fails that way is marked down and routed around until a health check (`GET <base>/models`, then
`<root>/health`) passes again, which is retried every `options.health_interval` seconds. When retries
are exhausted, or every endpoint is down, the call raises TransientEngineError so Prefect retries the
shard; other 4xx answers are permanent (EngineError).

Guided JSON: `options.guided` = "response_format" (default; OpenAI `response_format` json_schema,
which vLLM also honours) or "structured_outputs" (vLLM's own `structured_outputs: {"json": schema}`
field, sent with disable_any_whitespace so small models cannot pad the JSON with whitespace until
max_tokens; for response_format start vLLM servers with
`--structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'`). vLLM-only sampling fields (repetition_penalty) are sent only when they differ from the default.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import httpx

from engines.base import (
    Engine,
    EngineClosed,
    EngineError,
    Generation,
    Message,
    Outstanding,
    Sampling,
    TransientEngineError,
)
from models.config.engine import BUNDLED_MODEL

RETRY_STATUS = {408, 409, 425, 429}


@dataclass
class Endpoint:
    base_url: str
    slots: asyncio.Semaphore
    capacity: int
    load: int = 0  # in flight + waiting for a slot
    up: bool = True
    next_check: float = 0.0
    failures: int = 0
    served: int = 0

    @property
    def root(self) -> str:
        return self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url


class _Retry(Exception):
    def __init__(self, message: str, endpoint_fault: bool = True):
        super().__init__(message)
        self.endpoint_fault = endpoint_fault


class OpenAIEngine(Engine):
    kind = "openai"
    in_process = False

    @property
    def model_id(self) -> str:
        if self.config.model == BUNDLED_MODEL and self.config.revision is None:
            try:
                from engines.bundled import bundled_model_id

                return bundled_model_id(self.config.model) or super().model_id
            except Exception:  # the client machine need not have the wheel
                return super().model_id
        return super().model_id

    def load(self) -> None:
        if not self.config.base_urls:
            raise EngineError("the openai engine needs config.base_urls (e.g. http://127.0.0.1:8000/v1)")
        opts = self.config.options
        self.health_interval = float(opts.get("health_interval", 15.0))
        self.backoff_base = float(opts.get("backoff_base", 0.5))
        self.backoff_max = float(opts.get("backoff_max", 20.0))
        self.guided = opts.get("guided", "response_format")
        if self.guided not in ("response_format", "structured_outputs"):
            raise EngineError(f"options.guided must be response_format or structured_outputs, not {self.guided!r}")
        self.served_model = self.config.served_model
        self._outstanding = Outstanding()
        self._lock = threading.Lock()
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        self._call(self._setup()).result()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _setup(self) -> None:
        key = os.environ.get(self.config.api_key_env) or "EMPTY"
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.request_timeout, connect=min(10.0, self.config.request_timeout)),
            headers={"Authorization": f"Bearer {key}"},
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.endpoints = [Endpoint(u.rstrip("/"), asyncio.Semaphore(self.config.max_concurrency),
                                   self.config.max_concurrency) for u in self.config.base_urls]
        self._wake = asyncio.Event()
        models = await asyncio.gather(*(self._check(ep) for ep in self.endpoints))
        if self.served_model is None:
            listed = [m for ms in models if ms for m in ms]
            # A server started with --model <path> serves it under that path: use what it lists.
            self.served_model = self.config.model if self.config.model in listed or not listed else listed[0]
        self._health_task = asyncio.ensure_future(self._health_loop())

    async def _check(self, ep: Endpoint) -> list[str] | None:
        """Health check; returns the served model ids when the endpoint is up, else None."""
        timeout = min(5.0, self.config.request_timeout)
        try:
            r = await self.client.get(f"{ep.base_url}/models", timeout=timeout)
            if r.status_code == 200:
                ep.up, ep.failures = True, 0
                return [m.get("id") for m in r.json().get("data", [])]
            r = await self.client.get(f"{ep.root}/health", timeout=timeout)
            ok = r.status_code == 200
        except (httpx.HTTPError, ValueError):
            ok = False
        ep.up = ok
        ep.next_check = time.monotonic() + self.health_interval
        if ok:
            ep.failures = 0
            self._wake.set()
            return []
        return None

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.health_interval))
            now = time.monotonic()
            due = [ep for ep in self.endpoints if not ep.up and ep.next_check <= now]
            if due:
                await asyncio.gather(*(self._check(ep) for ep in due))

    def _mark_down(self, ep: Endpoint) -> None:
        ep.failures += 1
        ep.up = False
        ep.next_check = time.monotonic() + self.health_interval

    async def _pick(self, deadline: float) -> Endpoint:
        while True:
            live = [ep for ep in self.endpoints if ep.up]
            if live:
                return min(live, key=lambda ep: (ep.load / ep.capacity, ep.served))
            # Everything is down: re-check now rather than waiting for the periodic check.
            await asyncio.gather(*(self._check(ep) for ep in self.endpoints))
            if any(ep.up for ep in self.endpoints):
                continue
            if time.monotonic() >= deadline:
                raise TransientEngineError("every endpoint is down: " + ", ".join(ep.base_url for ep in self.endpoints))
            await asyncio.sleep(min(self.backoff_max, max(0.0, deadline - time.monotonic()), 2.0))

    def _body(self, chat: list[Message], sp: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_model, "messages": chat, "temperature": sp.temperature,
                                "top_p": sp.top_p, "max_tokens": sp.max_tokens}
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.repetition_penalty != 1.0:
            body["repetition_penalty"] = sp.repetition_penalty
        if sp.json_schema is not None:
            if self.guided == "structured_outputs":
                body["structured_outputs"] = {"json": sp.json_schema, "disable_any_whitespace": True}
            else:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": "output", "schema": sp.json_schema}}
        return body

    async def _post(self, ep: Endpoint, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post(f"{ep.base_url}/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise _Retry(f"{ep.base_url}: timed out after {self.config.request_timeout}s ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Retry(f"{ep.base_url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code == 200:
            try:
                return r.json()
            except ValueError as exc:
                raise _Retry(f"{ep.base_url}: answer is not JSON") from exc
        if r.status_code >= 500 or r.status_code in RETRY_STATUS:
            # 429 means busy, not broken: back off without marking the endpoint down.
            raise _Retry(f"{ep.base_url}: HTTP {r.status_code}: {r.text[:200]}", endpoint_fault=r.status_code != 429)
        raise EngineError(f"{ep.base_url}: HTTP {r.status_code}: {r.text[:500]}")

    async def _one(self, chat: list[Message], sp: Sampling) -> Generation:
        body = self._body(chat, sp)
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            ep = await self._pick(time.monotonic() + self.config.request_timeout)
            ep.load += 1
            try:
                async with ep.slots:
                    data = await self._post(ep, body)
            except _Retry as exc:
                last = str(exc)
                if exc.endpoint_fault and len(self.endpoints) > 1:
                    self._mark_down(ep)
                continue
            finally:
                ep.load -= 1
            ep.served += 1
            ep.failures = 0
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Generation(text=choice["message"].get("content") or "",
                              prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0),
                              finish_reason=choice.get("finish_reason") or "stop", model=self.model_id)
        raise TransientEngineError(f"gave up after {self.config.max_retries + 1} attempts: {last}")

    def _submit(self, chat: list[Message], sampling: Sampling) -> Future:
        if getattr(self, "_loop", None) is None or self._loop.is_closed() or self._closing:
            raise EngineClosed("the openai engine is closed")
        return self._outstanding.track(self._call(self._one(chat, sampling)))

    def endpoint_status(self) -> list[dict[str, Any]]:
        return [{"base_url": ep.base_url, "up": ep.up, "load": ep.load, "served": ep.served,
                 "failures": ep.failures} for ep in self.endpoints]

    def close(self) -> None:
        if getattr(self, "_loop", None) is None or self._loop.is_closed():
            return
        with self._lock:
            self._closing = True
        self._outstanding.cancel_all()  # the requests' tasks are cancelled on the loop; connections dropped

        async def shutdown():
            self._health_task.cancel()
            await self.client.aclose()

        try:
            self._call(shutdown()).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()
