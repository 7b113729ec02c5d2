"""caption_llm scoring throughput against a local OpenAI-compatible server with a fixed latency, by --workers.

Sizes a vLLM-backed run: each image costs three requests in a row (VLM caption, VLM perception answers, LLM score),
so one worker scores ~1 / (3 x latency) images/s; workers overlap images. The server (tests/fake_chat_server.py)
answers every request after ``--latency_s``, as a loaded endpoint would, with text each stage parses. Prints one
JSON line per worker count with images/s and its ratio to one worker (ideal: the worker count).

  python benchmarks/score_concurrency.py                          # 200 ms, 48 images, workers 1, 2, 4, 8, 16
  python benchmarks/score_concurrency.py --latency_s 0.5 --workers 8,32,64 --images 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from cat_jax.complexity.llm import ChatClient  # noqa: E402
from cat_jax.complexity.runner import score_source  # noqa: E402
from cat_jax.complexity.scorers import CaptionLLMScorer  # noqa: E402
from cat_jax.data.embedded import EmbeddedSource  # noqa: E402
from fake_chat_server import FakeChatServer, Reply  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--latency_s", type=float, default=0.2)
  p.add_argument("--images", type=int, default=48)
  p.add_argument("--workers", default="1,2,4,8,16")
  args = p.parse_args()

  def respond(body, index):
    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(c.get("text", "") for c in content)
    if "score" in text.lower() and isinstance(content, str):  # the LLM's score request (text only)
      return Reply('{"score": 5, "reason": "moderate detail"}', delay=args.latency_s)
    return Reply("A simple picture with a few shapes on a plain background.", delay=args.latency_s)

  source = EmbeddedSource("validation", num_images=args.images, image_size=64)
  base = None
  for workers in (int(w) for w in args.workers.split(",")):
    with FakeChatServer(respond, max_requests=10 * args.images) as server, tempfile.TemporaryDirectory() as tmp:
      scorer = CaptionLLMScorer(ChatClient(base_url=server.base_url, api_key="unused"), llm_model="llm",
                                vlm_model="vlm", image_size=64)
      start = time.perf_counter()
      summary = score_source(source, scorer, os.path.join(tmp, "m.jsonl"), workers=workers, progress=False,
                             image_size=64)
      seconds = time.perf_counter() - start
      rate = summary.scored / seconds
      base = base or rate
      print(json.dumps({"workers": workers, "latency_s": args.latency_s, "images": summary.scored,
                        "requests": len(server.requests), "images_per_s": round(rate, 2),
                        "over_one_worker": round(rate / base, 2), "max_in_flight": server.max_in_flight}),
            flush=True)


if __name__ == "__main__":
  main()
