"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for the tests (the ``chat_server`` fixture).

``respond(body, index) -> Reply`` decides each answer from the parsed request body and its 0-based arrival
index; it runs on the request's own thread, so it may block (on an Event) to hold a reply. Replies can be delayed
(to trip client timeouts), carry any status and headers (``Retry-After``), or be raw garbage. Every request body,
its headers (lower-case names) and arrival time are recorded; requests beyond ``max_requests`` get HTTP 400 (not
retried by clients) and set ``overflowed``, so a retry loop cannot run away.

``max_in_flight`` is the most requests received and not yet answered at once. A request stops counting just
before its reply is sent, so a client's next request (sent only after it has read the reply) can never overlap
it in the count; counting until the handler thread finished instead let a busy machine, by descheduling that
thread after the reply went out, show more requests in flight than the client ever had. A request the client
abandoned (timed out) still counts until its handler answers: that is real server load.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
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
  headers: dict[str, str] = dataclasses.field(default_factory=dict)


def completion(content: str, model: str = "fake") -> dict[str, Any]:
  """A minimal chat-completions response body."""
  return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def dead_base_url() -> str:
  """The base URL of a local port nothing listens on (connections are refused)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  return f"http://127.0.0.1:{port}/v1"


class FakeChatServer:
  """Use as a context manager; ``base_url`` is ``http://127.0.0.1:<port>/v1``."""

  def __init__(self, respond: Callable[[dict[str, Any], int], Reply], *, max_requests: int = 100):
    self.respond = respond
    self.max_requests = max_requests
    self.requests: list[dict[str, Any]] = []
    self.headers: list[dict[str, str]] = []
    self.paths: list[str] = []
    self.arrivals: list[float] = []  # time.monotonic() of each request
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
          server.headers.append({k.lower(): v for k, v in self.headers.items()})
          server.paths.append(self.path)
          server.arrivals.append(time.monotonic())
          server._in_flight += 1
          server.max_in_flight = max(server.max_in_flight, server._in_flight)
        answered = False
        try:
          if index >= server.max_requests:
            server.overflowed = True
            reply = Reply(status=400, raw=b'{"error": "fake server request budget exceeded"}')
          else:
            reply = server.respond(parsed, index)
          if reply.delay:
            time.sleep(reply.delay)
          data = reply.raw if reply.raw is not None else json.dumps(completion(reply.content or "")).encode()
          with server._lock:
            server._in_flight -= 1
          answered = True
          self.send_response(reply.status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          for name, value in reply.headers.items():
            self.send_header(name, value)
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (timeout); nothing to answer
        finally:
          if not answered:
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
