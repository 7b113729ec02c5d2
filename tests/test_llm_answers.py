"""A recorded corpus of answer styles, written in the manner of common open VLMs and LLMs, with the parse each gives.

Perception answers are free text in any shape; a score is accepted in the forms ``prompts.parse_score`` lists and
rejected (asked again, then recorded as a failure) otherwise. The replies pass through ``llm.message_text``, as
real ones do.
"""

import pytest

from cat_jax.complexity import prompts
from cat_jax.complexity.llm import message_text

PERCEPTION_CORPUS = {
    "the three requested lines (Qwen2-VL)": (
        'FACES: no, there are no human faces\nTEXT: yes, a large red sign reading "SALE"\n'
        "DETAIL: medium, about six objects on a wooden table",
        {"faces": "no, there are no human faces", "text": 'yes, a large red sign reading "SALE"',
         "detail": "medium, about six objects on a wooden table"}),
    "one sentence, inline (the reply that failed every image)": (
        "The image shows a market stall. Faces: no. Text: yes, many small characters. Detail: very high.",
        {"faces": "no", "text": "yes, many small characters", "detail": "very high"}),
    "inline sentences with full answers (LLaVA-1.6)": (
        "Faces: No, there are no faces visible. Text: Yes, there is a small amount of text on the label. "
        "Detail: High, the image contains many objects with fine textures.",
        {"faces": "No, there are no faces visible", "text": "Yes, there is a small amount of text on the label",
         "detail": "High, the image contains many objects with fine textures"}),
    "markdown bullets with bold labels (InternVL)": (
        "- **Faces:** Yes, two large faces in the foreground.\n- **Text:** No visible text.\n"
        "- **Detail:** Low \u2013 a plain background with two people.",
        {"faces": "Yes, two large faces in the foreground", "text": "No visible text",
         "detail": "Low \u2013 a plain background with two people"}),
    "bold labels after a preamble (Llama-3.2-Vision)": (
        "Here are the answers:\n\n**FACES:** no, none\n**TEXT:** yes, a few words\n"
        "**DETAIL:** medium, about five objects",
        {"faces": "no, none", "text": "yes, a few words", "detail": "medium, about five objects"}),
    "markdown headings, answers below (Pixtral)": (
        '### Faces\nNone visible.\n\n### Text\nYes \u2014 a street sign ("Main St") and a shop banner.\n\n'
        "### Detail\nHigh: dozens of objects,\nfine brickwork texture.",
        {"faces": "None visible", "text": 'Yes \u2014 a street sign ("Main St") and a shop banner',
         "detail": "High: dozens of objects, fine brickwork texture"}),
    "lower case with dashes": (
        "faces - none\ntext - none\ndetail - low, a single flat blue region",
        {"faces": "none", "text": "none", "detail": "low, a single flat blue region"}),
    "upper-case one-word answers": (
        "FACES: YES.\nTEXT: NO.\nDETAIL: LOW.",
        {"faces": "YES", "text": "NO", "detail": "LOW"}),
    "numbered answers without labels (MiniCPM-V)": (
        "1. No.\n2. Yes, a few words at the bottom.\n3. Medium, around five objects.",
        {"faces": "No", "text": "Yes, a few words at the bottom", "detail": "Medium, around five objects"}),
    "fenced JSON (Gemma 3)": (
        '```json\n{"faces": "no", "text": "yes, a page of dense small print", "detail": "high"}\n```',
        {"faces": "no", "text": "yes, a page of dense small print", "detail": "high"}),
    "questions echoed (Phi-3.5-vision)": (
        "Are there faces? Yes, one small face in the window.\nIs there text? No.\n"
        "How much detail? Medium, a room with furniture.",
        {"faces": "Yes, one small face in the window", "text": "No", "detail": "Medium, a room with furniture"}),
    "a markdown table": (
        "| Question | Answer |\n|---|---|\n| Faces | Yes, a crowd of small faces |\n| Text | None |\n"
        "| Detail | Very high |",
        {"faces": "Yes, a crowd of small faces", "text": "None", "detail": "Very high"}),
    "reasoning block first (Qwen-QVQ)": (
        "<think>Let me look for faces. There are none. Text: the sign?</think>\nFACES: no\nTEXT: yes, one sign\n"
        "DETAIL: low",
        {"faces": "no", "text": "yes, one sign", "detail": "low"}),
    "answers that use the label words": (
        "FACES: yes, two faces - a man and a woman\nTEXT: yes, the sign text: OPEN\nDETAIL: high detail",
        {"faces": "yes, two faces - a man and a woman", "text": "yes, the sign text: OPEN",
         "detail": "high detail"}),
    "only two of three": ("FACES: no\nTEXT: no", {"faces": "no", "text": "no"}),
    "no answers at all": ("The image is a simple blue square.", {}),
    "prose that mentions the words without answering": (
        "There is a lot of fine detail in the image, and some text on the wall.", {}),
}


@pytest.mark.parametrize("reply, expected", PERCEPTION_CORPUS.values(), ids=PERCEPTION_CORPUS.keys())
def test_perception_corpus(reply, expected):
  assert prompts.parse_perception(message_text(reply)) == expected


SCORE_CORPUS = {
    "the requested JSON": ('{"score": 7, "reason": "dense small text"}', (7, "dense small text")),
    "fenced JSON after prose (Llama-3.1)": (
        'Here is my assessment:\n```json\n{"score": 2, "reason": "a clear sky"}\n```', (2, "a clear sky")),
    "score as a string (Mistral)": ('{"score": "4", "reason": "a room"}', (4, "a room")),
    "integral float": ('{"score": 9.0}', (9, "")),
    "capitalised keys": ('{"Score": 6, "Reason": "a street scene"}', (6, "a street scene")),
    "complexity key and explanation": ('{"complexity": 3, "explanation": "one object"}', (3, "one object")),
    "number word in JSON": ('{"score": "seven", "reason": "foliage"}', (7, "foliage")),
    "labelled lines": ("Score: 5\nReason: a street scene", (5, "a street scene")),
    "bold labelled lines (Gemma)": ("**Score:** 8\n**Reason:** many small faces in a crowd",
                                    (8, "many small faces in a crowd")),
    "fraction in prose": ("I would rate this image 7/9 because of the dense foliage.", (7, "")),
    "out of nine": ("Complexity: 6 out of 9.", (6, "")),
    "labelled fraction": ("Complexity score: 6/9 \u2013 moderate texture.", (6, "")),
    "number word": ("Complexity: seven", (7, "")),
    "rating": ("Rating: 4", (4, "")),
    "a bare number": ("3", (3, "")),
    "a bold bare number": ("**3**", (3, "")),
    "a bare number word": ("Seven.", (7, "")),
    "after a reasoning block (DeepSeek-R1 distill)": (
        '<think>Dense text, score 9? or 8...</think>\n{"score": 9, "reason": "a dense document"}',
        (9, "a dense document")),
}


@pytest.mark.parametrize("reply, expected", SCORE_CORPUS.values(), ids=SCORE_CORPUS.keys())
def test_score_corpus(reply, expected):
  assert prompts.parse_score(message_text(reply)) == expected


REJECTED_SCORES = {
    "fractional": ('{"score": 6.5, "reason": "between"}', "not an integer"),
    "fractional label": ("Score: 6.5", "not an integer"),
    "another scale": ("Score: 7/10", "out of 10"),
    "above the range": ('{"score": 10}', "outside"),
    "below the range": ('{"score": 0}', "outside"),
    "a boolean": ('{"score": true}', "not an integer"),
    "a refusal": ("I'm sorry, but I can't help with rating images.", "refused"),
    "two different scores": ("Score: 3. On reflection, final score: 5.", "conflicting"),
    "no number": ("I think it is fairly complex.", "no score"),
    "empty": ("", "no score"),
    "JSON without a score": ('{"reason": "no score"}', "no score"),
    "the scale, not a score": ("On a scale from 1 to 9, this is a busy image.", "no score"),
}


@pytest.mark.parametrize("reply, match", REJECTED_SCORES.values(), ids=REJECTED_SCORES.keys())
def test_rejected_scores(reply, match):
  with pytest.raises(prompts.ParseError, match=match):
    prompts.parse_score(message_text(reply))
