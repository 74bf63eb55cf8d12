"""OpenAI-compatible chat completions for the data pipelines: retries with back-off, a per-request timeout and
a content-hash response cache, so a rerun never pays for the same request twice.

    cache = ResponseCache("out/cache.jsonl")
    client = ChatClient(EndpointConfig(base_url="http://127.0.0.1:8000/v1"), cache)
    reply = client.complete("Qwen3-32B", messages, {"temperature": 0.6, "max_tokens": 2048})
    reply.text, reply.finish_reason, reply.cached

Works with any server speaking `/v1/chat/completions` (vLLM, SGLang, hosted APIs) through the `openai`
client. Base URL and API key come from the config or the environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`
by default; a local server without auth gets the key "EMPTY").

Retried (up to `max_retries` times, sleeping `min(backoff_max_s, backoff_s * 2**attempt)` scaled by a
jitter in [0.5, 1], or the server's `Retry-After` when it sends one, capped the same way): HTTP 408 / 409 /
429 / 5xx, timeouts, connection errors, and 200 answers that are not a valid completion (malformed JSON, no
choices, no text). When the retries run out the item raises `TransientError` (retry it on a later run).
HTTP 400 / 413 / 422 raise `RequestRejected` (this request will never succeed); 401 / 403 / 404 raise
`EndpointError` (fix the configuration: nothing else will work either).

The cache key is the SHA-256 of the canonical JSON of (model, messages, params): any change to the prompt,
image, model or sampling parameters is a new request.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .jsonl_log import JsonlLog

__all__ = ["ChatClient", "Completion", "EndpointConfig", "EndpointError", "RequestRejected", "ResponseCache",
           "TransientError", "request_hash"]

RETRY_STATUS = (408, 409, 429)
REJECT_STATUS = (400, 413, 422)


class EndpointError(ValueError):
    """The endpoint refuses every request (bad URL, key or model): fix the configuration."""


class RequestRejected(Exception):
    """The endpoint rejected this request permanently (e.g. HTTP 400: context too long)."""


class TransientError(Exception):
    """Retries ran out on transient failures (429 / 5xx / timeout / malformed answer)."""


@dataclass
class EndpointConfig:
    """Where and how to send requests. `base_url` / `api_key` fall back to the named environment variables."""

    base_url: str | None = None
    base_url_env: str = "OPENAI_BASE_URL"
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 300.0  # per request (one HTTP attempt)
    max_retries: int = 6
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    concurrency: int = 8  # requests in flight at once

    def validate(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_s and backoff_max_s must be >= 0")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def resolved(self, base_url: str | None = None) -> tuple[str, str]:
        """(base_url, api_key); `base_url` (a stage override) wins over the config and the environment."""
        url = base_url or self.base_url or os.environ.get(self.base_url_env)
        if not url:
            raise ValueError(f"no endpoint: set endpoint.base_url in the config or ${self.base_url_env} "
                             "(e.g. http://127.0.0.1:8000/v1 for a local vLLM server)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint base_url {url!r} must start with http:// or https://")
        key = self.api_key or os.environ.get(self.api_key_env) or "EMPTY"
        return url.rstrip("/"), key


def request_hash(model: str, messages: list[dict], params: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of one request: the cache key."""
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Successful completions by request hash, in an append-only JSONL (`JsonlLog`: fsync per row)."""

    def __init__(self, path: str | os.PathLike):
        self.log = JsonlLog(path)

    def get(self, key: str) -> dict | None:
        return self.log.get(key)

    def put(self, key: str, row: dict) -> None:
        if key not in self.log:  # two workers may race on identical requests; the first one wins
            try:
                self.log.append({"id": key, **row})
            except RuntimeError:
                pass

    def __len__(self) -> int:
        return len(self.log)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    request_sha256: str
    cached: bool


class ChatClient:
    """Thread-safe chat completion calls with retries and the cache; `stats` counts what happened."""

    def __init__(self, endpoint: EndpointConfig, cache: ResponseCache, *, base_url: str | None = None,
                 sleep=time.sleep):
        import openai

        self._openai = openai
        url, key = endpoint.resolved(base_url)
        self.base_url = url
        self.endpoint = endpoint
        self.cache = cache
        self._client = openai.OpenAI(base_url=url, api_key=key, timeout=endpoint.timeout_s, max_retries=0)
        self._sleep = sleep
        self._lock = threading.Lock()
        self.stats: Counter = Counter()

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def complete(self, model: str, messages: list[dict], params: dict | None = None) -> Completion:
        """One completion (from the cache when this exact request was answered before)."""
        params = dict(params or {})
        key = request_hash(model, messages, params)
        hit = self.cache.get(key)
        if hit is not None:
            self._count("cache_hits")
            return Completion(hit["text"], hit.get("finish_reason"), key, True)
        last = None
        for attempt in range(self.endpoint.max_retries + 1):
            if attempt:
                self._count("retries")
                self._sleep(self._delay(attempt - 1, last))
            self._count("requests")
            try:
                resp = self._client.chat.completions.create(model=model, messages=messages, **params)
                text, finish = self._parse(resp)
            except Exception as e:  # noqa: BLE001 - classified below
                kind = self._classify(e)
                self._count(f"error:{kind}")
                if kind == "unexpected":
                    raise
                if kind == "fatal":
                    raise EndpointError(f"{self.base_url}: {type(e).__name__}: {e} (check base_url, api key and "
                                        f"model name {model!r})") from e
                if kind == "rejected":
                    raise RequestRejected(f"HTTP {getattr(e, 'status_code', '?')}: {_short(e)}") from e
                last = e
                continue
            self.cache.put(key, {"model": model, "text": text, "finish_reason": finish})
            return Completion(text, finish, key, False)
        raise TransientError(f"{self.endpoint.max_retries + 1} attempts failed; last: {type(last).__name__}: "
                             f"{_short(last)}")

    def _parse(self, resp) -> tuple[str, str | None]:
        choices = getattr(resp, "choices", None)
        if not choices:
            raise _Malformed("the answer has no choices")
        msg = getattr(choices[0], "message", None)
        text = getattr(msg, "content", None)
        if not isinstance(text, str):
            raise _Malformed("the answer has no message text")
        return text, getattr(choices[0], "finish_reason", None)

    def _classify(self, e: Exception) -> str:
        o = self._openai
        if isinstance(e, (o.APITimeoutError, o.APIConnectionError, o.APIResponseValidationError, _Malformed,
                          json.JSONDecodeError)):
            return "transient"
        if isinstance(e, o.APIStatusError):
            code = e.status_code
            if code in RETRY_STATUS or code >= 500:
                return "transient"
            if code in REJECT_STATUS:
                return "rejected"
            return "fatal"
        return "unexpected"

    def _delay(self, attempt: int, err: Exception | None) -> float:
        cap = self.endpoint.backoff_max_s
        retry_after = None
        response = getattr(err, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        if retry_after is not None and retry_after >= 0:
            return min(cap, retry_after)
        return min(cap, self.endpoint.backoff_s * 2 ** attempt) * (0.5 + 0.5 * random.random())


class _Malformed(ValueError):
    pass


def _short(e: Any, n: int = 300) -> str:
    s = str(e)
    return s if len(s) <= n else s[:n] + "..."
