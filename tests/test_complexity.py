"""Complexity scorers, the chat client against a scripted local server, levels and the resumable manifest."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cat_jax.complexity import levels as levels_lib
from cat_jax.complexity import manifest as manifest_lib
from cat_jax.complexity import prompts
from cat_jax.complexity.llm import ChatClient, LLMError
from cat_jax.complexity.runner import TooManyFailures, score_source
from cat_jax.complexity.scorers import (CaptionLLMScorer, JpegScorer, MseScorer, TextOnlyScorer, jpeg_bpp,
                                        lowpass_reconstruct, prepare_image, to_pil_rgb)
from cat_jax.data import load_levels
from cat_jax.data.embedded import EmbeddedSource
from fake_chat_server import Reply
from fake_object_store import use_fake_object_store

GOOD_PERCEPTION = "FACES: no, none\nTEXT: yes, a few words\nDETAIL: medium, about five objects"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  for name in ("CAT_LLM_API_KEY", "OPENAI_API_KEY"):
    monkeypatch.delenv(name, raising=False)


def make_client(server, **kwargs):
  delays = []
  kwargs.setdefault("timeout", 2.0)
  kwargs.setdefault("max_retries", 3)
  client = ChatClient(base_url=server.base_url, sleep=delays.append, backoff=0.5, **kwargs)
  return client, delays


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


@pytest.mark.parametrize("answer, expected", [
    ('{"score": 7, "reason": "dense text"}', (7, "dense text")),
    ('Sure!\n```json\n{"score": 2, "reason": "a flat sky"}\n```', (2, "a flat sky")),
    ('{"score": "4", "reason": "a room"}', (4, "a room")),
    ('{"score": 9.0}', (9, "")),
    ("Score: 5\nReason: a street scene", (5, "a street scene")),
])
def test_parse_score_accepts_integer_answers(answer, expected):
  assert prompts.parse_score(answer) == expected


@pytest.mark.parametrize("answer", [
    '{"score": 6.5, "reason": "between"}', '{"score": "seven"}', '{"score": 10}', '{"score": 0}',
    '{"score": true}', "Score: 6.5", "I think it is fairly complex.", "", '{"reason": "no score"}',
])
def test_parse_score_rejects_everything_else(answer):
  with pytest.raises(prompts.ParseError):
    prompts.parse_score(answer)


def test_parse_perception():
  answers = prompts.parse_perception("**FACES:** yes, two small faces\n- TEXT: no\n3. Detail: high, a crowd")
  assert answers == {"faces": "yes, two small faces", "text": "no", "detail": "high, a crowd"}
  with pytest.raises(prompts.ParseError):
    prompts.parse_perception("FACES: no\nTEXT: no")
  prompt = prompts.score_prompt("A cat.", answers)
  assert "A cat." in prompt and "FACES: yes, two small faces" in prompt and "integer from 1 to 9" in prompt


# --- chat client -----------------------------------------------------------------------------------------


def test_client_request_body_headers_and_image_parts(chat_server):
  server = chat_server(lambda body, i: Reply("hello"), max_requests=2)
  client, _ = make_client(server, api_key="sk-secret-123", max_tokens=77)
  image = text_image(40)
  from cat_jax.complexity.llm import user_message
  assert client.chat("my-vlm", [user_message("describe", [image])]) == "hello"
  assert "sk-secret-123" not in repr(client)
  (body,), (headers,) = server.requests, server.headers
  assert server.paths == ["/v1/chat/completions"]
  assert headers["authorization"] == "Bearer sk-secret-123"
  assert headers["content-type"] == "application/json"
  assert body["model"] == "my-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 77
  image_part, text_part = body["messages"][0]["content"]
  assert body["messages"][0]["role"] == "user" and text_part == {"type": "text", "text": "describe"}
  url = image_part["image_url"]["url"]
  assert image_part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
  decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
  assert decoded.format == "JPEG" and decoded.size == (40, 40)
  # JPEG at quality 90 of a black-on-white image stays close to it.
  assert np.abs(np.asarray(decoded.convert("RGB"), np.float32) - np.asarray(image, np.float32)).mean() < 12


def test_client_sends_no_authorization_without_key(chat_server):
  server = chat_server(lambda body, i: Reply("ok"), max_requests=1)
  client, _ = make_client(server, api_key=None)
  client.chat("m", [{"role": "user", "content": "hi"}])
  assert "authorization" not in server.headers[0]


def test_client_retries_500_with_exponential_backoff(chat_server):
  server = chat_server(lambda body, i: Reply(status=500, raw=b"overloaded") if i < 3 else Reply("fine"),
                       max_requests=4)
  client, delays = make_client(server, max_retries=3)
  assert client.chat("m", [{"role": "user", "content": "hi"}]) == "fine"
  assert len(server.requests) == 4
  assert len(delays) == 3
  for k, d in enumerate(delays):  # 0.5 * 2**k with +-25% jitter
    assert 0.75 * 0.5 * 2 ** k <= d <= 1.25 * 0.5 * 2 ** k


def test_client_gives_up_after_max_retries_and_redacts_key(chat_server):
  # The server echoes the key in its error body; the client's message must not.
  server = chat_server(lambda body, i: Reply(status=503, raw=b"bad key sk-secret-123"), max_requests=3)
  client, _ = make_client(server, max_retries=2, api_key="sk-secret-123")
  with pytest.raises(LLMError) as e:
    client.chat("m", [{"role": "user", "content": "hi"}])
  assert len(server.requests) == 3
  assert "503" in str(e.value) and "sk-secret-123" not in str(e.value) and "***" in str(e.value)


def test_client_does_not_retry_client_errors(chat_server):
  server = chat_server(lambda body, i: Reply(status=404, raw=b'{"error": "model not found"}'), max_requests=1)
  client, delays = make_client(server)
  with pytest.raises(LLMError, match="404.*model not found"):
    client.chat("missing-model", [{"role": "user", "content": "hi"}])
  assert len(server.requests) == 1 and delays == []


def test_client_retries_timeouts(chat_server):
  server = chat_server(lambda body, i: Reply("late", delay=1.0) if i == 0 else Reply("on time"), max_requests=2)
  client, delays = make_client(server, timeout=0.3)
  assert client.chat("m", [{"role": "user", "content": "hi"}]) == "on time"
  assert len(server.requests) == 2 and len(delays) == 1


def test_client_retries_garbage_bodies(chat_server):
  replies = [Reply(raw=b"<html>not json"), Reply(raw=b'{"choices": []}'), Reply("<think>hmm</think> real")]
  server = chat_server(lambda body, i: replies[i], max_requests=3)
  client, _ = make_client(server)
  assert client.chat("m", [{"role": "user", "content": "hi"}]) == "real"
  assert len(server.requests) == 3


def test_client_connection_refused_is_an_llm_error():
  client = ChatClient(base_url="http://127.0.0.1:9/v1", max_retries=1, timeout=1.0, sleep=lambda s: None)
  with pytest.raises(LLMError, match="2 attempts"):
    client.chat("m", [{"role": "user", "content": "hi"}])


# --- caption + LLM scorer --------------------------------------------------------------------------------


def test_caption_llm_scorer_pipeline_request_bodies(chat_server):
  def respond(body, i):
    if body["model"] == "vlm":
      return Reply("A page of small black text." if "Describe" in prompt_text(body) else GOOD_PERCEPTION)
    return Reply('{"score": 8, "reason": "dense small text"}')

  server = chat_server(respond, max_requests=3)
  client, _ = make_client(server)
  scorer = CaptionLLMScorer(client, vlm_model="vlm", llm_model="llm", image_size=32)
  result = scorer.score({"id": "a", "image": np.asarray(text_image(64))})
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


def test_caption_llm_retries_unparseable_then_fails_without_default(chat_server):
  answers = iter(['{"score": 6.5}', "seven", '{"score": 3, "reason": "flat"}'])
  server = chat_server(lambda body, i: Reply(next(answers)), max_requests=3)
  client, _ = make_client(server)
  scorer = CaptionLLMScorer(client, llm_model="llm", use_dataset_captions=True, parse_retries=2)
  assert scorer.score({"id": "x", "image": flat_image(), "caption": "A blue sky."})["score"] == 3
  assert len(server.requests) == 3 and "A blue sky." in prompt_text(server.requests[0])

  server = chat_server(lambda body, i: Reply("somewhere around 6.5 I guess"), max_requests=2)
  client, _ = make_client(server)
  scorer = CaptionLLMScorer(client, llm_model="llm", use_dataset_captions=True, parse_retries=1)
  with pytest.raises(prompts.ParseError, match="unparseable after 2 answers"):
    scorer.score({"id": "x", "image": flat_image(), "caption": "A blue sky."})
  assert len(server.requests) == 2


def test_dataset_captions_skip_the_vlm_and_fall_back_to_it(chat_server):
  def respond(body, i):
    if body["model"] == "vlm":
      return Reply("A flat colour." if "Describe" in prompt_text(body) else GOOD_PERCEPTION)
    return Reply('{"score": 2, "reason": "flat"}')

  server = chat_server(respond, max_requests=4)
  client, _ = make_client(server)
  scorer = CaptionLLMScorer(client, vlm_model="vlm", llm_model="llm", use_dataset_captions=True)
  with_caption = scorer.score({"id": "a", "image": flat_image(), "caption": "Dataset caption."})
  assert with_caption["caption"] == "Dataset caption." and with_caption["answers"] is None
  assert [r["model"] for r in server.requests] == ["llm"]
  without = scorer.score({"id": "b", "image": flat_image()})
  assert without["caption"] == "A flat colour." and without["answers"]["faces"] == "no, none"
  assert [r["model"] for r in server.requests] == ["llm", "vlm", "vlm", "llm"]
  with pytest.raises(ValueError, match="--vlm-model"):
    CaptionLLMScorer(client, llm_model="llm")


def test_text_only_scorer_sends_the_prompt_without_an_image(chat_server):
  server = chat_server(lambda body, i: Reply('{"score": 9, "reason": "a newspaper page"}'), max_requests=1)
  client, _ = make_client(server)
  result = TextOnlyScorer(client, llm_model="llm").score_text("a full newspaper page")
  assert result == {"score": 9, "reason": "a newspaper page", "text": "a full newspaper page"}
  (body,) = server.requests
  assert body["model"] == "llm" and prompt_text(body) == prompts.text_only_prompt("a full newspaper page")
  assert "a full newspaper page" in prompt_text(body)


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


def test_lowpass_proxy_keeps_what_the_small_grid_holds():
  constant = np.full((1, 64, 64, 3), 0.3, np.float32)
  np.testing.assert_allclose(lowpass_reconstruct(constant, 32), constant, atol=1e-6)
  rng = np.random.default_rng(0)
  smooth = np.broadcast_to(np.linspace(-1, 1, 64, dtype=np.float32)[None, None, :, None], (1, 64, 64, 3))
  noise = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
  err = lambda x: np.mean((lowpass_reconstruct(x, 8) - x) ** 2)
  assert err(smooth) < 0.01 * err(noise)


# --- levels ----------------------------------------------------------------------------------------------


def test_level_for_score_default_llm_thresholds():
  assert [levels_lib.level_for_score(s) for s in range(1, 10)] == [2, 2, 2, 1, 1, 1, 0, 0, 0]
  assert levels_lib.level_for_score(0.7, (0.5, 1.0)) == 1
  assert levels_lib.parse_thresholds("3,6") == (3, 6)
  with pytest.raises(ValueError):
    levels_lib.level_for_score(5, (6, 3))


def test_quantile_thresholds_split_in_thirds():
  scores = np.arange(30, dtype=np.float64)
  t = levels_lib.quantile_thresholds(scores)
  assert levels_lib.level_counts(scores, t) == [10, 10, 10]
  assert levels_lib.default_thresholds("caption_llm", scores) == (3, 6)
  assert levels_lib.default_thresholds("jpeg", scores) == t


def brute_force_best_error(scores, target, image_hw=(256, 256)):
  candidates = [min(scores) - 1] + sorted(set(scores))
  return min(abs(levels_lib.mean_tokens(scores, (a, b), image_hw) - target)
             for a in candidates for b in candidates if a <= b)


@pytest.mark.parametrize("target", [64, 150, 300, 448, 700, 1024])
def test_budget_thresholds_hit_the_target(target):
  rng = np.random.default_rng(target)
  scores = rng.integers(1, 10, size=200).tolist()
  t = levels_lib.budget_thresholds(scores, target)
  error = abs(levels_lib.mean_tokens(scores, t) - target)
  assert error <= max(0.01 * target, brute_force_best_error(scores, target)) + 1e-9
  assert all(isinstance(v, int) for v in t)  # integer scores give integer thresholds


def test_budget_thresholds_prefer_spreading_over_levels():
  scores = list(range(1, 10)) * 10  # uniform 1..9
  # 448 = (1024 + 256 + 64) / 3 is met exactly by equal thirds (and by nothing more even).
  assert levels_lib.budget_thresholds(scores, 448) == (3, 6)
  # Raw float scores: target reached within 1%.
  raw = np.random.default_rng(0).lognormal(size=500)
  t = levels_lib.budget_thresholds(raw, 256)
  assert abs(levels_lib.mean_tokens(raw, t) - 256) <= 2.56
  assert min(levels_lib.level_counts(raw, t)) > 0
  with pytest.raises(ValueError, match="outside"):
    levels_lib.budget_thresholds(scores, 2000)


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
  with pytest.raises(ValueError, match=r"m.jsonl:1: id 'a' has no level yet: the scoring run .* has not finished"):
    load_levels(path)
  path.write_text(json.dumps({"id": "a", "level": 0}) + '\n{"id": "b", "le')
  with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON .* rerun the same cat_jax.score command"):
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
    return {"score": item["value"]}


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


def test_runner_records_failures_without_level(tmp_path):
  items = [{"id": "good", "value": 1.0}, {"id": "bad", "value": None}]
  out = tmp_path / "m.jsonl"
  summary = score_source(items, CountingScorer(), out, workers=1, progress=False)
  assert summary.failed == 1
  bad = manifest_lib.read_manifest(out)["bad"]
  assert bad == {"id": "bad", "method": "jpeg", "error": "ValueError: cannot score"}
  assert set(load_levels(out)) == {"good"}


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
  client, _ = make_client(server, timeout=120.0)
  scorer = CaptionLLMScorer(client, llm_model="llm", use_dataset_captions=True, parse_retries=1)
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
  # Resume: nothing left to do, no request sent.
  summary = score_source(items, scorer, out, workers=4, progress=False)
  assert (summary.scored, summary.failed, summary.skipped) == (0, 0, 12)
  assert len(server.requests) == 13


# --- manifests on an object store (gs://) -----------------------------------------------------------------


def test_manifest_on_an_object_store_adds_objects_and_never_appends(monkeypatch):
  store = use_fake_object_store(monkeypatch)
  path = "gs://bucket/scores/m.jsonl"
  with manifest_lib.ManifestWriter(path, header={"scorer": {"method": "jpeg"}}, flush_every=2,
                                   flush_seconds=float("inf")) as w:
    for k in range(5):
      w.write({"id": f"i{k}", "score": float(k), "level": None, "method": "jpeg"})
  parts = sorted(k for k in store.objects if k.startswith("gs://bucket/scores/m.jsonl.parts/"))
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


def test_runner_on_an_object_store(monkeypatch):
  store = use_fake_object_store(monkeypatch)
  out = "gs://bucket/run/scores.jsonl"
  items = [{"id": f"i{k}", "value": None if k == 4 else float(k)} for k in range(9)]
  summary = score_source(items, CountingScorer(), out, workers=2, progress=False)
  assert (summary.scored, summary.failed) == (8, 1)
  assert sorted(store.objects) == [out, out + ".thresholds.json"]  # parts merged and removed
  assert store.writes[out] == 1 and store.writes[out + ".thresholds.json"] == 1
  levels = load_levels(out)
  assert levels == {f"i{k}": lvl for k, lvl in zip([0, 1, 2, 3, 5, 6, 7, 8], [2, 2, 2, 1, 1, 1, 0, 0])}
  # Resuming the finished run sends nothing and keeps the levels.
  summary = score_source(items, CountingScorer(), out, workers=2, progress=False)
  assert (summary.scored, summary.skipped) == (0, 9) and load_levels(out) == levels
