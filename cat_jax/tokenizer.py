"""The CAT tokenizer: images -> per-image latents at 8x / 16x / 32x -> images.

  tok = cat_jax.Tokenizer.from_checkpoint("/path/to/workdir")          # EMA params, any device count
  latents = tok.encode(images, levels=1)                               # every image at 16x
  latents = tok.encode(images, levels="auto")                          # the tokenizer's knob-free choice
  latents = tok.encode(images, LevelAssigner(manifest="scores.jsonl"), ids=ids)   # from a score manifest
  latents = tok.encode(images, LevelAssigner(scorer=JpegScorer(), thresholds=(0.8, 2.0)))
  images = tok.decode(latents)                                         # same order as the input

Levels are indices (``cat_jax.levels``): 0 = 8x, 1 = 16x, 2 = 32x; every ``levels=`` argument also takes the factor
spelling (8 / 16 / 32, '8x' / '16x' / '32x'); every other way of choosing is a ``complexity.assign.LevelAssigner``
(``LevelAssigner(target_psnr=30)``, ``tok.auto_assigner(budget_tokens=N)``, ...). ``Latents.levels`` holds indices.
``Latents.values[i]`` is image i's own latent grid ``(H / f, W / f, C)`` (the posterior mean, or a sample with
``rng``), not the model's 8x canvas.

Inputs (``as_model_images``): a batch array (N, H, W, C), a list of images, one PIL image or one file path; each
image a PIL image, a path, or an array in the convention of ``cat_jax.data.preprocess``: uint8 [0, 255], uint16, or
floats (any float dtype) in ``value_range`` (default [-1, 1], with a warning once when every float image given is in
[0, 1]; an explicit ``value_range`` is trusted; values outside it, NaN and inf raise ``ValueError`` naming the
image); gray and RGBA are converted as ``preprocess`` does (RGBA on white). Any height and width >= 1: images are
padded at the bottom and right (edge pixels) to a multiple of 32, and decoded images are cropped back, so outputs
have their inputs' sizes.

Images of mixed levels and sizes are bucketed internally: each (level, padded shape) runs in batches of at most
``batch_size`` images and at most ``max_batch_pixels`` pixels (large images go one at a time: bounded memory), and
outputs come back in input order. Compiles stay bounded on folders of many sizes (``shape_buckets``, the default):
each side is computed at the next size of a short ladder (``bucket_side``: 32, 64, 96, 128, 192, 256, 384, 512, 768,
..., i.e. 32 * 2^k and 32 * 3 * 2^(k-1); at most 1.5x a side's multiple of 32, 2.25x the pixels in the worst case), edge
padded as above, and every batch of a shape has one size (the last one filled with zeros), so a batch of 3 after a
batch of 8 compiles nothing new. Latents are cropped back to the image's own grid (``ceil(side / 32) * 32 / f``
positions a side) and decoded images to the image. ``shape_buckets=False``: each multiple of 32 is its own shape and
a batch holds the images given (rounded up to the device count). Batches are
split over all local devices along the batch axis; parameters are replicated. Single process only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import levels as L
from cat_jax import parallel
from cat_jax.models.nested_vae import NestedVAE, abstract_params, build_model, crop_latent, pad_latent

ImagesLike = Any  # (N, H, W, C) array, a sequence of images (arrays, PIL images, paths), one PIL image or one path
# One compiled call holds at most this many pixels (the default: 8 images of 256 x 256); larger images go one by one.
MAX_BATCH_PIXELS = 8 * 256 * 256

PRETRAINED_DIR = pathlib.Path(__file__).parent / "pretrained"
PRETRAINED = ("demo",)  # shipped in the package (see cat_jax/pretrained/README.md)
_MODEL_FIELDS = tuple(f for f in NestedVAE.__dataclass_fields__ if f not in ("parent", "name", "dtype",
                                                                             "param_dtype"))


@dataclasses.dataclass
class Latents:
  """Per-image latents: ``values[i]`` has shape ``(H_i / f_i, W_i / f_i, C)``, ``f_i = FACTORS[levels[i]]``.

  ``code_only[i]`` (one bit per image, None = all False): image i's latent is the fixed DCT patch code the model
  starts from and decodes as that code alone, because the learned path reconstructed it worse (``Tokenizer``'s
  ``keep_code``; ``NestedVAE.encode_keeping_code``).

  ``missed_target[i]`` (None when levels came without a quality target): no level brought image i to the target
  asked for (``target_psnr``, a mean ``target_quality``), so it got the level closest to it."""

  values: list[np.ndarray]
  levels: np.ndarray
  image_sizes: list[tuple[int, int]] | None = None  # the encoded images' (H, W) when not a multiple of the factor
  code_only: np.ndarray | None = None
  missed_target: np.ndarray | None = None

  def __post_init__(self):
    self.levels = np.asarray(self.levels, np.int32).reshape(-1)
    if len(self.values) != len(self.levels):
      raise ValueError(f"{len(self.values)} latents but {len(self.levels)} levels")
    for lvl in np.unique(self.levels):
      L.check_level(int(lvl))
    if self.image_sizes is not None:
      self.image_sizes = [(int(h), int(w)) for h, w in self.image_sizes]
      if len(self.image_sizes) != len(self.values):
        raise ValueError(f"{len(self.values)} latents but {len(self.image_sizes)} image sizes")
    for name in ("code_only", "missed_target"):
      flags = getattr(self, name)
      if flags is not None:
        setattr(self, name, np.asarray(flags, bool).reshape(-1))
        if len(getattr(self, name)) != len(self.values):
          raise ValueError(f"{len(self.values)} latents but {len(getattr(self, name))} {name} flags")

  def save(self, path: str | os.PathLike) -> None:
    """One ``.npz`` file (local or ``gs://``) with every latent, its level, its image's size and its code bit."""
    import io

    from cat_jax import storage

    arrays = {f"latent_{i}": np.asarray(v, np.float32) for i, v in enumerate(self.values)}
    sizes = [self.image_hw(i) for i in range(len(self))]
    buf = io.BytesIO()
    flags = {} if self.missed_target is None else {"missed_target": self.missed_target}
    np.savez(buf, levels=self.levels, image_sizes=np.asarray(sizes, np.int64).reshape(-1, 2),
             code_only=self.code_only_flags(), **flags, **arrays)
    storage.write_bytes(path, buf.getvalue())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Latents":
    """What ``save`` wrote."""
    import io

    from cat_jax import storage

    with np.load(io.BytesIO(storage.as_path(path).read_bytes())) as npz:
      if "levels" not in npz or "image_sizes" not in npz:
        raise ValueError(f"{path} is not a file written by Latents.save")
      levels = npz["levels"]
      return cls([npz[f"latent_{i}"] for i in range(len(levels))], levels,
                 [tuple(hw) for hw in npz["image_sizes"].tolist()],
                 npz["code_only"] if "code_only" in npz else None,  # files written before the bit existed
                 npz["missed_target"] if "missed_target" in npz else None)

  def __len__(self) -> int:
    return len(self.values)

  def code_only_flags(self) -> np.ndarray:
    """``code_only`` as a bool array, all False when None."""
    return np.zeros(len(self), bool) if self.code_only is None else self.code_only

  @property
  def factors(self) -> np.ndarray:
    return np.array([L.FACTORS[int(lvl)] for lvl in self.levels], np.int32)

  @property
  def num_tokens(self) -> np.ndarray:
    """Latent positions of each image."""
    return np.array([v.shape[0] * v.shape[1] for v in self.values], np.int64)

  def image_hw(self, i: int) -> tuple[int, int]:
    """Image i's (H, W): the encoded image's size (the latent grid times the factor, less any padding)."""
    if self.image_sizes is not None:
      return self.image_sizes[i]
    f = L.FACTORS[int(self.levels[i])]
    return self.values[i].shape[0] * f, self.values[i].shape[1] * f


_warned_unit_range = False


def as_model_images(images: ImagesLike, *, value_range: tuple[float, float] | None = None,
                    warn_unit_range: bool = True) -> list[np.ndarray]:
  """The images as float32 (H, W, 3) arrays in [-1, 1] (see the module docstring for what is accepted).
  ``value_range`` None means [-1, 1] and warns once when every float image is in [0, 1]; given, it is trusted."""
  from PIL import Image

  from cat_jax.data.preprocess import image_to_model_range

  global _warned_unit_range
  if isinstance(images, (Image.Image, str, os.PathLike)):
    items = [images]
  elif isinstance(images, (np.ndarray, jax.Array)) or hasattr(images, "__array__"):
    arr = np.asarray(images)
    if arr.ndim != 4:
      raise ValueError(f"expected a batch (N, H, W, C) or a list of images, got an array of shape {arr.shape}; for "
                       "one image pass images[None] (or [image]), for a batch of gray images (N, H, W, 1)")
    items = list(arr)
  else:
    items = list(images)
  if not items:
    raise ValueError("no images given")
  explicit = value_range is not None
  value_range = tuple(value_range) if explicit else (-1.0, 1.0)
  out = [image_to_model_range(x, value_range=value_range, what=f"image {i}") for i, x in enumerate(items)]
  floats = [np.asarray(x) for x in items if isinstance(x, np.ndarray) and x.dtype.kind in "fV"]
  if (warn_unit_range and not explicit and floats and len(floats) == len(items)
      and not _warned_unit_range
      and all(float(np.min(x)) >= 0.0 for x in floats)):
    import warnings
    _warned_unit_range = True
    warnings.warn("every float image given is in [0, 1], but float images are read as [-1, 1]: if they are [0, 1] "
                  "images, pass value_range=(0, 1) (this warning is shown once)", stacklevel=3)
  return out


def bucket_side(side: int) -> int:
  """The side an image side of ``side`` pixels is computed at with shape buckets: the smallest of 32 * 2^k and
  32 * 3 * 2^(k-1) (32, 64, 96, 128, 192, 256, 384, 512, 768, ...) that holds it."""
  power = L.MAX_FACTOR
  while True:
    for bucket in (power, power * 3 // 2):
      if bucket % L.MAX_FACTOR == 0 and bucket >= side:
        return bucket
    power *= 2


def _pad_edge(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Bottom and right edge padding of an (H, W, C) array to ``hw``."""
  ph, pw = hw[0] - x.shape[0], hw[1] - x.shape[1]
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else x


def _pad_to_multiple(x: np.ndarray, multiple: int = L.MAX_FACTOR) -> np.ndarray:
  """Bottom and right edge padding of an (H, W, C) image to multiples of ``multiple``."""
  h, w = x.shape[:2]
  ph, pw = -h % multiple, -w % multiple
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="edge") if ph or pw else x


def _stack_like(items: list[np.ndarray]):
  """One array when every item has the same shape, else the list."""
  if items and all(x.shape == items[0].shape for x in items):
    return np.stack(items)
  return items


class Tokenizer:
  """Encodes images to CAT latents and decodes them back with one nested VAE.

  Args:
    model: the ``NestedVAE``.
    params: its parameters (placed replicated on ``mesh``).
    batch_size: at most this many images per compiled call (rounded up to a multiple of the device count; default
      8); a call holds as many as were given.
    max_batch_pixels: at most this many image pixels per compiled call (bounds memory: larger images go one at a
      time).
    mesh: a ``('data', 'fsdp')`` mesh; default every local device on 'data'.
    step: the checkpoint step the parameters come from (informational).
    config: the run's config (informational; ``from_checkpoint`` sets it).
    level_predictor: a ``cat_jax.complexity.predictor.LevelPredictor`` for knob-free ``levels="auto"`` (see
      ``set_level_predictor``; ``from_pretrained`` loads the one a folder ships).
    auto_levels: the knob-free ``levels="auto"`` (``complexity.assign.AutoLevels``; default: ``config``'s
      ``auto_levels``); ``save_pretrained`` writes it into ``config.json``.
    keep_code: per image, keep the fixed DCT patch code the model starts from when the learned path reconstructs
      the image worse (one bit per image, ``Latents.code_only``; ``NestedVAE.encode_keeping_code``). Default: on for
      models with shortcuts (the only ones with a patch code). It costs ``encode`` one decode.
    shape_buckets: pad sizes to a short ladder of shapes and fill every batch (bounded compiles on folders of many
      sizes; see the module docstring), or compute each multiple of 32 as its own shape with the images given.
  """

  def __init__(self, model: NestedVAE, params: Any, *, batch_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None, step: int | None = None, config: Any = None,
               max_batch_pixels: int = MAX_BATCH_PIXELS, level_predictor: Any = None,
               keep_code: bool | None = None, shape_buckets: bool = True, auto_levels: Any = None):
    from cat_jax.complexity.assign import AutoLevels

    self.model = model
    self.shape_buckets = bool(shape_buckets)
    self.keep_code = bool(model.shortcuts)  # the default, then the argument (checked)
    self.keep_code = self._keep_code(keep_code)
    self.level_predictor = level_predictor
    self.max_batch_pixels = int(max_batch_pixels)
    self.mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1, "fsdp": 1}, jax.local_devices())
    n = self.mesh.size
    batch_size = 8 if batch_size is None else int(batch_size)
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.batch_size = n * math.ceil(batch_size / n)
    self._replicated = parallel.replicated(self.mesh)
    self._batch_sharding = parallel.batch_sharding(self.mesh)
    self.params = jax.device_put(params, self._replicated)
    self.step = step
    self.config = config
    saved = config.get("auto_levels") if auto_levels is None and hasattr(config, "get") else None
    self.auto_levels: AutoLevels | None = AutoLevels.from_dict(saved) if saved is not None else auto_levels
    self._encode_fn = jax.jit(functools.partial(_encode, model=model),
                              static_argnames=("level", "sample", "keep_code"), out_shardings=self._batch_sharding)
    self._decode_fn = jax.jit(functools.partial(_decode, model=model), static_argnames=("level",),
                              out_shardings=self._batch_sharding)
    self._reconstruct_fn = jax.jit(functools.partial(_reconstruct, model=model),
                                   static_argnames=("level", "keep_code"), out_shardings=self._batch_sharding)

  # -- construction ------------------------------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, *, step: int | None = None, use_ema: bool = True,
                      batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
                      config: Any = None) -> "Tokenizer":
    """Loads a training workdir (or a step directory inside it): its ``config.json`` and EMA parameters.

    Args:
      path: the ``--workdir`` of ``python -m cat_jax.train``, or ``<workdir>/checkpoints/<step>``.
      step: which checkpoint (default: the latest, or the one ``path`` names).
      use_ema: EMA parameters (default) or the raw training parameters.
      config: a config to check against the checkpoint's (raises ValueError naming mismatched keys).

    Raises:
      FileNotFoundError: no workdir, no config.json or no finished checkpoint at ``path``.
    """
    from cat_jax import checkpoint as ckpt
    from cat_jax import storage

    p = storage.as_path(path)
    if not p.exists():
      raise FileNotFoundError(f"checkpoint path {p} does not exist; pass the --workdir of a training run")
    workdir = p
    if p.parent.name == "checkpoints" and p.name.isdigit():  # <workdir>/checkpoints/<step>
      workdir, step = p.parent.parent, int(p.name) if step is None else step
    elif p.name == "checkpoints":
      workdir = p.parent
    saved = ckpt.load_config(os.fspath(workdir))
    if config is not None:
      ckpt.check_compatible(saved, config)
    model = build_model(saved.model)
    mesh = mesh if mesh is not None else parallel.make_mesh({"data": -1, "fsdp": 1}, jax.local_devices())
    abstract = abstract_params(model)
    rep = parallel.replicated(mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    params, restored_step = ckpt.restore_inference_params(os.fspath(workdir), abstract, step=step, use_ema=use_ema)
    return cls(model, params, batch_size=batch_size, mesh=mesh, step=restored_step, config=saved)

  @classmethod
  def from_pretrained(cls, name_or_path: str | os.PathLike = "demo", *, batch_size: int | None = None,
                      mesh: jax.sharding.Mesh | None = None) -> "Tokenizer":
    """Loads a weight folder (``cat_jax.weights``): ``"demo"`` (the small tokenizer shipped in the package) or a
    directory written by ``save_pretrained`` or a converter (``config.json`` + ``model.safetensors``, or a legacy
    ``params.msgpack``). Nothing is downloaded.

    Raises:
      FileNotFoundError: no such name or directory, or one without both files.
      ValueError: the weights do not match the model ``config.json`` describes.
    """
    import ml_collections

    from cat_jax import weights

    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
      path = PRETRAINED_DIR / name_or_path
    if not weights.is_folder(path):
      raise FileNotFoundError(
          f"{name_or_path!r} is neither a shipped tokenizer {sorted(PRETRAINED)} nor a directory holding "
          f"{weights.CONFIG} and {weights.MODEL}; write one with Tokenizer.from_checkpoint(workdir)"
          ".save_pretrained(dir)")
    config = ml_collections.ConfigDict(weights.read_config(path))
    model = build_model(config.model)
    params = weights.read_params(path)
    check_params_match(model, params, f"{path}")
    tok = cls(model, jax.tree.map(jnp.asarray, params), batch_size=batch_size, mesh=mesh, step=config.get("step"),
              config=config)
    if tok.auto_levels is not None and tok.auto_levels.scorer == "predictor":
      from cat_jax.complexity.predictor import LevelPredictor
      tok.level_predictor = LevelPredictor.load(path)
    return tok

  def export_config(self) -> dict[str, Any]:
    """The run's config as a dict, with the model's actual fields and the step (what ``config.json`` holds)."""
    config = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(self.config or {})
    config["model"] = {k: getattr(self.model, k) for k in _MODEL_FIELDS}
    config["model"].update(dtype=jnp.dtype(self.model.dtype).name, param_dtype=jnp.dtype(self.model.param_dtype).name)
    config["step"] = self.step
    config.pop("auto_levels", None)
    if self.auto_levels is not None:
      config["auto_levels"] = self.auto_levels.to_dict()
    return config

  def save_pretrained(self, path: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (these parameters) for ``from_pretrained``, and the level
    predictor's ``predictor.json`` + ``predictor.safetensors`` when it has one.

    For a release that fine-tunes with its GAN state (raw generator + discriminator), use
    ``python -m cat_jax.convert release --src WORKDIR --out DIR``.
    """
    from cat_jax import weights

    if self.level_predictor is not None:
      self.level_predictor.save(path)
    weights.write_folder(path, self.export_config(), jax.device_get(self.params))

  def with_params(self, params: Any) -> "Tokenizer":
    """The same tokenizer with other parameters (e.g. raw vs EMA)."""
    return Tokenizer(self.model, params, batch_size=self.batch_size, mesh=self.mesh, step=self.step,
                     config=self.config, max_batch_pixels=self.max_batch_pixels,
                     level_predictor=self.level_predictor, keep_code=self.keep_code, shape_buckets=self.shape_buckets,
                     auto_levels=self.auto_levels)

  @property
  def image_size(self) -> int | None:
    """The training image size of the checkpoint's config, if known."""
    try:
      return int(self.config.data.image_size)
    except (AttributeError, TypeError, KeyError):
      return None

  @property
  def latent_scaling(self) -> dict[str, Any] | None:
    """``{"scale": s, "shift": b}`` of a converted Stable Diffusion VAE (``config.json``'s ``latent_scaling``), else
    None. ``encode``/``decode`` never apply it: a downstream diffusion model trains on ``(z - b) * s`` and its
    samples go back through ``decode`` as ``z = z_model / s + b`` (diffusers' convention; see docs/sd_vae.md)."""
    scaling = self.config.get("latent_scaling") if hasattr(self.config, "get") else None
    if scaling is None:
      return None
    return scaling.to_dict() if hasattr(scaling, "to_dict") else dict(scaling)

  def calibrate_auto_levels(self, images: ImagesLike, *, image_size: int | None = None,
                            budget_tokens: float | None = None):
    """Sets (and returns) ``auto_levels`` from ``images``, a sample of what it will tokenize: thresholds on the level
    predictor's scores (JPEG bits per pixel without one) at ``image_size`` (default the predictor's, else the
    training size) such that they average ``budget_tokens`` (default: fixed 16x). ``save_pretrained`` keeps it."""
    from cat_jax.complexity.assign import calibrate_auto_levels

    size = image_size or (self.level_predictor.image_size if self.level_predictor is not None else self.image_size)
    if not size:
      raise ValueError("pass image_size= (the tokenizer's config has no data.image_size)")
    self.auto_levels = calibrate_auto_levels(as_model_images(images), image_size=size, budget_tokens=budget_tokens,
                                             predictor=self.level_predictor)
    return self.auto_levels

  def set_level_predictor(self, predictor: Any, images: ImagesLike | None = None, *,
                          budget_tokens: float | None = None):
    """Makes ``predictor`` (a ``LevelPredictor``, or its folder) this tokenizer's knob-free ``levels="auto"``: a
    quality predictor's price rule (``assign.price_auto_levels``), or a score predictor's own calibrated thresholds
    (or thresholds calibrated on ``images`` at ``budget_tokens``). Returns the new ``auto_levels``;
    ``save_pretrained`` writes the predictor beside the model."""
    from cat_jax.complexity.assign import predictor_auto_levels, price_auto_levels
    from cat_jax.complexity.predictor import LevelPredictor

    if not isinstance(predictor, LevelPredictor):
      predictor = LevelPredictor.load(predictor)
    self.level_predictor = predictor
    if predictor.qualities is None and images is not None:
      return self.calibrate_auto_levels(images, budget_tokens=budget_tokens)
    self.auto_levels = price_auto_levels(predictor) if predictor.qualities is not None else \
        predictor_auto_levels(predictor)
    return self.auto_levels

  # -- levels ------------------------------------------------------------------------------------------------------
  def quality_table(self, images: ImagesLike, measures: Sequence[str] = ("haarpsi",), *, predicted: bool = False,
                    value_range: tuple[float, float] | None = None) -> dict[str, np.ndarray]:
    """{measure: (N, 3)} each image's quality at 8x / 16x / 32x at its own size, higher is better (GMSD negated):
    measured on this tokenizer's reconstructions (``assign.quality_table``: three reconstructions per image), or
    ``predicted`` by its quality predictor (about a tenth of an encode)."""
    items = as_model_images(images, value_range=value_range, warn_unit_range=False)
    if not predicted:
      from cat_jax.complexity.assign import quality_table
      return quality_table(items, lambda x, level: self.reconstruct(x, level), measures)
    predictor = self.level_predictor
    if predictor is None or predictor.qualities is None:
      raise ValueError("predicted qualities need a quality predictor (Tokenizer.set_level_predictor; python -m "
                       "cat_jax.train_predictor --config.teacher=quality:TOKENIZER); or pass predicted=False")
    table = predictor.predict_quality(items)
    missing = [m for m in measures if m not in table]
    if missing:
      raise ValueError(f"the quality predictor predicts {sorted(table)}, not {missing}")
    return {m: table[m] for m in measures}

  def choose_levels(self, images: ImagesLike, *, measure: str | None = None, budget_tokens: float | None = None,
                    target_quality: float | None = None, price: float | None = None, exact: bool = False,
                    value_range: tuple[float, float] | None = None):
    """Levels by what more tokens buy each image (``complexity.allocation``), as an ``assign.Assignment``: the best
    mean ``measure`` within ``budget_tokens`` mean tokens (at the images' own sizes), the fewest tokens for a mean
    ``target_quality``, or per image at ``price`` (quality per token per 256x256 pixels); none of them: the knob-free
    price this tokenizer ships. Qualities are predicted by the level predictor, or with ``exact`` measured on the
    reconstructions (the ceiling any choice can reach). ``measure``: default the predictor's first (HaarPSI for the
    shipped demo)."""
    from cat_jax.complexity.assign import LevelAssigner

    items = as_model_images(images, value_range=value_range, warn_unit_range=False)
    auto = self.auto_levels if self.auto_levels is not None and self.auto_levels.rule == "price" else None
    measure = measure or (auto.measure if auto is not None else "haarpsi")
    if budget_tokens is None and target_quality is None and price is None:
      if auto is None:
        raise ValueError("give budget_tokens=, target_quality= or price=: this tokenizer ships no price")
      price = auto.price
    assign = LevelAssigner(qualities=lambda x: self.quality_table(x, (measure,), predicted=not exact), measure=measure,
                           price=price, budget_tokens=budget_tokens, target_quality=target_quality)
    return assign.assign([str(k) for k in range(len(items))], items)

  def auto_assigner(self, *, budget_tokens: float | None = None, thresholds: Sequence[float] | None = None):
    """The ``LevelAssigner`` of this tokenizer's knob-free ``levels="auto"`` (``auto_levels``: with a quality
    predictor, each image the level its predicted qualities earn at a saved price per token, alone or in any batch).
    ``budget_tokens``: instead the best predicted quality within that many mean tokens at the images' own sizes (a
    threshold rule: thresholds for that budget over the images given); ``thresholds``: a threshold rule's own."""
    from cat_jax.complexity.assign import auto_assigner

    if self.auto_levels is None:
      raise ValueError("this tokenizer has no knob-free levels='auto' (no level predictor or calibrated JPEG "
                       "thresholds): pass levels=<8x|16x|32x> or a LevelAssigner (a manifest with ids=, a scorer, "
                       "target_psnr=), or calibrate one with tok.calibrate_auto_levels(images)")
    return auto_assigner(self.auto_levels, predictor=self.level_predictor, thresholds=thresholds,
                         budget_tokens=budget_tokens)

  def assign_levels(self, images: ImagesLike, levels: Any = None, *, ids: Sequence[str] | None = None,
                    **removed) -> np.ndarray:
    """Level index of every image: one level for all, one per image, ``"auto"`` (the default: ``auto_assigner()``)
    or a ``complexity.assign.LevelAssigner`` (a manifest's levels, with ``ids`` naming the images; a scorer and
    thresholds; ``target_psnr``; levels by what tokens buy). A level is an index 0 / 1 / 2 or a factor 8 / 16 / 32 /
    '8x' / '16x' / '32x' (``cat_jax.levels.parse_level``)."""
    _reject_moved(removed)
    return self._assign(as_model_images(images, warn_unit_range=False), levels, ids=ids).levels

  def _assign(self, items: list[np.ndarray], levels: Any = None, *, ids=None):
    from cat_jax.complexity.assign import Assignment, LevelAssigner

    n = len(items)
    if levels is None or (isinstance(levels, str) and levels.strip().lower() == "auto"):
      levels = self.auto_assigner()
    if isinstance(levels, LevelAssigner):
      if ids is not None and len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} images")
      if levels.manifest is not None and ids is None:
        raise ValueError(f"levels from a manifest need ids= with one id per image ({n})")
      names = [str(i) for i in ids] if ids is not None else [str(k) for k in range(n)]
      return levels.assign(names, items, reconstruct=lambda x, level: self.reconstruct(x, level))
    if isinstance(levels, (str, int, np.integer)):
      return Assignment(np.full(n, L.parse_level(levels), np.int32))
    arr = np.asarray(levels)
    if arr.shape != (n,):
      raise ValueError(f"expected one level per image ({n}), got shape {arr.shape}")
    return Assignment(np.array([L.parse_level(lvl) for lvl in arr.tolist()], np.int32))

  # -- encode / decode ---------------------------------------------------------------------------------------------
  def encode(self, images: ImagesLike, levels: Any = None, *, ids: Sequence[str] | None = None,
             rng: jax.Array | None = None, value_range: tuple[float, float] | None = None,
             keep_code: bool | None = None, **removed) -> Latents:
    """Latents of ``images`` (see the module docstring for what is accepted) at their levels, in input order.

    ``levels``: a level for all, one level per image, ``"auto"`` / None or a ``LevelAssigner`` (see
    ``assign_levels``; ``ids`` name the images for a manifest). ``rng``: sample the posterior instead of taking its
    mean. ``value_range``: the range of float images.
    ``keep_code``: override the tokenizer's (False: every latent is the encoder's, as a generative model trained on
    them will produce).
    """
    _reject_moved(removed)
    keep_code = self._keep_code(keep_code)
    items = as_model_images(images, value_range=value_range)
    assignment = self._assign(items, levels, ids=ids)
    level_arr = assignment.levels
    _warn_missed(assignment, len(items))
    sizes = [x.shape[:2] for x in items]
    items = [_pad_to_multiple(x) for x in items]
    out: list[np.ndarray | None] = [None] * len(items)
    code_only = np.zeros(len(items), bool)
    for b, (level, idx, batch) in enumerate(self._buckets(items, level_arr)):
      key = None if rng is None else jax.random.fold_in(rng, b)
      z, kept = jax.device_get(self._encode_fn(self.params, self._put(batch), level=level, sample=key is not None,
                                               keep_code=keep_code, valid=self._real_sizes(batch, sizes, idx),
                                               rng=key if key is not None else jax.random.key(0)))
      f = L.FACTORS[level]
      for slot, i in enumerate(idx):  # the image's own grid (its bucket may be larger)
        out[i] = np.asarray(z[slot, :items[i].shape[0] // f, :items[i].shape[1] // f])
        code_only[i] = kept[slot]
    padded = any(x.shape[:2] != hw for x, hw in zip(items, sizes))
    return Latents(values=out, levels=level_arr, image_sizes=sizes if padded else None,
                   code_only=code_only if keep_code else None, missed_target=assignment.missed_target)

  def decode(self, latents: Latents, *, clip: bool = True):
    """Images (float32 in [-1, 1], input order): one (N, H, W, 3) array if all sizes agree, else a list."""
    if not isinstance(latents, Latents):
      raise TypeError(f"decode expects the Latents returned by encode, got {type(latents).__name__}")
    out: list[np.ndarray | None] = [None] * len(latents)
    flags = latents.code_only_flags()
    if flags.any() and not self.model.shortcuts:
      raise ValueError("these latents keep the DCT patch code for some images (code_only), but this model has no "
                       "patch code (shortcuts=False): decode them with the tokenizer that encoded them")
    for level, idx, batch in self._buckets(list(latents.values), latents.levels, latents=True):
      if batch.shape[-1] != self.model.z_channels:
        raise ValueError(f"latents have {batch.shape[-1]} channels, the model has {self.model.z_channels}")
      code_only = np.zeros(batch.shape[0], bool)
      code_only[:len(idx)] = flags[idx]
      x = np.asarray(self._decode_fn(self.params, self._put(batch), self._put(code_only), level=level))
      for slot, i in enumerate(idx):
        h, w = latents.image_hw(i)
        out[i] = np.clip(x[slot, :h, :w], -1.0, 1.0) if clip else x[slot, :h, :w]
    return _stack_like(out)

  def reconstruct(self, images: ImagesLike, levels: Any = None, *, clip: bool = True,
                  value_range: tuple[float, float] | None = None, keep_code: bool | None = None,
                  ids: Sequence[str] | None = None, **removed):
    """``decode(encode(images, levels))`` in one compiled call per bucket (posterior mean); each output has its
    input's size."""
    _reject_moved(removed)
    keep_code = self._keep_code(keep_code)
    items = as_model_images(images, value_range=value_range)
    assignment = self._assign(items, levels, ids=ids)
    level_arr = assignment.levels
    _warn_missed(assignment, len(items))
    sizes = [x.shape[:2] for x in items]
    items = [_pad_to_multiple(x) for x in items]
    out: list[np.ndarray | None] = [None] * len(items)
    for level, idx, batch in self._buckets(items, level_arr):
      x = np.asarray(self._reconstruct_fn(self.params, self._put(batch), level=level, keep_code=keep_code,
                                          valid=self._real_sizes(batch, sizes, idx))[0])
      for slot, i in enumerate(idx):
        h, w = sizes[i]
        out[i] = np.clip(x[slot, :h, :w], -1.0, 1.0) if clip else x[slot, :h, :w]
    return _stack_like(out)

  def reconstruct_batch(self, images: jax.Array | np.ndarray, level: int, *, keep_code: bool | None = None,
                        with_code_only: bool = False):
    """Raw (unclipped) reconstructions of one batch of exactly ``batch_size`` images at one level; with
    ``with_code_only``, ``(reconstructions, code_only)``."""
    images = np.asarray(images, np.float32)
    if images.shape[0] != self.batch_size:
      raise ValueError(f"reconstruct_batch needs exactly batch_size={self.batch_size} images, got {images.shape[0]}")
    recon, code_only = self._reconstruct_fn(self.params, self._put(images), level=L.parse_level(level),
                                            keep_code=self._keep_code(keep_code))
    return (recon, code_only) if with_code_only else recon

  # -- helpers -----------------------------------------------------------------------------------------------------
  def _keep_code(self, keep_code: bool | None) -> bool:
    if keep_code is None:
      return self.keep_code
    if keep_code and not self.model.shortcuts:
      raise ValueError("keep_code=True keeps the fixed code of a model with shortcuts; this model has none")
    return bool(keep_code)

  def _put(self, batch: np.ndarray) -> jax.Array:
    return jax.device_put(batch, self._batch_sharding)

  def _real_sizes(self, batch: np.ndarray, sizes: list, idx: list[int]) -> jax.Array:
    """(rows, 2) (height, width) of each batch row's own pixels (its padding left out of the keep-code choice;
    filler rows 0)."""
    valid = np.zeros((batch.shape[0], 2), np.int32)
    valid[:len(idx)] = [sizes[i] for i in idx]
    return jax.device_put(valid, self._batch_sharding)

  def _bucket_shape(self, shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    """The shape an (H, W, C) image (``factor`` 1) or latent grid of a level (its factor) is computed at."""
    if not self.shape_buckets:
      return tuple(shape)
    return (bucket_side(shape[0] * factor) // factor, bucket_side(shape[1] * factor) // factor) + tuple(shape[2:])

  def _buckets(self, items: list[np.ndarray], level_arr: np.ndarray, *, latents: bool = False):
    """Yields ``(level, indices, batch)`` per (level, shape) bucket: at most ``batch_size`` images and
    ``max_batch_pixels`` pixels (at least one image) at a time. With ``shape_buckets`` each item is edge padded to its
    bucket's shape and every batch of a bucket has the same size (zeros after the real items); without, a batch is
    zero-padded only to a multiple of the device count."""
    groups: dict[tuple, list[int]] = {}
    for i, (x, lvl) in enumerate(zip(items, level_arr)):
      groups.setdefault((int(lvl), self._bucket_shape(x.shape, L.FACTORS[int(lvl)] if latents else 1)), []).append(i)
    devices = self.mesh.size
    for (level, shape), indices in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
      pixels = shape[0] * shape[1] * (L.FACTORS[level] ** 2 if latents else 1)  # of the image
      per_call = max(1, min(self.batch_size, self.max_batch_pixels // max(pixels, 1)))
      for s in range(0, len(indices), per_call):
        idx = indices[s:s + per_call]
        rows = per_call if self.shape_buckets else len(idx)
        batch = np.zeros((devices * math.ceil(rows / devices),) + tuple(shape), np.float32)
        batch[:len(idx)] = np.stack([_pad_edge(items[i], shape[:2]) for i in idx])
        yield level, idx, batch

  def compiled_count(self) -> dict[str, int]:
    """How many programs each entry point has compiled (one per level and image size when bucketing works)."""
    return {"encode": self._encode_fn._cache_size(), "decode": self._decode_fn._cache_size(),
            "reconstruct": self._reconstruct_fn._cache_size()}


# Keywords that chose levels before the LevelAssigner did: what to pass instead.
_MOVED_TO_ASSIGNER = {"manifest": "LevelAssigner(manifest=...) with ids=", "scorer": "LevelAssigner(scorer=..., "
                      "thresholds=...)", "thresholds": "LevelAssigner(scorer=..., thresholds=...)",
                      "target_psnr": "LevelAssigner(target_psnr=...)", "budget_tokens": "tok.auto_assigner("
                      "budget_tokens=...)"}


def _reject_moved(kwargs: Mapping[str, Any]) -> None:
  for name in kwargs:
    if name in _MOVED_TO_ASSIGNER:
      raise TypeError(f"{name}= is no longer a keyword here: pass levels={_MOVED_TO_ASSIGNER[name]} "
                      "(cat_jax.complexity.assign)")
    raise TypeError(f"unexpected keyword argument {name!r}")


def _warn_missed(assignment, n: int) -> None:
  if assignment.num_missed:
    import warnings
    warnings.warn(f"{assignment.num_missed} of {n} images reach the quality target at no level: they get the level "
                  "closest to it (flagged in Latents.missed_target)", stacklevel=3)


def check_params_match(model: NestedVAE, params: Any, where: str) -> None:
  """Raises ValueError naming the first parameter that ``model`` lacks, misses or shapes differently."""
  from cat_jax import weights

  abstract = abstract_params(model)
  expected = {weights.path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  got = weights.flatten(params)
  problems = [f"{k}: missing" for k in expected if k not in got] + [f"{k}: not in the model" for k in got
                                                                    if k not in expected]
  problems += [f"{k}: shape {np.shape(got[k])}, the model's {v.shape}" for k, v in expected.items()
               if k in got and np.shape(got[k]) != v.shape]
  if problems:
    raise ValueError(f"the weights in {where} do not match the model its config.json describes "
                     f"({len(problems)} problems, e.g. {'; '.join(problems[:3])})")


def load_tokenizer(spec: str | os.PathLike, *, batch_size: int | None = None, step: int | None = None,
                   use_ema: bool = True, config: Any = None) -> Tokenizer:
  """A tokenizer by name, as every command line takes it: a shipped name (``demo``), a weight folder
  (``save_pretrained``, ``convert sd_vae``, ``convert release``) or a training workdir (its checkpoint; ``step``,
  ``use_ema`` and ``config`` apply to workdirs only)."""
  from cat_jax import storage, weights

  spec = os.fspath(spec)
  if spec in PRETRAINED or weights.is_folder(spec):
    return Tokenizer.from_pretrained(spec, batch_size=batch_size)
  path = storage.as_path(spec)
  if not path.exists():
    raise FileNotFoundError(f"{spec} does not exist (give a training workdir, a tokenizer folder or one of the "
                            f"shipped names {list(PRETRAINED)})")
  if not path.is_dir():
    raise FileNotFoundError(f"{spec} is neither a training workdir nor a tokenizer folder")
  return Tokenizer.from_checkpoint(spec, step=step, use_ema=use_ema, batch_size=batch_size, config=config)


def _encode(params, images, rng, valid=None, *, level: int, sample: bool, keep_code: bool, model: NestedVAE):
  """The level's latent grid and, per image, whether it is the fixed code (``NestedVAE.encode_keeping_code``;
  ``valid``: each image's own (height, width) in the padded batch)."""
  variables, rng = {"params": params}, rng if sample else None
  if keep_code:
    z, code_only = model.apply(variables, images, level, rng, valid, method=NestedVAE.encode_keeping_code)
    return crop_latent(z, level), code_only
  posterior = model.apply(variables, images, level, method=NestedVAE.encode)
  z = posterior.mode() if rng is None else posterior.sample(rng)
  return crop_latent(z, level), jnp.zeros(images.shape[:1], bool)


def _decode(params, latents, code_only, *, level: int, model: NestedVAE):
  """Images from a level's latent grids; those flagged ``code_only`` as the fixed code alone."""
  return model.apply({"params": params}, pad_latent(latents, level), level,
                     code_only if model.shortcuts else None, method=NestedVAE.decode)


def _reconstruct(params, images, valid=None, *, level: int, keep_code: bool, model: NestedVAE):
  """``NestedVAE.reconstruct``: unclipped reconstructions and the per-image code bits."""
  return model.apply({"params": params}, images, level, keep_code, valid, method=NestedVAE.reconstruct)
