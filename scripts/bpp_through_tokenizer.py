"""JPEG bits per pixel per class of a DiT run's real images, raw and reconstructed through its tokenizer.

The fair reference for ``python -m cat_jax.sample --jpeg_report``: generated images decode through the tokenizer, so
they cannot hold more detail than the tokenizer's own reconstructions of real images at the same level
(docs/generation.md). Each class is reconstructed at the level most of its training latents have.

  python scripts/bpp_through_tokenizer.py --workdir /tmp/dit_demo [--per_class 32]
"""

import argparse

import numpy as np

from cat_jax import checkpoint as ckpt
from cat_jax import levels as L
from cat_jax.data.latents import LatentStatistics
from cat_jax.generation.sampling import dit_tokenizer
from cat_jax.sample import class_rank_correlation, jpeg_bpp_by_class, real_images_by_class


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a train_dit workdir")
  parser.add_argument("--per_class", type=int, default=32)
  args = parser.parse_args(argv)

  config = ckpt.load_config(args.workdir)
  counts = LatentStatistics.load(args.workdir).class_level_counts  # [class][level] in the training latents
  level_of_class = {y: int(np.argmax(c)) for y, c in enumerate(counts) if sum(c)}
  tok = dit_tokenizer(config, args.workdir, batch_size=args.per_class)

  images, labels = real_images_by_class(config, sorted(level_of_class), per_class=args.per_class)
  recon = np.empty_like(images)
  for y, level in level_of_class.items():
    recon[labels == y] = np.clip(np.asarray(tok.reconstruct_batch(images[labels == y], level)), -1.0, 1.0)
  real, through = jpeg_bpp_by_class(images, labels), jpeg_bpp_by_class(recon, labels)
  print("class | level | JPEG bpp real | JPEG bpp real through the tokenizer")
  for y in sorted(real):
    print(f"{y} | {L.level_name(level_of_class[y])} | {real[y]:.3f} | {through[y]:.3f}")
  print(f"Spearman rank correlation, through the tokenizer vs real: {class_rank_correlation(through, real):.3f}")


if __name__ == "__main__":
  main()
