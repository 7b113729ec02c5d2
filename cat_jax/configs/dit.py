r"""Class-conditional DiT on CAT latents (python -m cat_jax.train_dit; docs/generation.md).

  python -m cat_jax.train_dit --config configs/dit.py --workdir gs://bucket/dit \
      --config.tokenizer.path=gs://bucket/cat --config.data.latents=/data/imagenet_latents   # paper-like, DiT-XL/2
  python -m cat_jax.train_dit --config configs/dit.py:demo --workdir /tmp/dit_demo          # embedded data, CPU
  python -m cat_jax.train_dit --config configs/dit.py:runlocal --workdir /tmp/dit_rl        # a minute, for tests

``data.latents``: a folder written by ``python -m cat_jax.encode --format array_record --labels subfolder`` (or by
an earlier run). Unset, the trainer encodes ``data.source`` itself into ``<workdir>/latents`` with the tokenizer
``tokenizer.path`` names (a cat_jax.train workdir or a Tokenizer.save_pretrained / shipped name such as 'demo'), or,
without one, with an untrained tokenizer of ``tokenizer.model`` (CAT's untrained nested VAE is a DCT-like codec that
already reconstructs; its weights are saved in ``<workdir>/tokenizer`` for sampling).
"""

import ml_collections

from cat_jax.configs import cat


def _cat_config(variant: str) -> ml_collections.ConfigDict:
  return cat.get_config(variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "imagenet"
  if variant not in ("imagenet", "demo", "runlocal"):
    raise ValueError(f"unknown config variant {variant!r}; use imagenet (default), demo or runlocal")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # The DiT (cat_jax.generation.dit.DiT fields); size: tiny, mini, S, B, L or XL (hidden size, depth, heads).
  c.model = dict(size="XL", patch_size=2, in_channels=16, num_classes=1000, dtype="bfloat16", param_dtype="float32")
  # Rectified flow: label dropout for classifier-free guidance, training-time distribution.
  c.flow = dict(class_dropout=0.1, time_sampling="uniform")
  # Sampling defaults (python -m cat_jax.sample and the trainer's sample grids).
  c.sample = dict(num_steps=50, solver="heun", cfg_scale=1.5)

  c.tokenizer = dict(path=ml_collections.config_dict.placeholder(str), model=None, seed=0)
  # latents: an encoded folder; unset, data.source is encoded (labels: the TFDS 'label' feature, or the embedded
  # dataset's kinds). levels: None for the source's built-in levels, a score manifest, or one level for all.
  c.data = dict(latents=ml_collections.config_dict.placeholder(str), source="tfds:imagenet2012", split="train",
                source_kwargs={"label_key": "label"}, levels=ml_collections.config_dict.placeholder(str),
                image_size=256)

  c.batch_size = 256
  c.num_steps = 400_000
  c.optimizer = dict(lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
  c.ema_decay = 0.9999

  c.mesh = dict(data=-1, fsdp=1)
  c.fsdp_min_size = 2**18
  c.log_every = 100
  c.sample_every = 10_000   # a sample grid (PNG and TensorBoard) of the EMA model every this many steps (0: never)
  c.checkpoint_every = 5_000
  c.keep_checkpoints = 3
  c.async_checkpointing = True

  if variant == "demo":
    # The embedded dataset's 8 kinds as classes, 64x64 images, latents of the trained demo tokenizer shipped in the
    # package (Tokenizer.from_pretrained("demo"), 16 channels): 8x8 / 4x4 / 2x2. Patch size 1 so the 32x grid still
    # has 4 tokens.
    c.model.update(size="mini", patch_size=1, num_classes=8, dtype="float32")
    c.tokenizer.path = "demo"
    c.data.update(source="embedded", image_size=64)
    c.data.source_kwargs = {"num_images": 2000, "image_size": 64}
    c.batch_size = 64
    c.num_steps = 2_000
    c.optimizer.update(lr=5e-4, warmup_steps=200)
    c.ema_decay = 0.999
    c.sample.update(num_steps=32, cfg_scale=2.0)
    c.log_every = 100
    c.sample_every = 500
    c.checkpoint_every = 500

  if variant == "runlocal":
    c.model.update(size="tiny", patch_size=2, num_classes=8, in_channels=4, dtype="float32")
    c.tokenizer.model = _cat_config("runlocal").model.to_dict()
    c.data.update(source="embedded", image_size=64)
    c.data.source_kwargs = {"num_images": 48, "image_size": 64}
    c.batch_size = 8
    c.num_steps = 6
    c.optimizer.update(lr=1e-3, warmup_steps=2)
    c.ema_decay = 0.9
    c.sample.update(num_steps=4, cfg_scale=1.5)
    c.log_every = 2
    c.sample_every = 6
    c.checkpoint_every = 3
    c.keep_checkpoints = 2
  return c
