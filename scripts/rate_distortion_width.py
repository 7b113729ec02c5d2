r"""PSNR against tokens per image for the DCT code and trained tokenizers of different latent widths: one figure.

  python scripts/rate_distortion_width.py /tmp/runs/D /tmp/runs/R32 --out docs/images/rate_distortion_width.png

Each tokenizer (a training workdir or a weight folder) is measured at 8x / 16x / 32x as `gain_over_code.py` measures
it (per image PSNR on [0, 1] capped at 50 dB, then the mean; the first 400 embedded validation images and the 64
held-out photo crops at 64²), next to the DCT code with the same numbers per latent position. One panel per image
set; a line per tokenizer and per code width. Prints the table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from gain_over_code import load_images, per_image_psnr


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("tokenizers", nargs="+", help="training workdirs or tokenizer folders (e.g. z = 16 and z = 32)")
  p.add_argument("--out", default="rate_distortion_width.png")
  p.add_argument("--image-size", "--image_size", type=int, default=64)
  args = p.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from cat_jax import levels as L
  from cat_jax.tokenizer import load_tokenizer

  try:
    toks = {path: load_tokenizer(path, batch_size=16) for path in args.tokenizers}
  except (FileNotFoundError, ValueError) as e:
    p.error(str(e).splitlines()[0])
  sets = {"embedded validation (400)": load_images("val", args.image_size)[0],
          "held-out photos (64 crops)": load_images("photos", args.image_size)[0]}
  tokens = [(args.image_size // f) ** 2 for f in L.FACTORS]
  curves: dict[str, dict[str, list[float]]] = {name: {} for name in sets}
  for path, tok in toks.items():
    z = tok.model.z_channels
    for name, images in sets.items():
      ours, code = [], []
      for level in range(L.NUM_LEVELS):
        parts = [per_image_psnr(tok, images[i:i + 16], level) for i in range(0, len(images), 16)]
        ours.append(float(np.concatenate([a[0] for a in parts]).mean()))
        code.append(float(np.concatenate([a[2] for a in parts]).mean()))
      label = f"trained, z = {z}"
      curves[name][label if label not in curves[name] else f"{label} ({path})"] = ours
      curves[name].setdefault(f"DCT code, z = {z}", code)
  fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5))
  for ax, (name, lines) in zip(np.atleast_1d(axes), curves.items()):
    for label, values in lines.items():
      ax.plot(tokens, values, "--o" if label.startswith("DCT") else "-o", label=label)
      print(f"{name:28s} {label:50s} " + "  ".join(f"{t:3d} tokens {v:6.2f}" for t, v in zip(tokens, values)))
    ax.set_xscale("log", base=2)
    ax.set_xticks(tokens, [str(t) for t in tokens])
    ax.set_xlabel(f"tokens per {args.image_size}x{args.image_size} image (32x / 16x / 8x)")
    ax.set_ylabel("mean PSNR, capped at 50 dB")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(json.dumps({"tokens": tokens, "curves": curves}))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
