r"""The learned level predictor (python -m cat_jax.train_predictor; docs/guide.md, "The level predictor").

  python -m cat_jax.train_predictor --config configs/predictor.py:demo --workdir /tmp/pred   # embedded, CPU, ~35 min
  python -m cat_jax.train_predictor --config configs/predictor.py:demo --config.teacher=grade --workdir /tmp/pred_g
  python -m cat_jax.train_predictor --config configs/predictor.py --workdir gs://bucket/pred \
      --config.teacher=scores/imagenet2012-train-caption_llm.jsonl      # the paper's score, from cat_jax.score

``teacher``: what the predictor learns to reproduce, one of
  'quality:<tokenizer>'  that tokenizer's reconstruction quality at every level in each of ``measures`` (measured
                      here first into <workdir>/quality-<split>.npz): levels then follow what more tokens buy each
                      image (``complexity.allocation``), at a price calibrated to ``budget_tokens``;
  'mse:<tokenizer>'   that tokenizer's 32x reconstruction MSE ('demo', a tokenizer folder or a cat_jax.train workdir),
                      scored here first into <workdir>/teacher-<split>.jsonl (resumable);
  'grade'             the embedded dataset's complexity grade (a stand-in for the caption + LLM score);
  a score manifest    any python -m cat_jax.score output (caption_llm, jpeg, mse).
``eval_teacher``: the same on ``data.eval_split`` for the validation figures (default: the teacher's spec for 'mse:'
and 'grade'; none for a manifest unless given).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "imagenet"
  if variant not in ("imagenet", "demo", "runlocal"):
    raise ValueError(f"unknown config variant {variant!r}; use imagenet (default), demo or runlocal")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.teacher = ml_collections.config_dict.placeholder(str)
  c.eval_teacher = ml_collections.config_dict.placeholder(str)
  # A 'quality:<tokenizer>' teacher's measures; the first prices the knob-free levels. HaarPSI first: of the
  # measures that need no weights it agrees best with people (docs/guide.md, "Quality measures"), and PSNR, which
  # gives up on text, sends dense text to 32x.
  c.measures = ("haarpsi", "psnr")

  # cat_jax.complexity.predictor.PredictorNet: stride-2 convolutions, mean + std pooling, an MLP (~32k parameters).
  c.model = dict(widths=(16, 32, 64), hidden=64)
  # image_size: what a score predictor sees (shorter side resized, centre crop; scores at any other size are resized
  # to it), and the size a quality predictor's price is calibrated at. sizes: a quality predictor's training images,
  # (height, width, count[, drawn]), each the next count records of the source viewed whole at that size (centre
  # crop of that aspect, resized; embedded records drawn at side `drawn` first when given), its qualities measured
  # whole (None: calibration_images at image_size); the price is calibrated on the image_size group not redrawn.
  # eval_images: validation images for the agreement figures (0: none).
  c.data = dict(source="tfds:imagenet2012", split="train", eval_split="validation", source_kwargs={}, image_size=128,
                num_workers=8, min_size=64, on_bad_image="skip", eval_images=10_000, sizes=None)

  c.batch_size = 256
  c.num_steps = 20_000
  c.optimizer = dict(lr=2e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0)
  c.ema_decay = 0.999
  # The knob-free thresholds: the mean token count per image at data.image_size they are calibrated for, on
  # calibration_images training images (None: the fixed-16x count).
  c.budget_tokens = ml_collections.config_dict.placeholder(float)
  c.calibration_images = 20_000

  c.mesh = dict(data=-1, fsdp=1)
  c.fsdp_min_size = 2**18
  c.log_every = 100
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 2
  c.async_checkpointing = True

  if variant == "demo":
    # The embedded dataset (drawn at 256x256, as evaluate --data embedded draws it) viewed whole at 64x64 (where the
    # price is calibrated), 128x128, 256x256 and 1:2 / 2:1, and 800 images drawn at 64x64 as the tokenizer trains
    # and evaluates on them (sharper than a larger drawing resized: without them the predicted choice got 15% of
    # the exact PSNR gain there), taught by the demo tokenizer's own qualities at each size.
    c.teacher = "quality:demo"
    c.data.update(source="embedded", image_size=64, num_workers=0, eval_images=400,
                  source_kwargs={"num_images": 2880, "image_size": 256},
                  sizes=((64, 64, 1600), (128, 128, 300), (256, 256, 60), (128, 256, 60), (256, 128, 60),
                         (64, 64, 800, 64)))
    c.batch_size = 64
    c.num_steps = 1_500
    c.optimizer.update(warmup_steps=50)
    c.ema_decay = 0.99
    c.calibration_images = 1600
    c.log_every = 100
    c.checkpoint_every = 500

  if variant == "runlocal":
    c.teacher = "grade"
    c.data.update(source="embedded", image_size=32, num_workers=0, eval_images=32, min_size=32,
                  source_kwargs={"num_images": 64, "image_size": 32})
    c.batch_size = 8
    c.num_steps = 6
    c.optimizer.update(warmup_steps=2)
    c.ema_decay = 0.9
    c.calibration_images = 64
    c.log_every = 2
    c.checkpoint_every = 3
  return c
