r"""CAT nested-VAE training configs.

  python -m cat_jax.train --config configs/cat.py --workdir gs://bucket/cat       # ImageNet-256, paper-like
  python -m cat_jax.train --config configs/cat.py:demo --workdir /tmp/cat_demo    # embedded data, CPU, minutes
  python -m cat_jax.train --config configs/cat.py:runlocal --workdir /tmp/cat_rl  # a few steps, for tests
  python -m cat_jax.train --config configs/cat.py:sd3 --config.init_from=DIR --workdir ...  # from an SD VAE

Override anything with --config.key=value, e.g. --config.batch_size=64 --config.data.levels=/path/manifest.jsonl.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "imagenet"
  if variant not in ("imagenet", "demo", "runlocal", "sd3", "sdxl"):
    raise ValueError(f"unknown config variant {variant!r}; use imagenet (default), demo, runlocal, sd3 or sdxl")
  # Why the demo's values are what they are, and the runs that measured them: docs/tokenizer_quality.md.
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0

  # Model: the nested KL-VAE (cat_jax.models.nested_vae.NestedVAE fields).
  # shortcuts: DC-AE-style residual autoencoding with a fixed DCT patch code on the latent path, so training
  # starts from a JPEG-like codec instead of from noise (docs/tokenizer_quality.md); norm='rms' normalises each
  # position over channels, which works alike on a 2x2 and a 32x32 latent grid. shortcuts=False, norm='group' is
  # the Stable-Diffusion AutoencoderKL layout (see the sd3/sdxl variants).
  c.model = dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, z_channels=16, head_attention=True,
                 shortcuts=True, norm="rms", logvar_init=-10.0, dtype="bfloat16", param_dtype="float32")

  # Data: any cat_jax.data.get_source name. `levels`: a score manifest (python -m cat_jax.score), one level for a
  # fixed-rate baseline (0/1/2 or 8x/16x/32x, e.g. --config.data.levels=16x), or None for the source's built-in
  # levels (the embedded dataset only).
  # `level_mode`: 'content' is the paper's: each image trains only at its complexity level, so each batch costs
  # that level's compute and the mix follows the data (simple images: the cheap 32x path). 'all': every level
  # trains on every image, a level drawn per batch (`level_weights`, equal by default; e.g. '2,1,1' for half the
  # batches at 8x), independent of content:
  # each path sees the whole distribution (what evaluating every level on every image asks for) and no scores
  # are needed to train; a third of the steps then run the costliest (8x) path whatever the data.
  # `eval_levels`: the levels the in-training evaluation reconstructs, e.g. '8x' or '16x,32x' (None: every level).
  c.data = dict(source="tfds:imagenet2012", split="train", eval_split="validation", source_kwargs={},
                levels=ml_collections.config_dict.placeholder(str), level_mode="content",
                eval_levels=ml_collections.config_dict.placeholder(str),
                level_weights="proportional", image_size=256, num_workers=8, on_bad_image="skip", min_size=64)

  c.batch_size = 256  # global, across all devices and hosts
  c.num_steps = 400_000

  c.optimizer = dict(lr=1e-4, d_lr=1e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=1e-4, warmup_steps=5_000,
                     end_lr_factor=0.1, grad_clip=1.0)
  c.ema_decay = 0.9999

  # Losses: recon (L1/L2) + LPIPS + KL + adversarial (hinge) with taming's adaptive weight. log_mse_weight: adds the
  # per-image log MSE (the capped PSNR evaluation reports), which keeps images the DCT code already reproduces exact
  # (docs/tokenizer_quality.md, "Learning past the code").
  c.loss = dict(recon="l1", recon_weight=1.0, log_mse_weight=0.0, lpips_weight=1.0, kl_weight=1e-6,
                gan_weight=0.5, gan_loss="hinge", adaptive_gan_weight=True, disc_start=50_000, lecam_weight=0.0,
                r1_weight=0.0)
  # Converted LPIPS weights (python -m cat_jax.convert lpips --out PATH); None: the default weights path.
  c.lpips_path = ml_collections.config_dict.placeholder(str)
  # disc.dtype: the discriminator computes in float32 by default, whatever model.dtype: at the paper size it is ~5-10%
  # of a step's FLOPs (~6 GFLOP per 256² image forward against the VAE's hundreds), and its logits set the adaptive
  # GAN weight through a ratio of gradient norms, which float32 keeps as the PyTorch reference computes it.
  # 'bfloat16' trades that for a few percent of step time.
  c.disc = dict(base_channels=64, num_layers=3, norm="group", dtype="float32")

  # Parallelism: mesh axis sizes (-1 = all remaining devices); parameters whose size is at least
  # fsdp_min_size are sharded over 'fsdp' on their largest divisible dimension, the rest replicated.
  c.mesh = dict(data=-1, fsdp=1)
  c.fsdp_min_size = 2**18
  # False: the level is a traced scalar and lax.switch picks the branch (one compilation for all levels), on every
  # backend. True: one compilation per level, picked per batch. Kept for GPUs only: there the switch cost 1.30x a
  # static step before the shared stages left it, not re-measured since; on CPU it buys < 10% (traced / static step
  # time 1.03 at 8x, 0.97 at 32x; benchmarks/suite.py --cpu --parts train_jax; docs/performance.md).
  c.static_level = False

  c.log_every = 100
  c.eval_every = 10_000  # and at the start and the end; 0: never
  c.eval_batches = 20
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 3
  c.async_checkpointing = True

  # Warm start from a weight folder (cat_jax/warm_start.py): a fresh run takes its EMA generator, its raw generator
  # and its discriminator (GAN state) when the folder has them (`python -m cat_jax.convert release` writes all
  # three; save_pretrained and `convert sd_vae` the EMA generator only); optimiser states start fresh.
  # freeze_pretrained_steps: a converted SD VAE's 8x path gets no updates for that many steps (-1: never).
  c.init_from = ml_collections.config_dict.placeholder(str)
  c.freeze_pretrained_steps = 0

  if variant == "demo":
    # The embedded graded-complexity dataset on a CPU, 64x64 images, under 15 minutes on 2 cores.
    # residual_gate: the learned residuals on the DCT code are gated per position (docs/tokenizer_quality.md,
    # "Learning past the code"); images the learned path does not improve keep the code whole at encode time
    # (Tokenizer keep_code, on for every model with shortcuts).
    c.model = dict(ch=16, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, z_channels=16, head_attention=False,
                   shortcuts=True, residual_gate=True, norm="rms", logvar_init=-10.0, dtype="float32",
                   param_dtype="float32")
    c.data.update(source="embedded", split="train", eval_split="validation", image_size=64, num_workers=0,
                  source_kwargs={"num_images": 2000, "image_size": 64}, min_size=64)
    # Every level on every image: evaluation (and a newcomer) runs every level on every image, and the embedded
    # data needs no scores. The paper's mode is data.level_mode='content' (configs/reproduce.py trains both).
    # Half the batches at 8x: what the 8x path learns reaches 16x and 32x through the shared trunk (+0.35 / +0.08 /
    # -0.02 dB on content at 8x / 16x / 32x against equal thirds at the same steps). Against three fixed models of
    # the same total steps 2,1,1 costs 0.63 dB at 8x; 6,1,1 brings every exit within 0.2 dB of its model
    # (docs/reproduction.md, "One set of weights against three"); the shipped weights are 2,1,1's.
    c.data.update(level_mode="all", level_weights="2,1,1")
    # The gain past the DCT code grows with the steps each level gets (one level's 1,000 steps: +2.0 dB at 8x; a
    # third of them each: +0.7 to +0.9) and 4,800 steps (2,400 / 1,200 / 1,200 per level) fit the demo's ~12 CPU
    # minutes because a batch of 8 costs ~0.6x a batch of 16 per step.
    c.batch_size = 8
    c.num_steps = 4_800
    # An autoencoder fit without a GAN: Adam's usual betas, not the GAN's (0.5, 0.9), which with the early
    # discriminator and content-only levels cost ~1 dB.
    c.optimizer.update(lr=1e-3, d_lr=1e-4, b1=0.9, b2=0.99, warmup_steps=100, weight_decay=0.0)
    c.ema_decay = 0.99
    # No LPIPS by default: its VGG16 weights cannot be downloaded here. With converted weights, add
    # --config.loss.lpips_weight=1.0 --config.lpips_path=PATH.
    # No GAN by default either: in the earlier demo its first few hundred steps added visible artefacts at this
    # size (docs/tokenizer_quality.md); the demo shows the reconstruction fit. To see it: --config.loss.disc_start=500.
    c.loss.update(lpips_weight=0.0, disc_start=10**9, gan_weight=0.1, kl_weight=1e-6)
    # L2 learns past the DCT code where L1 does not (+0.7 to +0.9 dB on content images in 1,000 steps, L1 ~0). It
    # costs the images the code already reproduces exactly (flat, gradients: -5 to -8 dB through the learned path);
    # the tokenizer keeps the code for those, so no log-MSE term holds the residuals back (without one every level
    # gains +0.2 to +0.3 dB more on content).
    c.loss.update(recon="l2", log_mse_weight=0.0)
    c.disc.update(base_channels=16, num_layers=2)
    c.log_every = 100
    c.eval_every = 1_200
    c.eval_batches = 8
    c.checkpoint_every = 600

  if variant == "runlocal":
    # A few steps of everything (GAN included) on tiny images, for tests and smoke runs.
    c.model = dict(ch=8, ch_mult=(1, 1, 1, 1, 2, 2), num_res_blocks=1, z_channels=4, head_attention=False,
                   shortcuts=True, norm="rms", logvar_init=-10.0, dtype="float32", param_dtype="float32")
    c.data.update(source="embedded", split="train", eval_split="validation", image_size=32, num_workers=0,
                  source_kwargs={"num_images": 48, "image_size": 32}, min_size=32)
    c.batch_size = 8
    c.num_steps = 6
    c.optimizer.update(lr=1e-3, warmup_steps=2)
    c.ema_decay = 0.9
    c.loss.update(lpips_weight=0.0, disc_start=3)
    c.disc.update(base_channels=8, num_layers=1)
    c.log_every = 2
    c.eval_every = 3
    c.eval_batches = 1
    c.checkpoint_every = 3
    c.keep_checkpoints = 2

  if variant in ("sd3", "sdxl"):
    # From a converted SD VAE (python -m cat_jax.convert sd_vae ...; pass --config.init_from=DIR): sd3 is the
    # 16-channel SD3 / FLUX VAE, sdxl the 4-channel SDXL (or SD 1.x/2.x) one. The model is the SD layout (widths
    # 128, 256, 512, 512, then 512 for the new 16x/32x stages, 32 GroupNorm groups); the 8x path is frozen while
    # the new stages learn to feed the pretrained heads, then everything is fine-tuned at a small learning rate.
    c.model = dict(ch=128, ch_mult=(1, 2, 4, 4, 4, 4), num_res_blocks=2, z_channels=16 if variant == "sd3" else 4,
                   head_attention=True, norm="group", norm_groups=32, shortcuts=False, dtype="bfloat16",
                   param_dtype="float32")
    c.freeze_pretrained_steps = 20_000
    c.num_steps = 150_000
    c.optimizer.update(lr=5e-5, warmup_steps=1_000)
    c.loss.update(disc_start=20_000)
  return c
