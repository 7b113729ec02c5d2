"""Complexity scorers: JPEG bits per pixel, reconstruction MSE, and the caption + LLM score.

Every scorer has a ``method`` name, ``config()`` (what decides its scores, stored in the manifest header) and
``score(item) -> dict`` taking a data-source item (``{"id", "image", "caption"?}``) and returning at least
``{"score": ...}`` plus method-specific fields; it raises on failure (the runner records the failure). Higher
scores always mean more complex. The pixel scorers (JPEG, MSE) also score a batch at once, ``scores(images)``, of
images prepared once (``prepare_batch``: uint8 at the scoring size); ``score(item)`` is that batch of one.

Images are prepared the same way for every method (``prepare_image``): decoded to RGB, then, when
``image_size`` is set, resized so the shorter side is ``image_size`` and center-cropped to a square, i.e. the
image the tokenizer would see. Raw scores (bpp, MSE) then compare across a dataset of mixed sizes.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Protocol

import numpy as np
from PIL import Image

from cat_jax.complexity import prompts
from cat_jax.complexity.llm import ChatClient, MalformedResponse, user_message
from cat_jax.data.preprocess import DEFAULT_MIN_SIZE, open_checked, resize_and_crop

DEFAULT_JPEG_QUALITY = 75


class Scorer(Protocol):
  method: str

  def config(self) -> dict[str, Any]:
    ...

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    ...


def to_pil_rgb(image: Any, *, path: str = "<image>", draft_size: int | None = None) -> Image.Image:
  """An RGB PIL image from encoded bytes, a file path, a PIL image or an array (``cat_jax.data.preprocess``'s
  convention: uint8 [0, 255], floats [-1, 1]).

  Decoding is ``cat_jax.data.preprocess.open_checked`` (EXIF rotation, alpha on white, 16-bit and palette modes), so
  scorers see what training sees, and a file is usable here exactly when ``encode`` and training can use it (at least
  ``DEFAULT_MIN_SIZE`` pixels a side); images already in memory may be any size. Raises ``BadImageError`` naming
  ``path``.
  """
  min_size = 1
  if isinstance(image, (str, os.PathLike)):
    path = str(image)
    with open(image, "rb") as f:
      image = f.read()
  if isinstance(image, (bytes, bytearray, memoryview)):
    min_size = DEFAULT_MIN_SIZE
  return open_checked(image, path=path, min_size=min_size, draft_size=draft_size)


def prepare_image(image: Any, image_size: int | None, *, path: str = "<image>") -> Image.Image:
  """RGB image, shorter side resized to ``image_size`` and center-cropped square (unchanged if None/0).

  The same decode, resize and crop as the evaluation pipeline (``cat_jax.data.preprocess``).
  """
  im = to_pil_rgb(image, path=path, draft_size=image_size or None)
  if not image_size:
    return im
  return Image.fromarray(resize_and_crop(im, image_size))


def prepare_item(item: dict[str, Any], image_size: int | None) -> Image.Image:
  """``prepare_image`` of a source item (``{"id", "image", "path"?}``), naming it in errors."""
  return prepare_image(item["image"], image_size, path=str(item.get("path") or item.get("id", "<image>")))


def prepare_batch(images: Any, image_size: int | None) -> list[np.ndarray]:
  """Images (uint8 or [-1, 1] float HWC arrays, PIL images, paths) as uint8 (H, W, 3) at the scoring size, as
  ``prepare_image`` makes them; a uint8 RGB array already at that size is used as it is."""
  from cat_jax.data.preprocess import from_model_range

  out = []
  for k, x in enumerate(images):
    if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[-1] == 3 and x.dtype.kind == "f":
      x = from_model_range(x)  # the tokenizer's images, checked already
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[-1] == 3):
      x = np.asarray(to_pil_rgb(x, path=f"image {k}"))
    if image_size and x.shape[:2] != (image_size, image_size):
      x = resize_and_crop(Image.fromarray(x), image_size)
    out.append(x)
  return out


def jpeg_bpp(image: Image.Image, quality: int = DEFAULT_JPEG_QUALITY) -> float:
  """Bits per pixel of ``image`` saved as a baseline JPEG at ``quality`` with 4:2:0 chroma subsampling."""
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False)
  w, h = image.size
  return 8.0 * buf.tell() / (w * h)


class JpegScorer:
  """JPEG file size at a fixed quality, in bits per pixel (the paper's JPEG baseline)."""

  method = "jpeg"

  def __init__(self, *, quality: int = DEFAULT_JPEG_QUALITY, image_size: int | None = 256):
    self.quality = quality
    self.image_size = image_size

  def config(self) -> dict[str, Any]:
    return {"method": self.method, "quality": self.quality, "image_size": self.image_size}

  def scores(self, images: Any) -> list[float]:
    """Bits per pixel of each image (``prepare_batch``)."""
    return [jpeg_bpp(Image.fromarray(x), self.quality) for x in prepare_batch(images, self.image_size)]

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    return {"score": self.scores([np.asarray(prepare_item(item, self.image_size))])[0]}


def lowpass_reconstruct(images: np.ndarray, factor: int = 32) -> np.ndarray:
  """The cheap MSE proxy: area-downsample by ``factor`` then bicubic-upsample back (NHWC, any range).

  It keeps what a ``factor``-times smaller grid can hold, so its error measures the detail above that grid's
  Nyquist limit. It is not the error of a trained tokenizer (whose latent has many channels per position), but
  it ranks flat images below textured or text-heavy ones in the same way.
  """
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  small = (max(1, round(w / factor)), max(1, round(h / factor)))
  out = np.empty_like(images)
  for i in range(n):
    for ch in range(c):
      plane = Image.fromarray(images[i, :, :, ch], mode="F")
      plane = plane.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BICUBIC)
      out[i, :, :, ch] = np.asarray(plane)
  return out


ReconstructFn = Callable[[np.ndarray], np.ndarray]


class MseScorer:
  """Reconstruction MSE, with pixel values in [0, 1].

  ``reconstruct_fn`` takes a float32 NHWC batch in [-1, 1] (images of one size) and returns its reconstruction
  in the same range, e.g. a trained tokenizer's encode/decode at 32x. Without one, ``lowpass_reconstruct``
  (the documented proxy) is used.
  """

  method = "mse"

  def __init__(self, *, reconstruct_fn: ReconstructFn | None = None, image_size: int | None = 256,
               proxy_factor: int = 32):
    self.reconstruct_fn = reconstruct_fn
    self.image_size = image_size
    self.proxy_factor = proxy_factor

  @classmethod
  def of_tokenizer(cls, tok: Any, *, image_size: int | None = 256) -> "MseScorer":
    """The error of a trained tokenizer (a ``cat_jax.Tokenizer``) at its coarsest level, 32x."""
    from cat_jax.levels import NUM_LEVELS

    return cls(image_size=image_size, reconstruct_fn=lambda x: tok.reconstruct(x, NUM_LEVELS - 1, clip=True,
                                                                               value_range=(-1, 1)))

  def config(self) -> dict[str, Any]:
    measure = "reconstruct_fn" if self.reconstruct_fn is not None else f"lowpass proxy 1/{self.proxy_factor}"
    return {"method": self.method, "image_size": self.image_size, "reconstruction": measure}

  def scores(self, images: Any) -> list[float]:
    """The MSE of each image's reconstruction (``prepare_batch``; one ``reconstruct_fn`` call per image size)."""
    prepared = prepare_batch(images, self.image_size)
    by_shape: dict[tuple, list[int]] = {}
    for k, x in enumerate(prepared):
      by_shape.setdefault(x.shape, []).append(k)
    out = np.zeros(len(prepared))
    for ks in by_shape.values():
      x = np.stack([prepared[k] for k in ks]).astype(np.float32) / 127.5 - 1.0
      if self.reconstruct_fn is None:
        recon = lowpass_reconstruct(x, self.proxy_factor)
      else:
        recon = np.asarray(self.reconstruct_fn(x), np.float32)
        if recon.shape != x.shape:
          raise ValueError(f"reconstruct_fn returned shape {recon.shape}, expected {x.shape}")
      out[ks] = reconstruction_mse(x, recon)
    return out.tolist()

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    return {"score": self.scores([np.asarray(prepare_item(item, self.image_size))])[0]}


def reconstruction_mse(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """(N,) the MSE score of NHWC ``images`` in [-1, 1] against their reconstructions (clipped to [-1, 1]), on the
  [0, 1] pixel scale."""
  recon = np.clip(np.asarray(reconstructions, np.float32), -1.0, 1.0)
  # Halve the [-1, 1] difference so the MSE is on the [0, 1] pixel scale.
  return np.mean(((recon - np.asarray(images, np.float32)) / 2.0) ** 2, axis=(1, 2, 3)).astype(np.float64)


def _ask(client: ChatClient, model: str, message: dict[str, Any], parse: Callable[[str], Any],
         parse_retries: int, max_tokens: int) -> Any:
  """One chat request, asked again up to ``parse_retries`` times while the answer does not parse."""
  error: Exception | None = None
  for _ in range(parse_retries + 1):
    try:
      return parse(client.chat(model, [message], max_tokens=max_tokens))
    except (prompts.ParseError, MalformedResponse) as e:
      error = e
  raise prompts.ParseError(f"{model}: unparseable after {parse_retries + 1} answers; last: {error}")


def _answers_fallback(answers: dict[str, str], perception_reply: str) -> str | None:
  """What the manifest row records when perception answers are missing (None when all three were found)."""
  if not answers:
    return f"perception answers unparseable, scored from the caption alone: {perception_reply[:200]!r}"
  missing = [k for k in prompts.PERCEPTION_KEYS if k not in answers]
  return f"perception answers lack {missing}" if missing else None


class CaptionLLMScorer:
  """The paper's score: VLM caption + perception answers, then an LLM returns an integer 1-9 and a reason.

  With ``use_dataset_captions``, an item's own ``caption`` replaces the VLM step (no perception answers); items
  without one go through the VLM if ``vlm_model`` is set and fail otherwise. Perception answers are an aid: when
  the VLM's reply holds none (or only some) of them, the answers folded into its caption reply are used, and
  failing that the item is scored from the caption alone and its record carries a ``fallback`` note.
  """

  method = "caption_llm"

  def __init__(self, client: ChatClient, *, llm_model: str, vlm_model: str | None = None,
               use_dataset_captions: bool = False, image_size: int | None = 256, parse_retries: int = 2,
               max_tokens: int = 512):
    if vlm_model is None and not use_dataset_captions:
      raise ValueError("caption_llm needs a VLM model (--vlm-model) unless dataset captions are used "
                       "(--use-dataset-captions)")
    self.client = client
    self.llm_model = llm_model
    self.vlm_model = vlm_model
    self.use_dataset_captions = use_dataset_captions
    self.image_size = image_size
    self.parse_retries = parse_retries
    self.max_tokens = max_tokens

  def config(self) -> dict[str, Any]:
    """What decides this scorer's scores (models, prompts, image size), for the manifest header."""
    return {"method": self.method, "vlm_model": self.vlm_model, "llm_model": self.llm_model,
            "use_dataset_captions": self.use_dataset_captions, "image_size": self.image_size,
            "prompts": {"caption": prompts.CAPTION_PROMPT, "perception": prompts.PERCEPTION_PROMPT,
                        "score": prompts.SCORE_PROMPT.template}}

  def _needs_vlm(self, item: dict[str, Any]) -> bool:
    if self.use_dataset_captions and item.get("caption"):
      return False
    if self.vlm_model is None:
      raise ValueError("item has no dataset caption and no --vlm-model was given")
    return True

  def planned_requests(self, item: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(purpose, model, message)`` of every request ``score(item)`` sends, without sending any (``--dry-run``).

    The score request's caption and answers come from the VLM, so for VLM items they are placeholders here.
    """
    if not self._needs_vlm(item):
      return [("score", self.llm_model, user_message(prompts.score_prompt(item["caption"])))]
    im = prepare_item(item, self.image_size)
    placeholders = {k: f"<{k} answer from {self.vlm_model}>" for k in prompts.PERCEPTION_KEYS}
    return [("caption", self.vlm_model, user_message(prompts.CAPTION_PROMPT, [im])),
            ("perception", self.vlm_model, user_message(prompts.PERCEPTION_PROMPT, [im])),
            ("score", self.llm_model,
             user_message(prompts.score_prompt(f"<caption from {self.vlm_model}>", placeholders)))]

  def describe(self, item: dict[str, Any]) -> tuple[str, dict[str, str], str | None]:
    """(caption, perception answers found, fallback note or None) of one item's image, from the VLM."""
    assert self.vlm_model is not None
    im = prepare_item(item, self.image_size)
    caption = _ask(self.client, self.vlm_model, user_message(prompts.CAPTION_PROMPT, [im]),
                   prompts.parse_caption, self.parse_retries, self.max_tokens)
    try:
      reply = self.client.chat(self.vlm_model, [user_message(prompts.PERCEPTION_PROMPT, [im])],
                               max_tokens=self.max_tokens)
    except MalformedResponse as e:
      reply = f"<no answer: {e}>"
    answers = {**prompts.parse_perception(caption), **prompts.parse_perception(reply)}
    answers = {k: answers[k] for k in prompts.PERCEPTION_KEYS if k in answers}
    return caption, answers, _answers_fallback(answers, reply)

  def score_caption(self, caption: str, answers: dict[str, str] | None = None) -> tuple[int, str]:
    """(score, reason) for a caption and optional perception answers, from the LLM."""
    return _ask(self.client, self.llm_model, user_message(prompts.score_prompt(caption, answers)),
                prompts.parse_score, self.parse_retries, self.max_tokens)

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    caption, answers, fallback = item.get("caption"), None, None
    if self._needs_vlm(item):
      caption, answers, fallback = self.describe(item)
    score, reason = self.score_caption(caption, answers or None)
    result = {"score": score, "reason": reason, "caption": caption, "answers": answers or None}
    if fallback:
      result["fallback"] = fallback
    return result


class TextOnlyScorer:
  """Scores a text-to-image prompt with no image: the LLM rates the image the prompt describes."""

  method = "text_llm"

  def __init__(self, client: ChatClient, *, llm_model: str, parse_retries: int = 2, max_tokens: int = 512):
    self.client = client
    self.llm_model = llm_model
    self.parse_retries = parse_retries
    self.max_tokens = max_tokens

  def config(self) -> dict[str, Any]:
    """What decides this scorer's scores, for the manifest header."""
    return {"method": self.method, "llm_model": self.llm_model,
            "prompts": {"text_only": prompts.TEXT_ONLY_PROMPT.template}}

  def planned_requests(self, item: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(purpose, model, message)`` of the one request ``score(item)`` sends (``--dry-run``)."""
    return [("score", self.llm_model, user_message(prompts.text_only_prompt(item["text"])))]

  def score_text(self, prompt: str) -> dict[str, Any]:
    score, reason = _ask(self.client, self.llm_model, user_message(prompts.text_only_prompt(prompt)),
                         prompts.parse_score, self.parse_retries, self.max_tokens)
    return {"score": score, "reason": reason, "text": prompt}

  def score(self, item: dict[str, Any]) -> dict[str, Any]:
    return self.score_text(item["text"])
