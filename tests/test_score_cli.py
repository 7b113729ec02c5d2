"""`python -m cat_jax.score`: jpeg/mse on the embedded data and an image folder, caption_llm and --text against a
scripted local OpenAI-compatible server, --dry-run, a dead endpoint, a gs:// manifest, resume, exit codes, and the
API key never printed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cat_jax import score
from cat_jax.complexity import prompts
from cat_jax.data import load_levels
from fake_chat_server import Reply, dead_base_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "sk-test-do-not-print-4242"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
  monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
  monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
  for name in ("CAT_LLM_API_KEY", "OPENAI_API_KEY", "CAT_LLM_BASE_URL", "OPENAI_BASE_URL"):
    monkeypatch.delenv(name, raising=False)


def read_lines(path):
  """The image records of a manifest (its header line left out)."""
  return [r for r in map(json.loads, path.read_text().splitlines()) if "header" not in r]


@pytest.fixture
def image_folder(tmp_path):
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "flat.png")
  page = Image.new("RGB", (64, 64), "white")
  draw = ImageDraw.Draw(page)
  for y in range(0, 64, 7):
    draw.text((0, y), "lorem ipsum dolor 12345", fill="black")
  page.save(folder / "sub" / "text.jpg", quality=95)
  noise = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
  Image.fromarray(noise).save(folder / "noise.png")
  (folder / "broken.png").write_bytes(b"not an image at all")
  return folder


def test_jpeg_cli_on_a_folder_with_progress_bar(image_folder, tmp_path, capsys):
  out = tmp_path / "folder.jsonl"
  rc = score.main(["--method", "jpeg", "--path", str(image_folder), "--out", str(out), "--image-size", "64"])
  err = capsys.readouterr().err
  assert rc == 1  # broken.png failed
  assert "score:jpeg" in err and "4/4" in err  # tqdm progress bar
  assert "scored 3, failed 1" in err
  records = {r["id"]: r for r in read_lines(out)}
  assert set(records) == {"flat.png", "noise.png", "sub/text.jpg", "broken.png"}
  assert "bad image" in records["broken.png"]["error"] and "level" not in records["broken.png"]
  assert records["flat.png"]["score"] < records["sub/text.jpg"]["score"] < records["noise.png"]["score"]
  # Tercile thresholds over three scores: one image per level.
  assert [records[i]["level"] for i in ("flat.png", "sub/text.jpg", "noise.png")] == [2, 1, 0]
  info = json.loads((tmp_path / "folder.jsonl.thresholds.json").read_text())
  assert info["mode"] == "quantile" and info["level_counts"] == [1, 1, 1] and info["num_failures"] == 1


def test_cli_entry_point_on_embedded_data_and_resume(tmp_path, capsys):
  out = tmp_path / "embedded.jsonl"
  args = ["--method", "jpeg", "--out", str(out), "--split", "validation"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  # One run through the `python -m` entry point (8 s on an idle machine; the timeout only stops a hang), the
  # resume in-process.
  first = subprocess.run([sys.executable, "-m", "cat_jax.score", *args, "--limit", "3"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=900)
  assert first.returncode == 0, first.stderr
  assert score.main(args + ["--limit", "8", "--no-progress"]) == 0
  assert "scored 5, failed 0, skipped (already in manifest) 3" in capsys.readouterr().err
  records = read_lines(out)
  assert [r["id"] for r in sorted(records, key=lambda r: r["id"])] == [
      f"embedded/validation/{i:06d}" for i in range(8)]
  by_index = {int(r["id"].rsplit("/", 1)[1]): r for r in records}
  # Kinds cycle flat, gradient, few_shapes, many_shapes, photo, chart, texture, dense_text.
  assert by_index[0]["score"] < by_index[7]["score"]
  assert by_index[0]["level"] == 2 and by_index[7]["level"] == 0


def test_mse_cli_proxy_budget_mode_and_missing_checkpoint(tmp_path, capsys):
  out = tmp_path / "mse.jsonl"
  # At 64x64 a level holds 64 / 16 / 4 tokens (8x / 16x / 32x).
  rc = score.main(["--method", "mse", "--split", "test", "--limit", "8", "--out", str(out), "--image-size", "64",
                   "--no-progress", "--budget-tokens", "30"])
  assert rc == 0
  records = {int(r["id"].rsplit("/", 1)[1]): r for r in read_lines(out)}
  assert records[0]["score"] < 1e-8 < records[7]["score"]  # flat vs dense text
  info = json.loads((tmp_path / "mse.jsonl.thresholds.json").read_text())
  tokens = np.array([64, 16, 4])[[r["level"] for r in records.values()]]
  assert info["mode"] == "budget" and info["mean_tokens"] == pytest.approx(tokens.mean())
  # Eight images can reach a mean within 2 tokens of 30 (e.g. 3 x 64 + 2 x 16 + 3 x 4 = 236 = 8 x 29.5).
  assert abs(tokens.mean() - 30) <= 2
  assert records[0]["level"] == 2
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    score.main(["--method", "mse", "--image-size", "64", "--budget-tokens", "100", "--out", str(tmp_path / "b")])
  assert e.value.code == 2 and "outside [4, 64]" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    score.main(["--method", "mse", "--checkpoint", str(tmp_path / "no_run"), "--out", str(tmp_path / "c.jsonl")])
  assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_caption_llm_cli_with_dataset_captions(chat_server, tmp_path, capsys, monkeypatch):
  def respond(body, i):
    text = body["messages"][0]["content"]
    return Reply('{"score": 9, "reason": "small text"}' if "small black text" in text else
                 '{"score": 2, "reason": "simple"}')

  server = chat_server(respond, max_requests=8)
  monkeypatch.setenv("CAT_LLM_API_KEY", SECRET)
  out = tmp_path / "llm.jsonl"
  rc = score.main(["--method", "caption_llm", "--limit", "8", "--split", "validation", "--use-dataset-captions",
                   "--base-url", server.base_url, "--llm-model", "test-llm", "--out", str(out), "--workers", "3",
                   "--budget-tokens", "340"])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  assert len(server.requests) == 8
  assert {r["model"] for r in server.requests} == {"test-llm"}
  assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.headers)
  assert SECRET not in captured.out + captured.err + out.read_text()
  records = {int(r["id"].rsplit("/", 1)[1]): r for r in read_lines(out)}
  assert records[7]["score"] == 9 and records[7]["reason"] == "small text"
  assert records[7]["caption"].startswith("A ") and "small black text" in records[7]["caption"]
  assert all(records[i]["score"] == 2 for i in range(7))
  # Seven 2s and one 9 at 256x256 reach means 64, 88, 184, 256, 352 or 1024; 352 (all 16x but the 9 at 8x) is
  # the closest to 340.
  assert [records[i]["level"] for i in range(8)] == [1] * 7 + [0]
  assert "(budget)" in captured.err


def test_caption_llm_cli_failures_exit_1_and_retry(chat_server, tmp_path, capsys):
  state = {"healthy": False}

  def respond(body, i):
    return Reply('{"score": 5, "reason": "ok"}') if state["healthy"] else Reply("I cannot rate images.")

  server = chat_server(respond, max_requests=12)
  out = tmp_path / "llm.jsonl"
  args = ["--method", "caption_llm", "--limit", "3", "--use-dataset-captions", "--base-url", server.base_url,
          "--llm-model", "m", "--out", str(out), "--parse-retries", "1", "--no-progress"]
  assert score.main(args) == 1
  assert len(server.requests) == 6  # 3 items x 2 answers each
  assert all("error" in r and "level" not in r for r in read_lines(out))
  assert score.main(args) == 0  # failures are not retried by default
  assert len(server.requests) == 6
  state["healthy"] = True
  assert score.main(args + ["--retry-failures"]) == 0
  assert len(server.requests) == 9
  assert [r["level"] for r in read_lines(out)] == [1, 1, 1]
  assert "scored 3, failed 0" in capsys.readouterr().err


def test_text_only_cli(chat_server, capsys):
  server = chat_server(lambda body, i: Reply('{"score": 8, "reason": "a crowd"}'), max_requests=2)
  rc = score.main(["--text", "a crowded stadium", "--text", "a blue sky", "--base-url", server.base_url,
                   "--llm-model", "m", "--api-key", SECRET])
  captured = capsys.readouterr()
  assert rc == 0
  lines = [json.loads(line) for line in captured.out.splitlines()]
  assert [r["text"] for r in lines] == ["a crowded stadium", "a blue sky"]
  assert all(r["score"] == 8 and r["level"] == 0 and r["method"] == "text_llm" for r in lines)
  assert lines[0]["id"] == score.text_id("a crowded stadium") != lines[1]["id"]
  assert sorted(r["messages"][0]["content"].count("a crowded stadium") for r in server.requests) == [0, 1]
  assert SECRET not in captured.out + captured.err


def test_cli_usage_errors(tmp_path, capsys):
  for argv, message in [
      (["--method", "caption_llm", "--vlm-model", "v"], "--llm-model"),
      (["--method", "caption_llm", "--llm-model", "m"], "--vlm-model"),
      (["--method", "jpeg", "--thresholds", "6,3"], "low <= high"),
      (["--method", "jpeg", "--thresholds", "1,2", "--budget-tokens", "300"], "not both"),
      (["--text", "a cat", "--method", "jpeg", "--llm-model", "m"], "--text"),
      ([], "--method is required"),
  ]:
    with pytest.raises(SystemExit) as e:
      score.main(argv + ["--out", str(tmp_path / "x.jsonl")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_caption_llm_cli_counts_answers_it_could_not_parse(chat_server, tmp_path, capsys):
  def respond(body, i):
    if body["model"] == "vlm":  # a caption, then perception "answers" with none of the three
      return Reply("A flat field of colour." if "Describe" in body["messages"][0]["content"][-1]["text"] else
                   "It is a picture.")
    return Reply("Score: 2\nReason: flat")

  server = chat_server(respond, max_requests=6)
  out = tmp_path / "llm.jsonl"
  rc = score.main(["--method", "caption_llm", "--limit", "2", "--split", "validation", "--vlm-model", "vlm",
                   "--llm-model", "llm", "--base-url", server.base_url, "--out", str(out), "--workers", "1",
                   "--no-progress", "--image-size", "64"])
  err = capsys.readouterr().err
  assert rc == 0 and "scored 2, failed 0" in err
  assert "2 scored without (all) perception answers" in err
  rows = read_lines(out)
  assert [r["answers"] for r in rows] == [None, None] and all("unparseable" in r["fallback"] for r in rows)
  assert all(r["score"] == 2 and r["level"] == 2 for r in rows)
  assert load_levels(out) == {r["id"]: 2 for r in rows}


def test_dry_run_prints_the_requests_and_sends_nothing(chat_server, tmp_path, capsys, monkeypatch):
  server = chat_server(lambda body, i: Reply("unused"), max_requests=0)
  monkeypatch.setenv("CAT_LLM_API_KEY", SECRET)
  out = tmp_path / "never.jsonl"
  rc = score.main(["--method", "caption_llm", "--split", "validation", "--vlm-model", "my-vlm", "--llm-model",
                   "my-llm", "--base-url", server.base_url, "--out", str(out), "--image-size", "64", "--dry-run"])
  printed = capsys.readouterr().out
  assert rc == 0 and server.requests == [] and not out.exists()
  assert SECRET not in printed and "Authorization: Bearer ***" in printed
  assert f"POST {server.base_url}/chat/completions" in printed
  assert "3 request(s) for item 'embedded/validation/000000'" in printed
  assert "request 1/3: caption (my-vlm)" in printed and "request 3/3: score (my-llm)" in printed
  # The exact prompts, and the image as a note of its size instead of 5,000 base64 characters.
  assert prompts.CAPTION_PROMPT in printed and prompts.PERCEPTION_PROMPT in printed
  assert "<caption from my-vlm>" in printed and "a 64x64 JPEG>" in printed and "/9j/" not in printed
  header = json.loads(printed.split("--- manifest header ---\n", 1)[1])
  assert header["endpoint"] == server.base_url and header["scorer"]["vlm_model"] == "my-vlm"
  assert header["scorer"]["prompts"]["perception"] == prompts.PERCEPTION_PROMPT

  rc = score.main(["--text", "a red ball", "--llm-model", "my-llm", "--base-url", server.base_url, "--dry-run"])
  printed = capsys.readouterr().out
  assert rc == 0 and prompts.text_only_prompt("a red ball") in printed and server.requests == []
  with pytest.raises(SystemExit) as e:
    score.main(["--method", "jpeg", "--dry-run"])
  assert e.value.code == 2 and "jpeg and mse send none" in capsys.readouterr().err


def test_dead_endpoint_gives_one_error(tmp_path, capsys):
  out = tmp_path / "llm.jsonl"
  rc = score.main(["--method", "caption_llm", "--limit", "6", "--use-dataset-captions", "--llm-model", "m",
                   "--base-url", dead_base_url(), "--max-retries", "1", "--workers", "3", "--no-progress",
                   "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 1
  assert err.count("error:") == 1 and "cannot reach" in err and "is the server running" in err
  assert read_lines(out) == []  # no image recorded as failed because of the endpoint


def test_missing_llm_extra_is_a_usage_error(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "openai", None)  # as if not installed
  with pytest.raises(SystemExit) as e:
    score.main(["--method", "caption_llm", "--llm-model", "m", "--use-dataset-captions", "--out",
                str(tmp_path / "x.jsonl")])
  assert e.value.code == 2 and "pip install 'cat_jax[llm]'" in capsys.readouterr().err


def test_jpeg_cli_writes_to_an_object_store(object_store, capsys):
  store = object_store
  out = "gs://bucket/scores/embedded.jsonl"
  rc = score.main(["--method", "jpeg", "--split", "validation", "--limit", "8", "--out", out, "--no-progress"])
  assert rc == 0 and f"manifest: {out}" in capsys.readouterr().err
  assert sorted(store.store) == [out[5:], out[5:] + ".thresholds.json"] and store.writes[out[5:]] == 1
  levels = load_levels(out)
  assert len(levels) == 8 and levels["embedded/validation/000000"] == 2 and levels["embedded/validation/000007"] == 0


def test_shards_partition_a_full_run(tmp_path, capsys):
  """--shard 0/2 and 1/2 score disjoint parts whose union is the full run (same ids, scores and levels); cat joins
  them into a manifest the one reader takes."""
  base = ["--method", "jpeg", "--split", "test", "--limit", "9", "--image-size", "64", "--thresholds", "1.5,3",
          "--no-progress"]
  assert score.main(base + ["--out", str(tmp_path / "full.jsonl")]) == 0
  parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
  for i, part in enumerate(parts):
    assert score.main(base + ["--shard", f"{i}/2", "--out", str(part)]) == 0
  full = {r["id"]: (r["score"], r["level"]) for r in read_lines(tmp_path / "full.jsonl")}
  shards = [{r["id"]: (r["score"], r["level"]) for r in read_lines(p)} for p in parts]
  assert len(full) == 9 and len(shards[0]) == 5 and len(shards[1]) == 4 and not set(shards[0]) & set(shards[1])
  assert shards[0] | shards[1] == full
  joined = tmp_path / "joined.jsonl"
  joined.write_text(parts[0].read_text() + parts[1].read_text())  # what `cat part*.jsonl` does
  assert load_levels(joined) == {i: level for i, (_, level) in full.items()}
  # A rerun of one shard resumes it; 'auto' reads the launcher's variables; quantile thresholds are refused.
  assert score.main(base + ["--shard", "1/2", "--out", str(parts[1])]) == 0
  assert "skipped (already in manifest) 4" in capsys.readouterr().err
  assert score.parse_shard("auto", {"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}) == (3, 8)
  assert score.parse_shard("auto", {"JAX_PROCESS_ID": "1", "JAX_NUM_PROCESSES": "2"}) == (1, 2)
  assert score.main(base[:-3] + ["--no-progress", "--shard", "0/2", "--out", str(tmp_path / "q.jsonl")]) == 2
  assert "needs fixed --thresholds" in capsys.readouterr().err
  for bad in ("2/2", "x/2", "3"):
    assert score.main(base + ["--shard", bad, "--out", str(tmp_path / "bad.jsonl")]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err
