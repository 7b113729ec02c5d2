"""Complexity scorers, the chat client against a scripted local server, levels and the resumable manifest."""

import base64
import io
import json
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cat_jax.complexity import thresholds as thresholds_lib
from cat_jax.complexity import manifest as manifest_lib
from cat_jax.complexity import prompts
from cat_jax.complexity.llm import ChatClient, EndpointError, LLMError, MalformedResponse, user_message
from cat_jax.complexity.runner import TooManyFailures, score_source
from cat_jax.complexity.scorers import (CaptionLLMScorer, JpegScorer, MseScorer, TextOnlyScorer, jpeg_bpp,
                                        lowpass_reconstruct, prepare_image, to_pil_rgb)
from cat_jax.data import load_levels
from cat_jax.data.embedded import EmbeddedSource
from fake_chat_server import Reply, dead_base_url

GOOD_PERCEPTION = "FACES: no, none\nTEXT: yes, a few words\nDETAIL: medium, about five objects"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  for name in ("CAT_LLM_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "CAT_LLM_BASE_URL"):
    monkeypatch.delenv(name, raising=False)


def make_client(server, **kwargs):
  # Generous timeouts: a loaded machine must never turn a prompt reply into a timeout and a retry.
  kwargs.setdefault("timeout", 30.0)
  kwargs.setdefault("max_retries", 3)
  return ChatClient(base_url=server.base_url, **kwargs)


def flat_image(size=64):
  return Image.new("RGB", (size, size), (90, 140, 200))


def text_image(size=64):
  im = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(im)
  for y in range(0, size, 8):
    draw.text((1, y), "quick brown fox 0123456789", fill="black")
  return im


def is_vlm_request(body):
  return isinstance(body["messages"][0]["content"], list)


def prompt_text(body):
  content = body["messages"][0]["content"]
  return content if isinstance(content, str) else content[-1]["text"]


# --- prompts ---------------------------------------------------------------------------------------------
# The corpus of real-model answer styles is tests/test_llm_answers.py.


def test_score_prompt_holds_caption_and_answers():
  answers = prompts.parse_perception("**FACES:** yes, two small faces\n- TEXT: no\n3. Detail: high, a crowd")
  assert answers == {"faces": "yes, two small faces", "text": "no", "detail": "high, a crowd"}
  prompt = prompts.score_prompt("A cat.", answers)
  assert "A cat." in prompt and "FACES: yes, two small faces" in prompt and "integer from 1 to 9" in prompt
  assert "Perception answers" not in prompts.score_prompt("A cat.")


# --- chat client (the openai package) --------------------------------------------------------------------


def test_client_request_body_headers_and_image_parts(chat_server):
  server = chat_server(lambda body, i: Reply("hello"), max_requests=1)
  client = make_client(server, api_key="sk-secret-123", max_tokens=77)
  image = text_image(40)
  assert client.chat("my-vlm", [user_message("describe", [image])]) == "hello"
  assert "sk-secret-123" not in repr(client)
  (body,), (headers,) = server.requests, server.headers
  assert server.paths == ["/v1/chat/completions"]
  assert headers["authorization"] == "Bearer sk-secret-123"
  assert headers["content-type"] == "application/json"
  assert body["model"] == "my-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 77
  assert body == client.request_body("my-vlm", [user_message("describe", [image])], max_tokens=77)
  image_part, text_part = body["messages"][0]["content"]
  assert body["messages"][0]["role"] == "user" and text_part == {"type": "text", "text": "describe"}
  url = image_part["image_url"]["url"]
  assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
  decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
  assert decoded.format == "JPEG" and decoded.size == (40, 40)
  # JPEG at quality 90 of a black-on-white image stays close to it.
  assert np.abs(np.asarray(decoded.convert("RGB"), np.float32) - np.asarray(image, np.float32)).mean() < 12


def test_client_without_key_sends_the_placeholder_not_a_secret(chat_server):
  server = chat_server(lambda body, i: Reply("ok"), max_requests=1)
  make_client(server, api_key=None).chat("m", HI)
  assert server.headers[0]["authorization"] == "Bearer EMPTY"


def test_client_needs_the_llm_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'cat_jax\[llm\]'"):
    ChatClient(base_url="http://127.0.0.1:1/v1")


def test_client_retries_5xx_with_backoff(chat_server):
  server = chat_server(lambda body, i: Reply(status=(500, 502, 503)[i], raw=b"overloaded") if i < 3 else
                       Reply("fine"), max_requests=4)
  assert make_client(server, max_retries=3).chat("m", HI) == "fine"
  assert len(server.requests) == 4
  # The openai client waits 0.5 s, 1 s, 2 s (less up to 25% jitter) between attempts: lower bounds, which a busy
  # machine can only make longer.
  gaps = np.diff(server.arrivals)
  assert all(gap >= 0.75 * 0.5 * 2 ** k for k, gap in enumerate(gaps)), gaps


def test_client_honours_retry_after_on_429(chat_server):
  server = chat_server(lambda body, i: Reply(status=429, raw=b'{"error": "slow down"}', headers={"Retry-After": "1"})
                       if i == 0 else Reply("after the wait"), max_requests=2)
  assert make_client(server).chat("m", HI) == "after the wait"
  assert len(server.requests) == 2
  # Its own first backoff would be at most 0.5 s: waiting 1 s or more is the server's Retry-After.
  assert server.arrivals[1] - server.arrivals[0] >= 1.0


def test_client_gives_up_after_max_retries_and_redacts_key(chat_server):
  # The server echoes the key in its error body; the client's message must not.
  server = chat_server(lambda body, i: Reply(status=503, raw=b"bad key sk-secret-123"), max_requests=2)
  client = make_client(server, max_retries=1, api_key="sk-secret-123")
  with pytest.raises(LLMError) as e:
    client.chat("m", HI)
  assert len(server.requests) == 2 and not isinstance(e.value, EndpointError)
  assert "503" in str(e.value) and "sk-secret-123" not in str(e.value) and "***" in str(e.value)


def test_client_does_not_retry_client_errors(chat_server):
  server = chat_server(lambda body, i: Reply(status=400, raw=b'{"error": "prompt too long"}'), max_requests=1)
  with pytest.raises(LLMError, match="400.*prompt too long") as e:
    make_client(server).chat("m", HI)
  assert len(server.requests) == 1 and not isinstance(e.value, EndpointError)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_endpoint_errors_are_not_retried(chat_server, status):
  server = chat_server(lambda body, i: Reply(status=status, raw=b'{"error": "no such model sk-secret-123"}'),
                       max_requests=1)
  with pytest.raises(EndpointError, match=f"{status}.*check the API key, --base-url and the model") as e:
    make_client(server, api_key="sk-secret-123").chat("missing-model", HI)
  assert len(server.requests) == 1 and "sk-secret-123" not in str(e.value)


def test_client_retries_timeouts_and_the_abandoned_request_still_runs(chat_server):
  retried = threading.Event()

  def respond(body, i):
    if i == 0:
      retried.wait(timeout=60)  # hold the first reply until the client has given up on it and retried
      return Reply("too late")
    retried.set()
    return Reply("on time")

  server = chat_server(respond, max_requests=6)
  assert make_client(server, timeout=2.0, max_retries=5).chat("m", HI) == "on time"
  assert 2 <= len(server.requests) <= 6  # one timeout, and on a very slow machine perhaps a few more
  # One client thread, yet two requests in flight on the server: the abandoned one was still being served.
  assert server.max_in_flight >= 2


def test_client_malformed_completions(chat_server):
  replies = [Reply(raw=b"<html>not json"), Reply(raw=b'{"choices": []}'),
             Reply(raw=b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}]}'),
             Reply("<think>hmm</think> real")]
  server = chat_server(lambda body, i: replies[i], max_requests=4)
  client = make_client(server)
  for _ in range(3):
    with pytest.raises(MalformedResponse):
      client.chat("m", HI)
  assert client.chat("m", HI) == "real"
  assert len(server.requests) == 4  # a 200 is not retried by the transport; the scorer asks again


def test_client_connection_refused_is_an_endpoint_error():
  client = ChatClient(base_url=dead_base_url(), max_retries=1, timeout=5.0, api_key="sk-secret-123")
  with pytest.raises(EndpointError, match="cannot reach.*2 attempts.*server") as e:
    client.chat("m", HI)
  assert "sk-secret-123" not in str(e.value)


# --- caption + LLM scorer --------------------------------------------------------------------------------


def vlm_and_llm(caption="A page of small black text.", perception=GOOD_PERCEPTION,
                score='{"score": 8, "reason": "dense small text"}'):
  def respond(body, i):
    if body["model"] == "vlm":
      return Reply(caption if "Describe" in prompt_text(body) else perception)
    return Reply(score)
  return respond


def test_caption_llm_scorer_pipeline_request_bodies(chat_server):
  server = chat_server(vlm_and_llm(), max_requests=3)
  scorer = CaptionLLMScorer(make_client(server), vlm_model="vlm", llm_model="llm", image_size=32)
  item = {"id": "a", "image": np.asarray(text_image(64))}
  result = scorer.score(item)
  assert result == {"score": 8, "reason": "dense small text", "caption": "A page of small black text.",
                    "answers": {"faces": "no, none", "text": "yes, a few words",
                                "detail": "medium, about five objects"}}
  caption_req, perception_req, llm_req = server.requests
  for req, prompt in ((caption_req, prompts.CAPTION_PROMPT), (perception_req, prompts.PERCEPTION_PROMPT)):
    assert req["model"] == "vlm" and prompt_text(req) == prompt
    url = req["messages"][0]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (32, 32)  # prepared image
  assert llm_req["model"] == "llm" and isinstance(llm_req["messages"][0]["content"], str)  # text only
  assert prompt_text(llm_req) == prompts.score_prompt("A page of small black text.", result["answers"])
  # The dry run plans the same image requests (the score request carries placeholders for the VLM's words).
  planned = scorer.planned_requests(item)
  assert [(purpose, model) for purpose, model, _ in planned] == [("caption", "vlm"), ("perception", "vlm"),
                                                                 ("score", "llm")]
  assert [scorer.client.request_body(model, [m]) for _, model, m in planned[:2]] == [caption_req, perception_req]
  assert "<caption from vlm>" in planned[2][2]["content"] and "FACES: <faces answer from vlm>" in planned[2][2]["content"]


def test_unparseable_perception_answers_fall_back_to_the_caption(chat_server):
  server = chat_server(vlm_and_llm(perception="I see a blue square and nothing else."), max_requests=3)
  scorer = CaptionLLMScorer(make_client(server), vlm_model="vlm", llm_model="llm", image_size=32)
  result = scorer.score({"id": "a", "image": flat_image()})
  assert result["score"] == 8 and result["answers"] is None
  assert result["fallback"].startswith("perception answers unparseable, scored from the caption alone")
  assert "blue square" in result["fallback"]
  assert prompt_text(server.requests[2]) == prompts.score_prompt("A page of small black text.")


def test_answers_folded_into_the_caption_reply_are_used(chat_server):
  caption = ("A crowded stadium at night with thousands of spectators. Faces: many, all tiny. "
             "Text: a scoreboard with small digits. Detail: very high.")
  server = chat_server(vlm_and_llm(caption=caption, perception="FACES: yes, thousands"), max_requests=3)
  scorer = CaptionLLMScorer(make_client(server), vlm_model="vlm", llm_model="llm", image_size=32)
  result = scorer.score({"id": "a", "image": flat_image()})
  # The perception reply wins where it answers; the caption reply fills in the rest.
  assert result["answers"] == {"faces": "yes, thousands", "text": "a scoreboard with small digits",
                               "detail": "very high"}
  assert "fallback" not in result


def test_partial_perception_answers_are_used_and_noted(chat_server):
  server = chat_server(vlm_and_llm(caption="A sign.", perception="FACES: no\nTEXT: yes, one word"),
                       max_requests=3)
  scorer = CaptionLLMScorer(make_client(server), vlm_model="vlm", llm_model="llm", image_size=32)
  result = scorer.score({"id": "a", "image": flat_image()})
  assert result["answers"] == {"faces": "no", "text": "yes, one word"}
  assert result["fallback"] == "perception answers lack ['detail']"


def test_caption_llm_asks_again_on_unparseable_or_refused_scores(chat_server):
  answers = iter(['{"score": 6.5}', "I'm sorry, I can't rate images.", '{"score": 3, "reason": "flat"}'])
  server = chat_server(lambda body, i: Reply(next(answers)), max_requests=3)
  scorer = CaptionLLMScorer(make_client(server), llm_model="llm", use_dataset_captions=True, parse_retries=2)
  assert scorer.score({"id": "x", "image": flat_image(), "caption": "A blue sky."})["score"] == 3
  assert len(server.requests) == 3 and "A blue sky." in prompt_text(server.requests[0])

  server = chat_server(lambda body, i: Reply("I'm sorry, but I cannot help with that."), max_requests=2)
  scorer = CaptionLLMScorer(make_client(server), llm_model="llm", use_dataset_captions=True, parse_retries=1)
  with pytest.raises(prompts.ParseError, match="unparseable.*2 answers.*refused"):
    scorer.score({"id": "x", "image": flat_image(), "caption": "A blue sky."})
  assert len(server.requests) == 2


def test_caption_llm_asks_again_on_malformed_completions(chat_server):
  replies = [Reply(raw=b'{"choices": []}'), Reply('{"score": 4, "reason": "a room"}')]
  server = chat_server(lambda body, i: replies[i], max_requests=2)
  scorer = CaptionLLMScorer(make_client(server), llm_model="llm", use_dataset_captions=True, parse_retries=1)
  assert scorer.score({"id": "x", "image": flat_image(), "caption": "A room."})["score"] == 4


def test_dataset_captions_skip_the_vlm_and_fall_back_to_it(chat_server):
  server = chat_server(vlm_and_llm(caption="A flat colour.", score='{"score": 2, "reason": "flat"}'),
                       max_requests=4)
  scorer = CaptionLLMScorer(make_client(server), vlm_model="vlm", llm_model="llm", use_dataset_captions=True)
  with_caption = scorer.score({"id": "a", "image": flat_image(), "caption": "Dataset caption."})
  assert with_caption["caption"] == "Dataset caption." and with_caption["answers"] is None
  assert "fallback" not in with_caption  # no perception answers by design
  assert [r["model"] for r in server.requests] == ["llm"]
  without = scorer.score({"id": "b", "image": flat_image()})
  assert without["caption"] == "A flat colour." and without["answers"]["faces"] == "no, none"
  assert [r["model"] for r in server.requests] == ["llm", "vlm", "vlm", "llm"]
  with pytest.raises(ValueError, match="--vlm-model"):
    CaptionLLMScorer(scorer.client, llm_model="llm")


def test_text_only_scorer_sends_the_prompt_without_an_image(chat_server):
  server = chat_server(lambda body, i: Reply('{"score": 9, "reason": "a newspaper page"}'), max_requests=1)
  scorer = TextOnlyScorer(make_client(server), llm_model="llm")
  result = scorer.score_text("a full newspaper page")
  assert result == {"score": 9, "reason": "a newspaper page", "text": "a full newspaper page"}
  (body,) = server.requests
  assert body["model"] == "llm" and prompt_text(body) == prompts.text_only_prompt("a full newspaper page")
  assert scorer.config() == {"method": "text_llm", "llm_model": "llm",
                             "prompts": {"text_only": prompts.TEXT_ONLY_PROMPT.template}}


# --- JPEG / MSE ------------------------------------------------------------------------------------------


def test_jpeg_ranks_embedded_flat_images_below_dense_text():
  source = EmbeddedSource("validation", num_images=24, image_size=128)
  scorer = JpegScorer(image_size=128)
  by_kind = {}
  for i in range(len(source)):
    item = source[i]
    by_kind.setdefault(item["kind"], []).append(scorer.score(item)["score"])
  assert len(by_kind["flat"]) == 3 and len(by_kind["dense_text"]) == 3
  assert max(by_kind["flat"]) < min(by_kind["dense_text"])
  # Flat images are a few header bytes; a page of small text costs bits on every edge.
  assert max(by_kind["flat"]) < 0.5 < 2.0 < min(by_kind["dense_text"])
  assert max(by_kind["gradient"]) < min(by_kind["dense_text"])


def test_mse_proxy_ranks_embedded_flat_images_below_dense_text():
  source = EmbeddedSource("validation", num_images=16, image_size=64)
  scorer = MseScorer(image_size=64)
  scores = {source[i]["kind"]: scorer.score(source[i])["score"] for i in (0, 7)}
  assert scores["flat"] < 1e-8 < 1e-3 < scores["dense_text"]


def test_jpeg_bpp_is_bits_over_pixels():
  im = text_image(64)
  buf = io.BytesIO()
  im.save(buf, format="JPEG", quality=75, subsampling="4:2:0")
  assert jpeg_bpp(im, 75) == pytest.approx(8 * len(buf.getvalue()) / (64 * 64))
  assert jpeg_bpp(im, 95) > jpeg_bpp(im, 50)


def test_prepare_image_and_decoding():
  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, 40:] = 255  # right half white
  out = prepare_image(wide, 20)
  assert out.size == (20, 20)
  out_arr = np.asarray(out)
  assert out_arr[:, :5].mean() < 10 and out_arr[:, -5:].mean() > 245  # center crop keeps both halves
  png = io.BytesIO()
  Image.fromarray(wide).save(png, format="PNG")
  assert np.array_equal(np.asarray(to_pil_rgb(png.getvalue())), wide)
  assert np.array_equal(np.asarray(to_pil_rgb(wide / 127.5 - 1.0)), wide)  # [-1, 1] floats
  assert np.array_equal(np.asarray(to_pil_rgb(wide[..., 0])), wide)  # grayscale -> RGB
  assert prepare_image(wide, None).size == (80, 40)


def test_mse_scorer_reconstruct_fn_hook():
  calls = []

  def fake_reconstruct(x):
    calls.append(x)
    return x + 0.2  # 0.1 on the [0, 1] scale everywhere

  im = np.full((48, 48, 3), 128, np.uint8)
  im[::2] = 100
  result = MseScorer(reconstruct_fn=fake_reconstruct, image_size=32).score({"image": im})
  (x,) = calls
  assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
  assert result["score"] == pytest.approx(0.01, rel=1e-5)
  with pytest.raises(ValueError, match="shape"):
    MseScorer(reconstruct_fn=lambda x: x[:, :16], image_size=32).score({"image": im})


def test_pixel_scorers_score_a_prepared_batch_as_they_score_each_item():
  """JPEG and MSE take a batch prepared once (uint8 at the scoring size; [-1, 1] floats are quantised as a file
  would be): the same scores as item by item, with one reconstruct_fn call per image size."""
  from cat_jax.complexity.scorers import prepare_batch

  source = EmbeddedSource("validation", num_images=6, image_size=48)
  items = [source[i] for i in range(len(source))]
  batch = prepare_batch([it["image"] for it in items], 32)
  assert all(x.dtype == np.uint8 and x.shape == (32, 32, 3) for x in batch)
  assert prepare_batch(batch, 32)[0] is batch[0]  # prepared already: used as it is
  floats = [x.astype(np.float32) / 127.5 - 1.0 for x in batch]
  calls = []
  recon = lambda x: calls.append(x.shape) or np.clip(x + 0.1, -1, 1)
  for scorer in (JpegScorer(image_size=32), MseScorer(image_size=32), MseScorer(image_size=None, reconstruct_fn=recon)):
    each = [scorer.score({"id": str(i), "image": x})["score"] for i, x in enumerate(batch)]
    np.testing.assert_allclose(scorer.scores(batch), each, rtol=1e-6)
    np.testing.assert_allclose(scorer.scores(floats), each, rtol=1e-6)
  assert calls[-2:] == [(6, 32, 32, 3), (6, 32, 32, 3)]  # one call per batch, after one per item


def test_lowpass_proxy_keeps_what_the_small_grid_holds():
  constant = np.full((1, 64, 64, 3), 0.3, np.float32)
  np.testing.assert_allclose(lowpass_reconstruct(constant, 32), constant, atol=1e-6)
  rng = np.random.default_rng(0)
  smooth = np.broadcast_to(np.linspace(-1, 1, 64, dtype=np.float32)[None, None, :, None], (1, 64, 64, 3))
  noise = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  err = lambda x: np.mean((lowpass_reconstruct(x, 8) - x) ** 2)
  assert err(smooth) < 0.01 * err(noise)


# --- levels ----------------------------------------------------------------------------------------------


def test_levels_for_scores_at_the_default_llm_thresholds():
  levels = thresholds_lib.levels_for_scores(range(1, 10), thresholds_lib.DEFAULT_LLM_THRESHOLDS)
  assert levels.tolist() == [2, 2, 2, 1, 1, 1, 0, 0, 0]
  assert thresholds_lib.levels_for_scores([0.7], (0.5, 1.0)).tolist() == [1]
  assert thresholds_lib.parse_thresholds("3,6") == (3, 6)
  with pytest.raises(ValueError, match="threshold"):
    thresholds_lib.levels_for_scores([5], (6, 3))


def test_quantile_thresholds_split_in_thirds():
  scores = np.arange(30, dtype=np.float64)
  t = thresholds_lib.quantile_thresholds(scores)
  assert thresholds_lib.level_counts(scores, t) == [10, 10, 10]
  assert thresholds_lib.default_thresholds("caption_llm", scores) == (3, 6)
  assert thresholds_lib.default_thresholds("jpeg", scores) == t


def brute_force_best_error(scores, target, image_hw=(256, 256)):
  candidates = [min(scores) - 1] + sorted(set(scores))
  return min(abs(thresholds_lib.mean_tokens(scores, (a, b), image_hw) - target)
             for a in candidates for b in candidates if a <= b)


@pytest.mark.parametrize("target", [64, 150, 300, 448, 700, 1024])
def test_budget_thresholds_hit_the_target(target):
  rng = np.random.default_rng(target)
  scores = rng.integers(1, 10, size=200).tolist()
  t = thresholds_lib.budget_thresholds(scores, target)
  error = abs(thresholds_lib.mean_tokens(scores, t) - target)
  assert error <= max(0.01 * target, brute_force_best_error(scores, target)) + 1e-9
  assert all(isinstance(v, int) for v in t)  # integer scores give integer thresholds


def test_budget_thresholds_prefer_spreading_over_levels():
  scores = list(range(1, 10)) * 10  # uniform 1..9
  # 448 = (1024 + 256 + 64) / 3 is met exactly by equal thirds (and by nothing more even).
  assert thresholds_lib.budget_thresholds(scores, 448) == (3, 6)
  # Raw float scores: target reached within 1%.
  raw = np.random.default_rng(0).lognormal(size=500)
  t = thresholds_lib.budget_thresholds(raw, 256)
  assert abs(thresholds_lib.mean_tokens(raw, t) - 256) <= 2.56
  assert min(thresholds_lib.level_counts(raw, t)) > 0
  with pytest.raises(ValueError, match="outside"):
    thresholds_lib.budget_thresholds(scores, 2000)


# --- manifest and runner ---------------------------------------------------------------------------------


def test_manifest_append_resume_and_partial_lines(tmp_path):
  path = tmp_path / "m.jsonl"
  with manifest_lib.ManifestWriter(path, header={"scorer": {"method": "jpeg"}}) as w:
    w.write({"id": "a", "score": 1.0, "level": None, "method": "jpeg"})
    w.write({"id": "b", "method": "jpeg", "error": "boom"})
  with open(path, "ab") as f:
    f.write(b'{"id": "c", "sco')  # a crash mid-write
  with pytest.warns(UserWarning, match="1 unreadable"):
    assert manifest_lib.ids_to_skip(path, "jpeg") == {"a", "b"}
  with pytest.warns(UserWarning):
    assert manifest_lib.ids_to_skip(path, "jpeg", retry_failures=True) == {"a"}
  with manifest_lib.ManifestWriter(path, header={"scorer": {"method": "jpeg"}}) as w:  # terminates the line
    w.write({"id": "b", "score": 2.0, "level": None, "method": "jpeg"})
  lines = path.read_text().splitlines()
  assert json.loads(lines[0]) == {"header": {"scorer": {"method": "jpeg"}}} and len(lines) == 5  # header once
  with pytest.warns(UserWarning):
    latest = manifest_lib.read_manifest(path)
  assert latest["b"]["score"] == 2.0 and set(latest) == {"a", "b"}
  assert manifest_lib.read_header(path) == {"scorer": {"method": "jpeg"}}
  with pytest.warns(UserWarning), pytest.raises(manifest_lib.ManifestMismatch, match="method"):
    manifest_lib.ids_to_skip(path, "mse")
  with pytest.raises(manifest_lib.ManifestMismatch, match="quality: None -> 90"):
    manifest_lib.check_header(path, {"scorer": {"method": "jpeg", "quality": 90}})


def test_load_levels_is_the_one_strict_reader(tmp_path):
  path = tmp_path / "m.jsonl"
  rows = [{"header": {"scorer": {"method": "caption_llm"}}}, {"id": "a", "level": 0}, {"id": "b", "level": "16x"},
          {"id": "c", "level": 32}, {"id": "d", "level": 2.0}, {"id": "e", "method": "caption_llm", "error": "x"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert load_levels(path) == {"a": 0, "b": 1, "c": 2, "d": 2}  # indices and factors; header and failure skipped
  path.write_text(json.dumps({"id": "a", "level": None, "score": 1.0, "method": "jpeg"}) + "\n")
  with pytest.raises(ValueError, match=r"m.jsonl:1: id 'a' has no level.*not finished"):
    load_levels(path)
  path.write_text(json.dumps({"id": "a", "level": 0}) + '\n{"id": "b", "le')
  with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON.*rerun"):
    load_levels(path)
  path.write_text(json.dumps({"id": "a", "level": "4x"}) + "\n")
  with pytest.raises(ValueError, match=r"m.jsonl:1: a level must be an index \(0, 1, 2\) or a factor"):
    load_levels(path)


class CountingScorer:
  """Scores an item by its 'value'; fails items whose value is None."""
  method = "jpeg"

  def __init__(self):
    self.calls = []
    self._lock = threading.Lock()

  def config(self):
    return {"method": self.method, "rule": "value"}

  def score(self, item):
    with self._lock:
      self.calls.append(item["id"])
    if item["value"] is None:
      raise ValueError("cannot score")
    result = {"score": item["value"]}
    if item.get("note"):
      result["fallback"] = item["note"]
    return result


def test_runner_resume_skips_done_ids_and_failures(tmp_path):
  items = [{"id": f"i{k}", "value": None if k == 3 else float(k)} for k in range(9)]
  out = tmp_path / "scores.jsonl"
  first = CountingScorer()
  summary = score_source(items, first, out, workers=2, limit=5, progress=False)
  assert (summary.scored, summary.failed, summary.skipped) == (4, 1, 0)
  assert sorted(first.calls) == [f"i{k}" for k in range(5)]

  second = CountingScorer()
  summary = score_source(items, second, out, workers=2, progress=False)
  assert sorted(second.calls) == ["i5", "i6", "i7", "i8"]
  assert (summary.scored, summary.failed, summary.skipped) == (4, 0, 5)

  items[3]["value"] = 3.0
  third = CountingScorer()
  summary = score_source(items, third, out, workers=2, retry_failures=True, progress=False)
  assert third.calls == ["i3"] and summary.scored == 1

  latest = manifest_lib.read_manifest(out)
  lines = out.read_text().splitlines()
  assert len(lines) == 1 + 9  # rewritten: the header, then one line per id, failure replaced
  assert json.loads(lines[0]) == {"header": {"scorer": {"method": "jpeg", "rule": "value"}}}
  assert [latest[f"i{k}"]["score"] for k in range(9)] == [float(k) for k in range(9)]
  # Raw scores: tercile thresholds over all 9, written into every record and the thresholds file.
  assert [latest[f"i{k}"]["level"] for k in range(9)] == [2, 2, 2, 1, 1, 1, 0, 0, 0]
  info = json.loads((tmp_path / "scores.jsonl.thresholds.json").read_text())
  assert info["mode"] == "quantile" and info["level_counts"] == [3, 3, 3]
  assert load_levels(out) == {f"i{k}": [2, 2, 2, 1, 1, 1, 0, 0, 0][k] for k in range(9)}


def test_runner_refuses_to_resume_with_another_scorer_setup(tmp_path):
  out = tmp_path / "m.jsonl"
  score_source([{"id": "a", "value": 1.0}], CountingScorer(), out, progress=False)

  class OtherRule(CountingScorer):
    def config(self):
      return {"method": self.method, "rule": "other"}

  with pytest.raises(manifest_lib.ManifestMismatch, match=r"rule: 'value' -> 'other'\); use another --out"):
    score_source([{"id": "b", "value": 1.0}], OtherRule(), out, progress=False)


def test_runner_records_failures_and_counts_fallbacks(tmp_path):
  items = [{"id": "good", "value": 1.0}, {"id": "bad", "value": None},
           {"id": "noted", "value": 2.0, "note": "perception answers lack ['detail']"}]
  out = tmp_path / "m.jsonl"
  summary = score_source(items, CountingScorer(), out, workers=1, progress=False)
  assert (summary.scored, summary.failed, summary.fallbacks) == (2, 1, 1)
  latest = manifest_lib.read_manifest(out)
  assert latest["bad"] == {"id": "bad", "method": "jpeg", "error": "ValueError: cannot score"}
  assert latest["noted"]["fallback"] == "perception answers lack ['detail']"
  assert set(load_levels(out)) == {"good", "noted"}


def test_runner_stops_after_consecutive_failures(tmp_path):
  items = [{"id": f"i{k}", "value": None} for k in range(50)]
  scorer = CountingScorer()
  with pytest.raises(TooManyFailures, match="5 items failed in a row"):
    score_source(items, scorer, tmp_path / "m.jsonl", workers=1, max_consecutive_failures=5, progress=False)
  assert len(scorer.calls) < 10


def test_runner_budget_mode_relevels(tmp_path):
  items = [{"id": f"i{k}", "value": float(k % 9 + 1)} for k in range(90)]
  out = tmp_path / "m.jsonl"
  summary = score_source(items, CountingScorer(), out, workers=2, budget_tokens=300, progress=False)
  assert summary.threshold_mode == "budget" and abs(summary.mean_tokens - 300) <= 3
  levels = [r["level"] for r in manifest_lib.read_manifest(out).values()]
  tokens = np.array([1024, 256, 64])[levels]
  assert tokens.mean() == pytest.approx(summary.mean_tokens)


def test_caption_llm_run_is_concurrent_bounded_and_resumable(chat_server, tmp_path):
  # Exactly `workers` requests in flight, shown without timing: the first four replies are held until all four
  # requests have arrived (only a concurrent client gets there), and no reply is slow enough to time out, so no
  # abandoned request can linger on the server while its retry runs (see fake_chat_server.py on the count).
  workers, lock, arrived, all_arrived = 4, threading.Lock(), [0], threading.Event()

  def respond(body, i):
    if "caption number 5." in prompt_text(body):
      return Reply("no idea")  # garbage for this one image, every time
    if i < workers:
      with lock:
        arrived[0] += 1
        if arrived[0] == workers:
          all_arrived.set()
      all_arrived.wait(timeout=60)
    return Reply('{"score": 7, "reason": "busy"}')

  server = chat_server(respond, max_requests=14)
  scorer = CaptionLLMScorer(make_client(server, timeout=120.0), llm_model="llm", use_dataset_captions=True,
                            parse_retries=1)
  items = [{"id": f"img{k}", "image": flat_image(8), "caption": f"caption number {k}."} for k in range(12)]
  out = tmp_path / "llm.jsonl"
  summary = score_source(items, scorer, out, workers=workers, progress=False)
  assert (summary.scored, summary.failed) == (11, 1)
  assert len(server.requests) == 11 + 2  # the garbage item was asked twice, then recorded as failed
  assert all_arrived.is_set() and server.max_in_flight == workers
  latest = manifest_lib.read_manifest(out)
  assert latest["img0"] == {"id": "img0", "score": 7, "level": 0, "method": "caption_llm", "reason": "busy",
                            "caption": "caption number 0.", "answers": None}
  assert "error" in latest["img5"] and "level" not in latest["img5"] and "score" not in latest["img5"]
  header = manifest_lib.read_header(out)
  assert header["scorer"]["llm_model"] == "llm" and header["scorer"]["vlm_model"] is None
  assert header["scorer"]["prompts"]["score"] == prompts.SCORE_PROMPT.template
  # Resume: nothing left to do, no request sent.
  summary = score_source(items, scorer, out, workers=4, progress=False)
  assert (summary.scored, summary.failed, summary.skipped) == (0, 0, 12)
  assert len(server.requests) == 13


def test_dead_endpoint_stops_the_run_with_one_error(tmp_path):
  scorer = CaptionLLMScorer(ChatClient(base_url=dead_base_url(), max_retries=1, timeout=5.0), llm_model="llm",
                            use_dataset_captions=True)
  items = [{"id": f"img{k}", "image": flat_image(8), "caption": f"caption {k}."} for k in range(20)]
  out = tmp_path / "llm.jsonl"
  with pytest.raises(EndpointError, match="cannot reach"):
    score_source(items, scorer, out, workers=3, progress=False)
  assert manifest_lib.read_manifest(out) == {}  # no image is blamed for the endpoint


# --- manifests on an object store (gs://) -----------------------------------------------------------------


def test_manifest_on_an_object_store_adds_objects_and_never_appends(object_store):
  store = object_store
  path = "gs://bucket/scores/m.jsonl"
  with manifest_lib.ManifestWriter(path, header={"scorer": {"method": "jpeg"}}, flush_every=2,
                                   flush_seconds=float("inf")) as w:
    for k in range(5):
      w.write({"id": f"i{k}", "score": float(k), "level": None, "method": "jpeg"})
  parts = sorted(k for k in store.store if k.startswith("bucket/scores/m.jsonl.parts/"))
  assert len(parts) == 3  # header + 5 records, two lines per object
  assert all(store.writes[p] == 1 for p in parts)  # each object written once, none rewritten
  assert sorted(manifest_lib.read_manifest(path)) == [f"i{k}" for k in range(5)]
  assert manifest_lib.read_header(path) == {"scorer": {"method": "jpeg"}}
  with pytest.raises(ValueError, match="has not finished.* holds records not yet merged"):
    load_levels(path)
  # A resumed run adds objects after the old ones; its newer record of i4 wins.
  with manifest_lib.ManifestWriter(path, header={"scorer": {"method": "jpeg"}}) as w:
    w.write({"id": "i4", "score": 40.0, "level": None, "method": "jpeg"})
  assert manifest_lib.read_manifest(path)["i4"]["score"] == 40.0
  assert manifest_lib.read_header(path) == {"scorer": {"method": "jpeg"}}  # written once, by the first run


def test_runner_on_an_object_store(object_store):
  store = object_store
  out = "gs://bucket/run/scores.jsonl"
  items = [{"id": f"i{k}", "value": None if k == 4 else float(k)} for k in range(9)]
  summary = score_source(items, CountingScorer(), out, workers=2, progress=False)
  assert (summary.scored, summary.failed) == (8, 1)
  assert sorted(store.store) == [out[5:], out[5:] + ".thresholds.json"]  # parts merged and removed
  assert store.writes[out[5:]] == 1 and store.writes[out[5:] + ".thresholds.json"] == 1
  levels = load_levels(out)
  assert levels == {f"i{k}": lvl for k, lvl in zip([0, 1, 2, 3, 5, 6, 7, 8], [2, 2, 2, 1, 1, 1, 0, 0])}
  # Resuming the finished run sends nothing and keeps the levels.
  summary = score_source(items, CountingScorer(), out, workers=2, progress=False)
  assert (summary.scored, summary.skipped) == (0, 9) and load_levels(out) == levels


def test_level_assigner_one_level_a_manifest_or_a_scorer(tmp_path):
  """The one place levels are decided (Tokenizer.encode(levels=...), encode --level): each way, and its errors."""
  from cat_jax.complexity.assign import LevelAssigner

  flat = np.zeros((32, 32, 3), np.float32)
  busy = np.random.default_rng(0).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
  ids, images = ["a", "b"], [flat, busy]
  np.testing.assert_array_equal(LevelAssigner(level="16x")(ids, images), [1, 1])
  manifest = tmp_path / "m.jsonl"
  manifest.write_text('{"id": "a", "score": 2, "level": 2}\n{"id": "b", "score": 8, "level": 0}\n')
  np.testing.assert_array_equal(LevelAssigner(manifest=str(manifest))(ids, images), [2, 0])
  np.testing.assert_array_equal(LevelAssigner(manifest={"a": "8x", "b": 32})(ids, images), [0, 2])
  jpeg = LevelAssigner(scorer=JpegScorer(image_size=None), thresholds=(6.0, 8.0))  # 32x32: headers cost 5 bpp
  np.testing.assert_array_equal(jpeg(ids, images), [2, 0])  # a flat image is cheap to store, noise is not
  # A budget counts tokens at each image's own size, as encode spends them: a flat 64x64 and a noisy 128x128 image
  # average 40 tokens with both at 16x ((16 + 64) / 2); counted at one 64x64 size that mean would be 16x for the
  # flat one and 8x for the noise ((16 + 64) / 2 again).
  sized = [np.zeros((64, 64, 3), np.float32), np.random.default_rng(1).uniform(-1, 1, (128, 128, 3)).astype(np.float32)]
  budget = LevelAssigner(scorer=JpegScorer(image_size=None), budget_tokens=40)
  np.testing.assert_array_equal(budget(ids, sized), [1, 1])
  with pytest.raises(ValueError, match="not in the manifest"):
    LevelAssigner(manifest={"a": 0})(ids, images)
  with pytest.raises(ValueError, match="exactly one"):
    LevelAssigner(level=0, scorer=JpegScorer(image_size=None))
  with pytest.raises(ValueError, match="exactly one"):
    LevelAssigner()
  with pytest.raises(ValueError, match="raw scores"):
    LevelAssigner(scorer=JpegScorer(image_size=None))
  with pytest.raises(ValueError, match="only apply"):
    LevelAssigner(level=1, thresholds=(1, 2))


def test_quality_target_reconstructs_coarse_to_fine_and_stops_early():
  """coarsest_level_meeting: 32x for all, 16x only for the images that missed, never 8x."""
  from cat_jax.complexity.assign import LevelAssigner, coarsest_level_meeting

  rng = np.random.default_rng(1)
  images = [rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32) for _ in range(3)]
  error = {2: [0.0, 0.5, 0.5], 1: [None, 0.0, 0.5]}  # image 0 exact at 32x, 1 at 16x, 2 never
  calls = []

  def reconstruct(batch, level):
    calls.append((level, len(batch)))
    todo = [i for i in range(3) if error[level][i] is not None]
    return [np.clip(images[i] + error[level][i], -1, 1) for i in todo]

  np.testing.assert_array_equal(coarsest_level_meeting(images, 40.0, reconstruct), [2, 1, 0])
  assert calls == [(2, 3), (1, 2)]
  with pytest.raises(ValueError, match="needs the tokenizer's reconstruct"):
    LevelAssigner(target_psnr=30).assign(["0"], images[:1])
  error[0] = [None, None, 0.5]  # as an assigner it also measures 8x for the images 16x missed: none reaches it
  assignment = LevelAssigner(target_psnr=40.0).assign(["0", "1", "2"], images, reconstruct=reconstruct)
  assert assignment.levels.tolist() == [2, 1, 0] and assignment.missed_target.tolist() == [False, False, True]
