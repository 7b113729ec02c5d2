"""OpenAI-compatible chat client for the caption + LLM score, on the ``openai`` package (``pip install 'cat_jax[llm]'``).

Any server that implements ``POST {base_url}/chat/completions`` works: vLLM, llama.cpp server, Ollama
(``http://localhost:11434/v1``) or a hosted API. Images travel as base64 JPEG data URLs in ``{"type": "image_url"}``
content parts, the format all of these accept for vision models.

The ``openai`` client does the HTTP: connection errors, timeouts, 408/409/429 and 5xx are retried with exponential
backoff and jitter, and ``Retry-After`` is honoured. On top of it this module sorts the failures the caption + LLM
scorer must tell apart: ``EndpointError`` (unreachable server, bad key, unknown model or path: no later image can
succeed, so a run stops with one message), ``MalformedResponse`` (a 200 that is not a usable completion: worth
asking again) and ``LLMError`` (this request failed for good). The API key never appears in ``repr`` or in an
error message.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
from typing import Any

from PIL import Image

API_KEY_ENV_VARS = ("CAT_LLM_API_KEY", "OPENAI_API_KEY")
BASE_URL_ENV_VARS = ("CAT_LLM_BASE_URL", "OPENAI_BASE_URL")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's default `vllm serve` address
# Local servers need no key, but the openai client insists on one; this is the placeholder vLLM's docs use.
NO_KEY = "EMPTY"
INSTALL_HINT = "pip install 'cat_jax[llm]'"

_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


class LLMError(RuntimeError):
  """A chat request failed for good (after the client's retries, or on a non-retryable error)."""


class EndpointError(LLMError):
  """The endpoint cannot answer any request (unreachable, bad key, unknown model or path); stop the run."""


class MalformedResponse(LLMError):
  """A successful HTTP response that holds no usable answer (not JSON, no choices, no text); ask again."""


def _openai():
  try:
    import openai  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"the caption + LLM score needs the openai client: {INSTALL_HINT}") from None
  return openai


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


def message_text(content: Any, refusal: Any = None) -> str:
  """The text of a response message (a string or a list of parts), reasoning blocks removed.

  A structured-output ``refusal`` with no content is returned as the text, so it is parsed (and re-asked) like
  any other refusal. Raises ``MalformedResponse`` when there is no text at all.
  """
  if isinstance(content, list):
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if not content and isinstance(refusal, str) and refusal:
    content = refusal
  if not isinstance(content, str):
    raise MalformedResponse(f"message content is {type(content).__name__}, not text")
  return _THINK_RE.sub("", content).strip()


def redact_url(url: str) -> str:
  """``url`` without user info or query string (where a credential could hide), for logs and manifests."""
  url = re.sub(r"(?<=://)[^/@]*@", "", url)
  return url.split("?", 1)[0]


@dataclasses.dataclass
class ChatClient:
  """Blocking chat-completions client on ``openai.OpenAI``; safe to share between threads.

  Attributes:
    base_url: endpoint root, e.g. ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended.
    api_key: bearer token or None; defaults to the environment (see ``api_key_from_env``).
    timeout: seconds for connecting and for each read.
    max_retries: extra attempts after the first on connection errors, timeouts, 408/409/429 and 5xx
      (exponential backoff from 0.5 s with jitter, or the server's ``Retry-After``; the openai client's policy).
    max_tokens: default ``max_tokens`` for requests.

  Raises:
    ImportError: naming ``pip install 'cat_jax[llm]'`` when the openai package is missing.
  """

  base_url: str = dataclasses.field(default_factory=base_url_from_env)
  api_key: str | None = dataclasses.field(default_factory=api_key_from_env, repr=False)
  timeout: float = 60.0
  max_retries: int = 4
  max_tokens: int = 512
  _client: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    openai = _openai()
    self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or NO_KEY, timeout=self.timeout,
                                 max_retries=self.max_retries)

  @property
  def url(self) -> str:
    return self.base_url.rstrip("/") + "/chat/completions"

  def _redact(self, text: str) -> str:
    return text.replace(self.api_key, "***") if self.api_key else text

  def _status(self, error: Any) -> str:
    """``HTTP <code>: <start of the body>`` of an ``openai.APIStatusError``, the key redacted."""
    try:
      body = error.response.text
    except Exception:  # noqa: BLE001 - a body that cannot be read is left out
      body = ""
    return self._redact(f"HTTP {error.status_code}: {' '.join(body.split())[:300]}")

  def request_body(self, model: str, messages: list[dict[str, Any]], *, temperature: float = 0.0,
                   max_tokens: int | None = None) -> dict[str, Any]:
    """The JSON body sent for one chat request."""
    return {"model": model, "messages": messages, "temperature": temperature,
            "max_tokens": max_tokens or self.max_tokens}

  def chat(self, model: str, messages: list[dict[str, Any]], *, temperature: float = 0.0,
           max_tokens: int | None = None) -> str:
    """Sends one chat request (the openai client retries transient failures) and returns the first choice's text.

    Raises:
      EndpointError: the server is unreachable, or rejects the key (401/403), model or path (404).
      MalformedResponse: the answer is not a chat completion with text.
      LLMError: any other failure, after retries.
    """
    openai = _openai()
    body = self.request_body(model, messages, temperature=temperature, max_tokens=max_tokens)
    try:
      completion = self._client.chat.completions.create(**body)
    except openai.APITimeoutError:  # a slow answer, not a dead server
      raise LLMError(f"{self.url}: timed out after {self.max_retries + 1} attempts "
                     f"({self.timeout:g} s each; raise --timeout for slow models)") from None
    except openai.APIConnectionError as e:
      cause = self._redact(f"{type(e.__cause__).__name__}: {e.__cause__}" if e.__cause__ else str(e))
      raise EndpointError(f"cannot reach {redact_url(self.url)} ({cause}) after {self.max_retries + 1} "
                          "attempts; is the server running and --base-url right?") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
      raise EndpointError(f"{redact_url(self.url)} refused model {model!r}: {self._status(e)} (check the "
                          "API key, --base-url and the model name)") from None
    except openai.APIStatusError as e:
      raise LLMError(f"{redact_url(self.url)}: {self._status(e)}") from None
    except ValueError as e:  # the body is not JSON
      raise MalformedResponse(f"response is not a chat completion: {e}") from None
    choices = getattr(completion, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None:
      raise MalformedResponse(f"response has no choices: {str(completion)[:200]}")
    message = choices[0].message
    return message_text(message.content, getattr(message, "refusal", None))

