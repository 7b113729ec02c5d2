"""Minimal OpenAI-compatible chat-completions client (stdlib only).

Talks to any server that implements ``POST {base_url}/chat/completions``: vLLM, llama.cpp server, Ollama
(``http://localhost:11434/v1``) or a hosted API. Images travel as base64 JPEG data URLs in
``{"type": "image_url"}`` content parts, the format all of these accept for vision models.

Transport failures (connection errors, timeouts, HTTP 408/409/429/5xx, a 200 whose body is not the expected
JSON) are retried with exponential backoff and jitter; other HTTP errors (400, 401, 404, ...) are raised at
once. The API key is sent as a bearer token and never appears in ``repr``, logs or error messages.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from PIL import Image

API_KEY_ENV_VARS = ("CAT_LLM_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENV_VARS = ("CAT_LLM_BASE_URL", "OPENAI_BASE_URL")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's default `vllm serve` address

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class LLMError(RuntimeError):
  """A chat request failed for good (after retries, or on a non-retryable error)."""


class _RetryableError(Exception):
  """Internal: a failure worth another attempt."""


def api_key_from_env() -> str | None:
  """The API key from $CAT_LLM_API_KEY, else $OPENAI_API_KEY, else None (local servers need none)."""
  for name in API_KEY_ENV_VARS:
    if os.environ.get(name):
      return os.environ[name]
  return None


def base_url_from_env() -> str:
  """The endpoint base URL from $CAT_LLM_BASE_URL or $OPENAI_BASE_URL, else vLLM's local default."""
  for name in BASE_URL_ENV_VARS:
    if os.environ.get(name):
      return os.environ[name]
  return DEFAULT_BASE_URL


def image_data_url(image: Image.Image, *, quality: int = 90, max_side: int | None = 1024) -> str:
  """A ``data:image/jpeg;base64,...`` URL of ``image`` (RGB JPEG), shrunk to ``max_side`` if larger."""
  image = image.convert("RGB")
  if max_side is not None and max(image.size) > max_side:
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=quality)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(text: str, images: list[Image.Image] | tuple[Image.Image, ...] = ()) -> dict[str, Any]:
  """A chat ``user`` message: plain text, or image parts followed by a text part."""
  if not images:
    return {"role": "user", "content": text}
  parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
  parts.append({"type": "text", "text": text})
  return {"role": "user", "content": parts}


def message_text(content: Any) -> str:
  """The text of a response message ``content`` (a string or a list of parts), reasoning blocks removed."""
  if isinstance(content, list):
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if not isinstance(content, str):
    raise _RetryableError(f"message content is {type(content).__name__}, not text")
  return _THINK_RE.sub("", content).strip()


@dataclasses.dataclass
class ChatClient:
  """Blocking chat-completions client; safe to share between threads (no shared connection state).

  Attributes:
    base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended.
    api_key: bearer token or None; defaults to the environment (see ``api_key_from_env``).
    timeout: seconds for connecting and for each blocking read.
    max_retries: extra attempts after the first on retryable failures.
    backoff: first backoff in seconds; doubles each retry, capped at ``max_backoff``, with +-25% jitter.
    max_tokens: default ``max_tokens`` for requests.
    sleep: the sleep function (tests pass a no-op).
  """

  base_url: str = dataclasses.field(default_factory=base_url_from_env)
  api_key: str | None = dataclasses.field(default_factory=api_key_from_env, repr=False)
  timeout: float = 60.0
  max_retries: int = 4
  backoff: float = 1.0
  max_backoff: float = 30.0
  max_tokens: int = 512
  sleep: Callable[[float], None] = dataclasses.field(default=time.sleep, repr=False)

  @property
  def url(self) -> str:
    return self.base_url.rstrip("/") + "/chat/completions"

  def _redact(self, text: str) -> str:
    return text.replace(self.api_key, "***") if self.api_key else text

  def request_body(self, model: str, messages: list[dict[str, Any]], *, temperature: float = 0.0,
                   max_tokens: int | None = None) -> dict[str, Any]:
    """The JSON body sent for one chat request."""
    return {"model": model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens or self.max_tokens}

  def chat(self, model: str, messages: list[dict[str, Any]], *, temperature: float = 0.0,
           max_tokens: int | None = None) -> str:
    """Sends one chat request (with retries) and returns the first choice's text.

    Raises:
      LLMError: on a non-retryable HTTP error, or when every attempt failed.
    """
    data = json.dumps(self.request_body(model, messages, temperature=temperature,
                                        max_tokens=max_tokens)).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    last_error = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)
        self.sleep(delay)
      try:
        return self._post(data, headers)
      except _RetryableError as e:
        last_error = self._redact(str(e))
    raise LLMError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last_error}")

  def _post(self, data: bytes, headers: dict[str, str]) -> str:
    request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      detail = e.read(500).decode("utf-8", "replace")
      message = self._redact(f"HTTP {e.code} {e.reason}: {detail}")
      if e.code in RETRYABLE_STATUS:
        raise _RetryableError(message) from None
      raise LLMError(f"{self.url}: {message}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # incl. timeouts
      reason = getattr(e, "reason", e)
      raise _RetryableError(f"{type(reason).__name__}: {reason}") from None
    try:
      payload = json.loads(raw)
      content = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
      raise _RetryableError(f"response is not a chat completion: {raw[:200]!r}") from None
    return message_text(content)
