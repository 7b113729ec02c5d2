"""Scores image complexity for CAT and maps scores to levels (8x / 16x / 32x).

Examples::

  python -m cat_jax.score --method jpeg                       # the embedded demo images
  python -m cat_jax.score --method jpeg --path ~/photos       # an image folder
  python -m cat_jax.score --method predictor --checkpoint demo   # the demo tokenizer's learned level predictor
  python -m cat_jax.score --method caption_llm --source tfds:coco_captions --split validation \\
      --base-url http://127.0.0.1:8000/v1 --llm-model meta-llama/Llama-3.1-8B-Instruct --use-dataset-captions
  python -m cat_jax.score --text "a page of a newspaper" --llm-model llama3.1   # text-only, no image
  python -m cat_jax.score --method caption_llm --vlm-model V --llm-model L --dry-run   # show the requests
  python -m cat_jax.score --method jpeg --source tfds:imagenet2012 --thresholds 1.2,2.4 --shard 3/8   # one of 8 parts
  cat scores/imagenet2012-train-jpeg.shard*of8.jsonl > scores/imagenet2012-train-jpeg.jsonl    # the full manifest

Writes a resumable manifest (a header with the scorer's models and prompts, then one JSON line per image; see
``cat_jax.complexity.manifest``) and ``<out>.thresholds.json``, locally or to any etils.epath path (gs://...).
Rerunning the same command resumes; ``--retry-failures`` rescores failed items. caption_llm and --text need the
openai client: pip install 'cat_jax[llm]'.
Exit status: 0 when every item of this run scored, 1 when some failed or the endpoint cannot be reached, 2 on
usage errors, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from typing import Any, Sequence

from etils import epath
from PIL import Image

from cat_jax import cli
from cat_jax import storage
from cat_jax.complexity import manifest as manifest_lib
from cat_jax.complexity import runner
from cat_jax.complexity import thresholds as thresholds_lib
from cat_jax.complexity import scorers
from cat_jax.complexity.llm import ChatClient, EndpointError, api_key_from_env, base_url_from_env, redact_url
from cat_jax.levels import NUM_LEVELS

METHODS = ("caption_llm", "jpeg", "mse", "predictor")


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.score", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", choices=METHODS, help="complexity measure (caption_llm is the paper's)")
  g = p.add_argument_group("data")
  g.add_argument("--source", help="'embedded' (demo images), 'folder' or 'tfds:<name>'; default: 'folder' when "
                 "--path is given, else 'embedded'")
  g.add_argument("--split", default="train")
  g.add_argument("--path", help="image folder (for --source folder)")
  g.add_argument("--captions-file", help="captions for an image folder (see cat_jax.data)")
  g.add_argument("--data-dir", help="TFDS data_dir (tfds:<name> sources)")
  g.add_argument("--image-key", help="TFDS image feature (default 'image')")
  g.add_argument("--caption-key", help="TFDS caption feature, for --use-dataset-captions")
  g.add_argument("--limit", type=int, help="score only the first N items")
  g.add_argument("--shard", help="I/N: score only items I, I+N, I+2N, ... (a disjoint part; the N manifests "
                 "joined with cat are the full one; each shard resumes on its own). 'auto': I and N from "
                 "SLURM_PROCID/SLURM_NTASKS or JAX_PROCESS_ID/JAX_NUM_PROCESSES. Needs --thresholds for jpeg/mse")
  cli.add_sizing_arguments(p)  # default: each image scored at its native size, as encode encodes it
  g = p.add_argument_group("output and levels")
  g.add_argument("--out", help="manifest path, local or gs://... (default scores/<source>-<split>-<method>.jsonl)")
  g.add_argument("--thresholds", type=_thresholds_arg, metavar="LOW,HIGH",
                 help="score <= LOW -> 32x, <= HIGH -> 16x, else 8x (default: 3,6 for caption_llm, the "
                 "dataset's terciles for jpeg/mse)")
  g.add_argument("--budget-tokens", type=float, help="pick thresholds for this mean token count per image")
  g.add_argument("--retry-failures", action="store_true", help="rescore items recorded as failures")
  g.add_argument("--workers", type=int, default=4, help="concurrent items (default 4)")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  g = p.add_argument_group("jpeg / mse / predictor")
  g.add_argument("--jpeg-quality", type=int, default=scorers.DEFAULT_JPEG_QUALITY)
  g.add_argument("--checkpoint", help="a tokenizer (training workdir, tokenizer folder or 'demo'): --method mse then "
                                      "measures its 32x reconstruction error; --method predictor uses its level "
                                      "predictor (or give a train_predictor workdir / predictor folder)")
  g.add_argument("--proxy-factor", type=int, default=32, help="downsampling factor of the MSE proxy")
  g = p.add_argument_group("caption_llm (OpenAI-compatible chat-completions endpoint)")
  g.add_argument("--base-url", help=f"endpoint root (env CAT_LLM_BASE_URL / OPENAI_BASE_URL, default "
                 f"{base_url_from_env()})")
  g.add_argument("--api-key", help="bearer token (prefer env CAT_LLM_API_KEY / OPENAI_API_KEY: a flag is visible "
                 "in the process list); local servers need none")
  g.add_argument("--vlm-model", help="vision-language model for captions and perception answers")
  g.add_argument("--llm-model", help="model that turns caption + answers into a 1-9 score")
  g.add_argument("--use-dataset-captions", action="store_true",
                 help="use the dataset's captions instead of the VLM (no perception answers)")
  g.add_argument("--text", action="append", metavar="PROMPT",
                 help="score a text-to-image prompt with no image (repeatable); prints JSON lines")
  g.add_argument("--timeout", type=float, default=60.0, help="seconds per request read (default 60)")
  g.add_argument("--max-retries", type=int, default=4,
                 help="retries, with backoff, on connection errors, timeouts, 408/409/429 (Retry-After honoured) "
                 "and 5xx")
  g.add_argument("--parse-retries", type=int, default=2,
                 help="asks again when a caption or score does not parse, is refused or is not a completion")
  g.add_argument("--max-tokens", type=int, default=512)
  g.add_argument("--dry-run", action="store_true",
                 help="print the exact requests (prompts, models, body) for one item and the manifest header, "
                 "send nothing")
  return p


def _thresholds_arg(text: str) -> tuple[float, float]:
  try:
    return thresholds_lib.parse_thresholds(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"expected LOW,HIGH numbers with LOW <= HIGH: {e}") from None


def _default_out(source: str, split: str, method: str, path: str | None,
                 shard: tuple[int, int] = (0, 1)) -> epath.Path:
  name = storage.as_path(path).expanduser().resolve().name if source == "folder" and path else source
  name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{name}-{split}")
  suffix = f".shard{shard[0]}of{shard[1]}" if shard[1] > 1 else ""
  return epath.Path("scores") / f"{name}-{method}{suffix}.jsonl"


def parse_shard(text: str | None, environ=os.environ) -> tuple[int, int]:
  """``--shard``: None -> (0, 1); ``"I/N"``; ``"auto"`` -> SLURM's or JAX's process index and count."""
  if text is None:
    return 0, 1
  if text == "auto":
    for index_key, count_key in (("SLURM_PROCID", "SLURM_NTASKS"), ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES")):
      if index_key in environ and count_key in environ:
        return parse_shard(f"{environ[index_key]}/{environ[count_key]}")
    raise ValueError("--shard auto needs SLURM_PROCID and SLURM_NTASKS, or JAX_PROCESS_ID and JAX_NUM_PROCESSES; "
                     "or give --shard I/N")
  index, sep, count = text.partition("/")
  if not sep or not index.strip().isdigit() or not count.strip().isdigit() or not 0 <= int(index) < int(count):
    raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8) or auto, got {text!r}")
  return int(index), int(count)


def _client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ChatClient:
  try:
    return ChatClient(base_url=args.base_url or base_url_from_env(), api_key=args.api_key or api_key_from_env(),
                      timeout=args.timeout, max_retries=args.max_retries, max_tokens=args.max_tokens)
  except ImportError as e:
    parser.exit(2, f"error: {e}\n")


def _llm_header(client: ChatClient) -> dict[str, Any]:
  """Manifest header notes of an LLM run: where it was scored (never the key)."""
  return {"endpoint": redact_url(client.base_url)}


class _MaxSide:
  """A scorer that sees every image resized to at most ``max_side`` on its longer side (``--max-side``)."""

  def __init__(self, scorer, max_side: int):
    from cat_jax.data.preprocess import Sizing

    self.inner, self.sizing = scorer, Sizing(max_side=max_side)
    self.method = scorer.method

  def config(self) -> dict[str, Any]:
    inner = self.inner.config() if hasattr(self.inner, "config") else {"method": self.method}
    return {**inner, "max_side": self.sizing.max_side}

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    from cat_jax.data.preprocess import open_checked

    image = open_checked(item["image"], path=str(item.get("path") or item.get("id", "<image>")))
    return self.inner.score({**item, "image": Image.fromarray(self.sizing.apply(image))})

  def __getattr__(self, name):  # client, planned_requests, ... of the scorer it wraps
    return getattr(self.inner, name)


def _make_scorer(args: argparse.Namespace, parser: argparse.ArgumentParser):
  scorer = _make_sized_scorer(args, parser)
  return _MaxSide(scorer, args.max_side) if args.max_side else scorer


def _make_sized_scorer(args: argparse.Namespace, parser: argparse.ArgumentParser):
  image_size = args.image_size  # None: native size
  if args.method == "jpeg":
    return scorers.JpegScorer(quality=args.jpeg_quality, image_size=image_size)
  if args.method == "mse":
    if args.checkpoint:  # the error of a trained tokenizer at its coarsest level (32x)
      from cat_jax.tokenizer import load_tokenizer
      try:
        tok = load_tokenizer(args.checkpoint)
      except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: --checkpoint: {e}\n")
      return scorers.MseScorer.of_tokenizer(tok, image_size=image_size)
    return scorers.MseScorer(image_size=image_size, proxy_factor=args.proxy_factor)
  if args.method == "predictor":
    try:
      from cat_jax.complexity.predictor import PredictorScorer  # imported late: jax is not needed otherwise
      return PredictorScorer(load_level_predictor(args.checkpoint or "demo"), image_size=image_size)
    except (FileNotFoundError, ValueError) as e:
      parser.exit(2, f"error: --checkpoint: {e}\n")
  if not args.llm_model:
    parser.error("--method caption_llm needs --llm-model")
  if not args.vlm_model and not args.use_dataset_captions:
    parser.error("--method caption_llm needs --vlm-model, or --use-dataset-captions")
  return scorers.CaptionLLMScorer(_client(args, parser), llm_model=args.llm_model, vlm_model=args.vlm_model,
                                  use_dataset_captions=args.use_dataset_captions, image_size=image_size,
                                  parse_retries=args.parse_retries, max_tokens=args.max_tokens)


def load_level_predictor(spec: str):
  """A level predictor: a tokenizer's (``demo``, a tokenizer folder), or a train_predictor workdir / its folder."""
  from cat_jax.complexity.predictor import LevelPredictor
  from cat_jax.tokenizer import PRETRAINED, PRETRAINED_DIR

  path = PRETRAINED_DIR / spec if spec in PRETRAINED else storage.as_path(spec)
  try:
    return LevelPredictor.load(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{spec} has no level predictor: give a tokenizer that ships one ('demo'), a "
                            "train_predictor workdir or its predictor/ folder") from None


def _describe_source(source, name: str, args: argparse.Namespace) -> str:
  """The data a run scores, in words (its first line): the folder's image count and sizes, or the source's."""
  if hasattr(source, "root") and hasattr(source, "ids"):  # a folder: sizes from the files' headers
    from cat_jax.data.preprocess import describe_sizes
    return f"{source.root}: " + describe_sizes([os.path.join(source.root, i) for i in source.ids()])
  return f"{name} ({args.split}): {len(source)} images"


def _folder_sizes(source, sizing) -> list[tuple[int, int]]:
  """The (height, width) each readable image of a folder will be encoded at (from the files' headers)."""
  sizes = []
  for image_id in source.ids():
    try:
      with open(os.path.join(source.root, image_id), "rb") as f:
        sizes.append(tuple(runner.image_sizes({"image": f.read()}, sizing)["encoded_size"]))
    except Exception:  # noqa: BLE001 (an unreadable file is recorded with its reason when it is scored)
      continue
  return sizes


def _check_budget(parser, budget: float, sizes, where: str) -> None:
  """Refuses a --budget-tokens no choice of levels reaches at the sizes the images are encoded at: outside [the
  fewest tokens of an image at 32x, the most of one at 8x] (a check before scoring; the exact range, over the images
  that score, is checked when the thresholds are chosen)."""
  if not sizes:
    return
  table = thresholds_lib.token_table(sizes, len(sizes))
  low, high = table[:, NUM_LEVELS - 1].min(), table[:, 0].max()
  if not low <= budget <= high:
    parser.error(f"--budget-tokens {budget:g} is outside [{low:g}, {high:g}], the mean token counts reachable at "
                 f"{where}")


def text_id(prompt: str) -> str:
  """Stable manifest id of a text prompt."""
  return "text-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def _run(args: argparse.Namespace, source, scorer, out: epath.Path) -> runner.RunSummary:
  client = getattr(scorer, "client", None)
  return runner.score_source(
      source, scorer, out, workers=args.workers, limit=args.limit, retry_failures=args.retry_failures,
      thresholds=args.thresholds, budget_tokens=args.budget_tokens, image_size=args.image_size or 256,
      sizing=cli.sizing(args), progress=not args.no_progress,
      header=_llm_header(client) if isinstance(client, ChatClient) else None, shard=parse_shard(args.shard))


def _abbreviate_images(value: Any) -> Any:
  """``value`` with every image data URL replaced by a note of its size (for printing request bodies)."""
  if isinstance(value, dict):
    return {k: _abbreviate_images(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_abbreviate_images(v) for v in value]
  if isinstance(value, str) and value.startswith("data:image/jpeg;base64,"):
    data = value.split(",", 1)[1]
    w, h = Image.open(io.BytesIO(base64.b64decode(data))).size
    return f"data:image/jpeg;base64,<{len(data)} base64 characters: a {w}x{h} JPEG>"
  return value


def dry_run_text(scorer, item: dict[str, Any], header: dict[str, Any]) -> str:
  """What ``--dry-run`` prints: the endpoint, every request ``scorer`` would send for ``item``, the header."""
  client: ChatClient = scorer.client
  key = ("Authorization: Bearer *** (the API key; never printed)" if client.api_key else
         "no API key (the openai client sends the placeholder 'EMPTY'; local servers accept it)")
  planned = scorer.planned_requests(item)
  lines = [f"dry run, nothing sent: {len(planned)} request(s) for item {item['id']!r}",
           f"POST {redact_url(client.url)}", key,
           f"timeout {client.timeout:g} s; up to {client.max_retries} retries with backoff on connection errors, "
           "timeouts, 408/409/429 (honouring Retry-After) and 5xx"]
  for k, (purpose, model, message) in enumerate(planned, 1):
    body = client.request_body(model, [message])
    content = message["content"]
    prompt = content if isinstance(content, str) else content[-1]["text"]
    lines += ["", f"--- request {k}/{len(planned)}: {purpose} ({model}) ---",
              json.dumps(_abbreviate_images(body), indent=2, ensure_ascii=False), "--- its prompt ---", prompt]
  lines += ["", "--- manifest header ---", json.dumps(header, indent=2, ensure_ascii=False)]
  return "\n".join(lines)


def _report(summary: runner.RunSummary, out: epath.Path | None) -> None:
  lines = [f"scored {summary.scored}, failed {summary.failed}, skipped (already in manifest) {summary.skipped}"]
  if summary.fallbacks:
    lines.append(f"{summary.fallbacks} scored without (all) perception answers: the VLM's answers could not be "
                 "parsed ('fallback' in their manifest rows)")
  counts = summary.level_counts
  if summary.thresholds is not None:
    lines.append(f"thresholds {summary.thresholds} ({summary.threshold_mode}); images at 8x/16x/32x: "
                 f"{counts[0]}/{counts[1]}/{counts[2]}; mean tokens {summary.mean_tokens:.1f} (at "
                 f"{summary.tokens_at})")
  elif counts is not None:  # a scorer that chose each image's level itself (the tokenizer's knob-free auto)
    lines.append("levels chosen per image by the scorer (the tokenizer's levels='auto'); images at 8x/16x/32x: "
                 f"{counts[0]}/{counts[1]}/{counts[2]}")
  if out is not None:
    lines.append(f"manifest: {out}")
  print("\n".join(lines), file=sys.stderr)


def _score_texts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  if args.method not in (None, "caption_llm"):
    parser.error("--text scores prompts with the LLM; it cannot be combined with --method " + args.method)
  if not args.llm_model:
    parser.error("--text needs --llm-model")
  scorer = scorers.TextOnlyScorer(_client(args, parser), llm_model=args.llm_model,
                                  parse_retries=args.parse_retries, max_tokens=args.max_tokens)
  items = [{"id": text_id(t), "text": t} for t in args.text]
  if args.dry_run:
    print(dry_run_text(scorer, items[0], runner.manifest_header(scorer, **_llm_header(scorer.client))))
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    out = storage.as_path(args.out) if args.out else storage.as_path(tmp) / "text.jsonl"
    args.no_progress = True
    summary = _run(args, items, scorer, out)
    latest = manifest_lib.read_manifest(out)
    for item in items:
      if item["id"] in latest:
        print(json.dumps(latest[item["id"]], ensure_ascii=False))
  _report(summary, storage.as_path(args.out) if args.out else None)
  return 1 if summary.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.thresholds is not None and args.budget_tokens is not None:
    parser.error("give --thresholds or --budget-tokens, not both")
  if args.workers < 1:
    parser.error("--workers must be >= 1")
  if args.budget_tokens is not None and args.image_size:
    _check_budget(parser, args.budget_tokens, [(args.image_size, args.image_size)], f"{args.image_size}x"
                  f"{args.image_size}")
  if args.dry_run and not args.text and args.method != "caption_llm":
    parser.error("--dry-run shows the requests of --method caption_llm or --text (jpeg and mse send none)")
  try:
    if args.text:
      return _score_texts(args, parser)
    if args.method is None:
      parser.error("--method is required (or --text for prompts)")
    scorer = _make_scorer(args, parser)
    source_name = args.source or ("folder" if args.path else "embedded")
    from cat_jax.data import get_source  # imported late: --text and --help need no data stack
    kwargs = {k: getattr(args, k) for k in ("path", "captions_file", "data_dir", "image_key", "caption_key")
              if getattr(args, k)}
    source = get_source(source_name, args.split, **kwargs)
    print(f"score: {_describe_source(source, source_name, args)}; {cli.sizing(args).describe()}; method "
          f"{args.method}", file=sys.stderr, flush=True)
    if args.budget_tokens is not None and not args.image_size and hasattr(source, "root"):
      _check_budget(parser, args.budget_tokens, _folder_sizes(source, cli.sizing(args)),
                    "these images' own sizes" + (f" (at most {args.max_side} a side)" if args.max_side else ""))
    if args.dry_run:
      header = runner.manifest_header(scorer, **_llm_header(scorer.client))
      print(dry_run_text(scorer, source[0], header))
      return 0
    out = (storage.as_path(args.out) if args.out else
           _default_out(source_name, args.split, args.method, args.path, parse_shard(args.shard)))
    summary = _run(args, source, scorer, out)
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  except (runner.TooManyFailures, EndpointError) as e:
    print(f"error: {e}\nfix the cause and rerun the same command to resume", file=sys.stderr)
    return 1
  except (manifest_lib.ManifestMismatch, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _report(summary, out)
  return 1 if summary.failed else 0


if __name__ == "__main__":
  sys.exit(main())
