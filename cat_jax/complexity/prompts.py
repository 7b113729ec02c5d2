"""Prompts of the caption + LLM complexity score, and parsers for the answers real models write.

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


# Label spellings of each perception answer, matched case-insensitively as whole words.
_PERCEPTION_LABELS = {
    "faces": ("faces", "face", "human faces", "people's faces"),
    "text": ("text", "visible text", "written text", "writing"),
    "detail": ("detail", "details", "level of detail", "amount of detail", "fine detail", "detail level"),
}
_LABEL_TO_KEY = {label: key for key, labels in _PERCEPTION_LABELS.items() for label in labels}
_MARKUP = r"[*_`\"'#]*"  # markdown emphasis, headings or JSON quotes around a label
_LABEL = _MARKUP + r"(?P<label>" + "|".join(sorted(map(re.escape, _LABEL_TO_KEY), key=len, reverse=True)) + \
    r")(?!\w)" + _MARKUP + r"[ \t]*(?:\([^)\n]{0,40}\)[ \t]*)?"  # "Faces (yes/no)"
# Where an answer can start: a line (after a bullet or number) or a sentence or JSON item; "the sign text: OPEN"
# or "two faces - a man and a woman" inside an answer are not labels.
_ANSWER_START = r"(?:^|[.;!,{(])[ \t]*(?:(?:[-*+>]+|\d+[.)])[ \t]+)?"
_PERCEPTION_LABELS_RE = [re.compile(pattern, re.IGNORECASE | re.MULTILINE) for pattern in (
    _ANSWER_START + _LABEL + r"(?:[:=]|[-\u2013\u2014](?=\s))" + _MARKUP + r"[ \t]*",  # "Faces: no", "- TEXT - no"
    r"(?<!\w)" + _LABEL + r"\?[ \t]*",  # "Are there faces? No"
    r"^[ \t]*\|[ \t]*" + _LABEL + r"\|[ \t]*",  # "| Faces | no |"
    r"^[ \t]*(?:[-*>#]+[ \t]*|\d[.)][ \t]*)?" + _LABEL + r"$",  # "### Faces" or "**Faces**", answered below
)]
_NUMBERED_ANSWER = re.compile(r"^[\s*_]*([1-3])[.)][*_]*\s+(.+?)\s*$", re.MULTILINE)
_EDGE_JUNK = re.compile(r"^[\s*_`#|{\[,;:.\-]+|[\s*_`#|}\],;:.]+$")


def _clean_answer(value: str) -> str:
  lines = [line for line in value.splitlines() if line.strip()]
  if not lines:
    return ""
  # The answer is the rest of the label's line; an empty one (a label alone on its line) takes what follows.
  value = lines[0] if value.strip() and value.lstrip(" \t")[:1] not in ("\n", "\r") else " ".join(lines)
  value = _EDGE_JUNK.sub("", " ".join(value.replace("**", "").replace("__", "").split()))
  if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":  # a JSON string
    value = value[1:-1]
  return value


def parse_perception(text: str) -> dict[str, str]:
  """The perception answers found in free text: ``{"faces": ..., "text": ..., "detail": ...}``, or fewer keys.

  Finds each answer by its label wherever it stands: one per line or several inline ("Faces: no. Text: yes.
  Detail: high."), in any case, inside markdown bullets, headings, bold or tables, as a question ("Faces? No") or
  in a JSON object. Without any label, a numbered list of exactly three answers is read in the asked order
  (faces, text, detail). The answer is the text up to the next label or the end of its line, markup stripped and
  otherwise verbatim ("Yes", "none visible"). Returns an empty dict when nothing is found: the answers are an aid
  to the score, never a requirement.
  """
  matches = sorted((m for regex in _PERCEPTION_LABELS_RE for m in regex.finditer(text)), key=lambda m: m.start())
  answers: dict[str, str] = {}
  for m, following in zip(matches, matches[1:] + [None]):
    end = following.start() if following is not None else len(text)
    value = _clean_answer(text[m.end():end])
    key = _LABEL_TO_KEY[m.group("label").lower()]
    if value and key not in answers:
      answers[key] = value
  if not answers:
    numbered = {int(n): _clean_answer(v) for n, v in _NUMBERED_ANSWER.findall(text)}
    if len(_NUMBERED_ANSWER.findall(text)) == len(PERCEPTION_KEYS) == len(numbered) and all(numbered.values()):
      answers = {key: numbered[i + 1] for i, key in enumerate(PERCEPTION_KEYS)}
  return {k: answers[k] for k in PERCEPTION_KEYS if k in answers}


_NUMBER_WORDS = {w: n for n, w in enumerate("one two three four five six seven eight nine".split(), 1)}
_NUMBER = r"(\d+(?:\.\d+)?|" + "|".join(_NUMBER_WORDS) + r")(?![\w.]\d|\w)"
_OUT_OF = r"\s*(?:/|out\s+of)\s*(\d+)"
_NOT_A_RANGE = r"(?!\s*(?:-|\u2013|to)\s*\d)"
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
_SCORE_KEYS = ("score", "complexity_score", "complexity", "rating")
_REASON_KEYS = ("reason", "reasoning", "explanation", "rationale")
_LABELLED_SCORE = re.compile(
    r"(?<!\w)(?:complexity\s+score|complexity|score|rating)(?!\w)[*_`\"'\s]*(?:[:=]|\bis\b|\bof\b)?[*_`\"'\s]*"
    + _NUMBER + r"(?:" + _OUT_OF + r")?" + _NOT_A_RANGE, re.IGNORECASE)
_FRACTION = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)" + _OUT_OF + r"(?![\w.]\d)", re.IGNORECASE)
_BARE = re.compile(r"^[\W_]*" + _NUMBER + r"[\W_]*$", re.IGNORECASE)
_REASON_LINE = re.compile(r"\b(?:reason|explanation|rationale)\b\W{0,3}[:=]\s*(.+)", re.IGNORECASE)
_REFUSAL = re.compile(r"\b(?:i'?m sorry|i am sorry|i can(?:not|'t|\u2019t)|i(?:'m| am) (?:not able|unable)|"
                      r"unable to (?:rate|help|assist|provide|comply)|as an ai\b)", re.IGNORECASE)


def _as_score(value: Any, scale: Any = None) -> int:
  """An integer score in [1, 9] from a JSON value or matched text; ParseError for anything else."""
  if isinstance(value, str):
    text = value.strip().strip("*_`\"'").strip().lower()
    fraction = re.fullmatch(r"(\d+(?:\.\d+)?)" + _OUT_OF, text)
    if fraction:
      text, scale = fraction.groups()
    if text in _NUMBER_WORDS:
      value = _NUMBER_WORDS[text]
    elif re.fullmatch(r"\d+", text):
      value = int(text)
    elif re.fullmatch(r"\d+\.\d+", text):
      value = float(text)
  if scale is not None and int(scale) != MAX_SCORE:
    raise ParseError(f"score {value!r} is out of {scale}, not on the {MIN_SCORE}-{MAX_SCORE} scale")
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ParseError(f"score {value!r} is not an integer")
  if not MIN_SCORE <= value <= MAX_SCORE:
    raise ParseError(f"score {value} is outside [{MIN_SCORE}, {MAX_SCORE}]")
  return value


def _one_score(matches: list[tuple[str, str]], text: str) -> int | None:
  """The score all ``(value, scale)`` matches agree on, None without matches, ParseError if they disagree."""
  scores = {_as_score(value, scale or None) for value, scale in matches}
  if len(scores) > 1:
    raise ParseError(f"conflicting scores {sorted(scores)} in answer: {text[:200]!r}")
  return scores.pop() if scores else None


def _json_score(text: str) -> tuple[int, str] | None:
  for m in _JSON_OBJECT.finditer(text):
    try:
      obj = json.loads(m.group(0))
    except ValueError:
      continue
    if not isinstance(obj, dict):
      continue
    fields = {str(k).strip().lower(): v for k, v in obj.items()}
    key = next((k for k in _SCORE_KEYS if k in fields), None)
    if key is not None:
      reason = next((fields[k] for k in _REASON_KEYS if k in fields), "")
      return _as_score(fields[key]), str(reason).strip()
  return None


def parse_score(text: str) -> tuple[int, str]:
  """``(score, reason)`` from an LLM answer; ParseError unless it holds one integer score in 1..9.

  Accepted, in this order: a JSON object with a ``score`` (or ``complexity``, ``complexity_score``, ``rating``)
  key, bare or in code fences or prose; a labelled score ("Score: 7", "**Complexity:** 7/9", "score of seven",
  "Rating = 7 out of 9"); a fraction of 9 anywhere ("I'd say 7/9"); an answer that is only a number ("7",
  "**Seven.**"). Values may be digits, an integral float ("7.0"), a number word one..nine or ``n/9``. Never
  guesses: a fractional score (6.5), another scale (7/10), a score outside 1..9, disagreeing labelled scores, a
  refusal or no score raise ParseError (the scorer asks again, then records a failure). The reason comes from
  the JSON object or a "Reason:" line, else is empty.
  """
  found = _json_score(text)
  if found is not None:
    return found
  score = _one_score([m.groups() for m in _LABELLED_SCORE.finditer(text)], text)
  if score is None:
    score = _one_score([m.groups() for m in _FRACTION.finditer(text)], text)
  if score is None and (bare := _BARE.match(text.strip())):
    score = _as_score(bare.group(1))
  if score is None:
    if _REFUSAL.search(text):
      raise ParseError(f"the model refused: {text[:200]!r}")
    raise ParseError(f"no score in answer: {text[:200]!r}")
  reason = _REASON_LINE.search(text)
  return score, (reason.group(1).strip().strip("\"'*").strip() if reason else "")
