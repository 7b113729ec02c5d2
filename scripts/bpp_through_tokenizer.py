"""JPEG bits per pixel per class of a DiT run's real images, raw and reconstructed through its tokenizer.

The fair reference for ``python -m cat_jax.sample --jpeg_report``: generated images decode through the tokenizer, so
they cannot hold more detail than the tokenizer's own reconstructions of real images at the same level
(docs/generation.md). Each class is reconstructed at the level most of its training latents have.

  python scripts/bpp_through_tokenizer.py --workdir /tmp/dit_demo [--per_class 32]
"""

import argparse
import json

import numpy as np

from cat_jax import checkpoint as ckpt
from cat_jax import data as cat_data
from cat_jax import levels as L
from cat_jax.generation.sampling import load_tokenizer
from cat_jax.sample import jpeg_bpp_by_class
from cat_jax.train_dit import _source_labels


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a train_dit workdir")
  parser.add_argument("--per_class", type=int, default=32)
  args = parser.parse_args(argv)

  config = ckpt.load_config(args.workdir)
  source = cat_data.get_source(config.data.source, config.data.split, **config.data.source_kwargs)
  labels = _source_labels(source, len(source))
  index = [json.loads(line) for line in open(f"{args.workdir}/latents/index.jsonl")]
  level_of_class = {}
  for y in np.unique(labels):
    levels = [r["level"] for r in index if r.get("label") == int(y)]
    level_of_class[int(y)] = int(np.bincount(levels, minlength=L.NUM_LEVELS).argmax())
  prep = cat_data.PreprocessConfig(image_size=int(config.data.image_size), on_bad_image="raise")
  tok = load_tokenizer(config, args.workdir, batch_size=args.per_class)

  real, through = {}, {}
  for y, level in sorted(level_of_class.items()):
    picked = np.flatnonzero(labels == y)[:args.per_class]
    images = np.stack([cat_data.preprocess(source[int(i)]["image"], prep, path=str(i), rng=None) for i in picked])
    recon = np.clip(np.asarray(tok.reconstruct_batch(images, level)), -1.0, 1.0)
    real.update(jpeg_bpp_by_class(images, np.full(len(picked), y)))
    through.update(jpeg_bpp_by_class(recon, np.full(len(picked), y)))
  rank = lambda d: np.argsort(np.argsort([d[y] for y in sorted(d)]))
  print("class | level | JPEG bpp real | JPEG bpp real through the tokenizer")
  for y in sorted(real):
    print(f"{y} | {L.level_name(level_of_class[y])} | {real[y]:.3f} | {through[y]:.3f}")
  print(f"Spearman rank correlation, through the tokenizer vs real: "
        f"{float(np.corrcoef(rank(through), rank(real))[0, 1]):.3f}")


if __name__ == "__main__":
  main()
