r"""dB over the DCT patch code (the tokenizer's no-learning start), content and smooth images apart.

  python scripts/gain_over_code.py demo /tmp/cat_demo [more workdirs or pretrained folders ...]

For each tokenizer: per image PSNR (on [0, 1], capped at 50 dB) of its posterior-mode reconstruction (the
tokenizer's output: per image the learned path or, where that is worse, the DCT code it keeps), of its learned path
alone, and of the DCT code with the same numbers per latent position, on the embedded validation split (first 400 images) and on
the held-out photos (64 crops). Prints, per level, the mean difference over all images, over "content" images
(the code below 40 dB), over "smooth" ones (the code at 40 dB or more) and per kind of image, and a JSON line
per tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def per_image_psnr(tok, images: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(tokenizer PSNR, its learned path's PSNR, DCT-code PSNR, kept the code) per image, PSNR capped at 50 dB."""
  import jax.numpy as jnp
  from cat_jax.metrics import image_quality
  from cat_jax.models.nested_vae import NestedVAE

  x = jnp.asarray(images)
  recon, kept = tok.reconstruct_batch(x, level, with_code_only=True)
  learned = tok.reconstruct_batch(x, level, keep_code=False)
  code = tok.model.apply({"params": tok.params}, x, level, method=NestedVAE.code_reconstruction)
  psnr = lambda y: np.asarray(image_quality.psnr(jnp.clip(jnp.asarray(y), -1, 1), x,
                                                 max_db=image_quality.PSNR_MAX_DB))
  return psnr(recon), psnr(learned), psnr(code), np.asarray(kept)


def load_images(name: str, image_size: int) -> tuple[np.ndarray, list[str]]:
  """The images in [-1, 1] and their kinds (the embedded generator's, or 'held-out photo')."""
  from cat_jax.data import get_source
  from cat_jax.data.preprocess import PreprocessConfig, preprocess
  if name == "val":
    source = get_source("embedded", "validation", num_images=400, image_size=image_size)
  else:
    source = get_source("heldout", "test", image_size=image_size)
  config = PreprocessConfig(image_size=image_size, min_size=1)
  records = [source[i] for i in range(len(source))]
  return (np.stack([preprocess(r["image"], config) for r in records]),
          [r.get("kind", "held-out photo") for r in records])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("tokenizers", nargs="+", help="'demo', a save_pretrained folder or a training workdir")
  p.add_argument("--image-size", "--image_size", type=int, default=64)
  p.add_argument("--smooth-db", "--smooth_db", type=float, default=40.0,
                 help="images the code reproduces at this PSNR or better count as smooth")
  args = p.parse_args(argv)
  from cat_jax.tokenizer import load_tokenizer

  tokenizers = {}
  for path in args.tokenizers:
    try:
      tokenizers[path] = load_tokenizer(path, batch_size=16)
    except (FileNotFoundError, ValueError) as e:
      p.error(f"{path}: {str(e).splitlines()[0]}")
  data = {name: load_images(name, args.image_size) for name in ("val", "photos")}
  for path, tok in tokenizers.items():
    result = {"tokenizer": path}
    for name, (images, kinds) in data.items():
      for level, factor in enumerate((8, 16, 32)):
        parts = [per_image_psnr(tok, images[i:i + 16], level) for i in range(0, len(images), 16)]
        ours, learned, code, kept = (np.concatenate(a) for a in zip(*parts))
        smooth = code >= args.smooth_db
        gain = ours - code
        row = {"mean": float(gain.mean()), "content": float(gain[~smooth].mean()),
               "smooth": float(gain[smooth].mean()) if smooth.any() else float("nan"),
               "psnr": float(ours.mean()), "code": float(code.mean()), "n_smooth": int(smooth.sum()),
               "kept_code": float(kept.mean()),
               "learned_path": {"mean": float((learned - code).mean()),
                                "content": float((learned - code)[~smooth].mean()),
                                "smooth": float((learned - code)[smooth].mean()) if smooth.any() else float("nan")}}
        kinds_arr = np.asarray(kinds)
        row["kinds"] = {k: float(gain[kinds_arr == k].mean()) for k in dict.fromkeys(kinds)}
        result[f"{name}/{factor}x"] = row
        print(f"{path:30s} {name:6s} {factor:2d}x  psnr {row['psnr']:6.2f}  code {row['code']:6.2f}  "
              f"gain mean {row['mean']:+6.2f}  content {row['content']:+6.2f}  smooth {row['smooth']:+6.2f} "
              f"({row['n_smooth']} smooth)  kept the code {row['kept_code']:4.0%}; learned path alone "
              f"{row['learned_path']['mean']:+.2f} / {row['learned_path']['content']:+.2f} / "
              f"{row['learned_path']['smooth']:+.2f}", flush=True)
        if len(row["kinds"]) > 1:
          print(" " * 44 + "  ".join(f"{k} {v:+.2f}" for k, v in row["kinds"].items()), flush=True)
    print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
