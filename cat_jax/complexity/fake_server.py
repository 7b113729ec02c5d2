"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and offline demos.

``respond(body, index) -> Reply`` decides each answer from the parsed request body and its 0-based arrival
index; replies can be delayed (to trip client timeouts), carry any status, or be raw garbage. Every request body
and its headers are recorded, the most requests in flight at once is tracked, and requests beyond
``max_requests`` get HTTP 400 (not retried by clients) and set ``overflowed``, so a retry loop cannot run away.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class Reply:
  """One scripted answer: ``content`` becomes a chat completion; ``raw`` (bytes) is sent as is instead."""

  content: str | None = None
  status: int = 200
  raw: bytes | None = None
  delay: float = 0.0


def completion(content: str, model: str = "fake") -> dict[str, Any]:
  """A minimal chat-completions response body."""
  return {"id": "chatcmpl-fake", "object": "chat.completion", "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


class FakeChatServer:
  """Use as a context manager; ``base_url`` is ``http://127.0.0.1:<port>/v1``."""

  def __init__(self, respond: Callable[[dict[str, Any], int], Reply], *, max_requests: int = 100):
    self.respond = respond
    self.max_requests = max_requests
    self.requests: list[dict[str, Any]] = []
    self.headers: list[dict[str, str]] = []
    self.paths: list[str] = []
    self.overflowed = False
    self.max_in_flight = 0
    self._in_flight = 0
    self._lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args) -> None:  # keep test output clean
        pass

      def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with server._lock:
          index = len(server.requests)
          try:
            parsed = json.loads(body)
          except ValueError:
            parsed = {"_unparsed": body.decode("utf-8", "replace")}
          server.requests.append(parsed)
          server.headers.append(dict(self.headers.items()))
          server.paths.append(self.path)
          server._in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server._in_flight)
        try:
          if index >= server.max_requests:
            server.overflowed = True
            reply = Reply(status=400, raw=b'{"error": "fake server request budget exceeded"}')
          else:
            reply = server.respond(parsed, index)
          if reply.delay:
            time.sleep(reply.delay)
          data = reply.raw if reply.raw is not None else json.dumps(completion(reply.content or "")).encode()
          self.send_response(reply.status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout); nothing to answer
        finally:
          with server._lock:
            server._in_flight -= 1

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    self._httpd.block_on_close = False
    self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                    daemon=True)

  @property
  def base_url(self) -> str:
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}/v1"

  def __enter__(self) -> "FakeChatServer":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=5)
