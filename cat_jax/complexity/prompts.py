"""Prompts of the caption + LLM complexity score, and strict parsers for the answers.

The pipeline follows CAT (arXiv 2501.03120): a vision-language model writes a detailed caption and answers
perception questions (faces? text? how much detail, how many objects?), then a text-only LLM reads them and
returns an integer complexity score from 1 (simple) to 9 (complex) with a short reason. The text-only variant
scores a text-to-image prompt, so a generator can pick the level before any image exists.
"""

from __future__ import annotations

import json
import re
import string
from typing import Any

MIN_SCORE = 1
MAX_SCORE = 9

CAPTION_PROMPT = (
    "Describe this image in detail in one paragraph: the main subjects and how many there are, their "
    "arrangement, the background, any visible text, and the colours and textures. Write only the description.")

# Keys of the perception answers, in the order the VLM is asked to write them.
PERCEPTION_KEYS = ("faces", "text", "detail")

PERCEPTION_PROMPT = (
    "Answer three questions about this image, one line each, in exactly this format:\n"
    "FACES: <yes or no>, <how many human faces and how large they are>\n"
    "TEXT: <yes or no>, <what text is visible, how much and how small>\n"
    "DETAIL: <low, medium or high>, <how many distinct objects and how much fine detail or texture>\n"
    "Write only these three lines.")

_RUBRIC = (
    "An image tokenizer compresses each image into 64, 256 or 1024 tokens; complex images need more tokens to be "
    "reconstructed faithfully. Rate the visual complexity on an integer scale from 1 to 9:\n"
    "1-3 simple: large flat or smooth regions, one or a few objects, no text, no faces "
    "(a clear sky, a plain product shot, a simple icon).\n"
    "4-6 medium: several objects, moderate texture, a few large faces or a little large text "
    "(a street scene, a portrait, a room).\n"
    "7-9 complex: many objects or fine textures, small or dense text, many or small faces "
    "(a document, a chart, a crowd, a dense market, foliage in detail).\n")

_ANSWER_FORMAT = ('Reply with only a JSON object: {"score": <integer from 1 to 9>, '
                  '"reason": "<one short sentence>"}')

# Templates use $caption / $answers / $prompt (string.Template): the JSON example holds braces.
SCORE_PROMPT = string.Template(_RUBRIC + "\nImage description:\n$caption\n$answers\n" + _ANSWER_FORMAT)

TEXT_ONLY_PROMPT = string.Template(
    "A text-to-image model will generate an image from the prompt below. " + _RUBRIC +
    "\nRate the image that the prompt describes.\nPrompt:\n$prompt\n\n" + _ANSWER_FORMAT)


class ParseError(ValueError):
  """A model answer that does not have the required form."""


def score_prompt(caption: str, answers: dict[str, str] | None = None) -> str:
  """The LLM prompt that turns a caption (and optional perception answers) into a score."""
  block = ""
  if answers:
    block = "\nPerception answers:\n" + "\n".join(f"{k.upper()}: {v}" for k, v in answers.items()) + "\n"
  return SCORE_PROMPT.substitute(caption=caption.strip(), answers=block)


def text_only_prompt(prompt: str) -> str:
  """The LLM prompt that scores a text-to-image prompt with no image."""
  return TEXT_ONLY_PROMPT.substitute(prompt=prompt.strip())


def parse_caption(text: str) -> str:
  """The caption, or ParseError when the VLM returned nothing usable."""
  caption = text.strip()
  if len(caption) < 3:
    raise ParseError(f"empty caption: {text!r}")
  return caption


_PERCEPTION_LINE = re.compile(r"^[\s*#>\-\d.)]*(faces|text|detail)\**\s*[:\-]\s*\**\s*(.+?)\s*$",
                              re.IGNORECASE | re.MULTILINE)


def parse_perception(text: str) -> dict[str, str]:
  """``{"faces": ..., "text": ..., "detail": ...}`` from the VLM's three lines; ParseError if any is missing."""
  answers: dict[str, str] = {}
  for m in _PERCEPTION_LINE.finditer(text):
    answers.setdefault(m.group(1).lower(), m.group(2))
  missing = [k for k in PERCEPTION_KEYS if k not in answers]
  if missing:
    raise ParseError(f"perception answers lack {missing}: {text[:200]!r}")
  return {k: answers[k] for k in PERCEPTION_KEYS}


def _as_score(value: Any) -> int:
  if isinstance(value, bool):
    raise ParseError(f"score {value!r} is not an integer")
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
    value = int(value)
  if not isinstance(value, int):
    raise ParseError(f"score {value!r} is not an integer")
  if not MIN_SCORE <= value <= MAX_SCORE:
    raise ParseError(f"score {value} is outside [{MIN_SCORE}, {MAX_SCORE}]")
  return value


_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)
_SCORE_LINE = re.compile(r"\bscore\b\W{0,3}[:=]\s*([^\s,;]+)", re.IGNORECASE)
_REASON_LINE = re.compile(r"\breason\b\W{0,3}[:=]\s*(.+)", re.IGNORECASE)


def parse_score(text: str) -> tuple[int, str]:
  """``(score, reason)`` from an LLM answer; ParseError unless it holds one integer score in 1..9.

  Accepts the requested JSON object (also inside code fences or surrounded by prose) and, as a fallback,
  ``Score: 7`` / ``Reason: ...`` lines. Never guesses: a non-integer, out-of-range or missing score raises.
  """
  for m in _JSON_OBJECT.finditer(text):
    try:
      obj = json.loads(m.group(0))
    except ValueError:
      continue
    if isinstance(obj, dict) and "score" in obj:
      return _as_score(obj["score"]), str(obj.get("reason", "")).strip()
  m = _SCORE_LINE.search(text)
  if m is None:
    raise ParseError(f"no score in answer: {text[:200]!r}")
  raw = m.group(1).strip("*\"'`")
  value: Any = raw
  if re.fullmatch(r"-?\d+\.\d+", raw):
    value = float(raw)
  reason = _REASON_LINE.search(text)
  return _as_score(value), (reason.group(1).strip().strip("\"'") if reason else "")
