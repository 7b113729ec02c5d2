"""Encoding a folder of photos of many sizes: compiles, images/s and the time spent compiling, with each image's
exact padded shape (every multiple of 32 its own program, batches of the images given) against the tokenizer's shape
buckets (sides on the 32, 64, 96, 128, 192, 256, 384, ... ladder, one batch size), in the same run.

The photos are random crops of scikit-image's sample photos at random sizes (sides uniform in [--min-side,
--max-side], then a random rescale of the crop), written to a temporary folder as PNG and read back as
``python -m cat_jax.encode`` reads them (native size); each is encoded at one level and decoded (what encode does
for its reconstructions), a chunk of ``--chunk`` images at a time, with a fresh tokenizer (empty compile caches, no
persistent compilation cache) for each of the two ways. Also reported: how much the bucket's extra padding changes the
reconstructions of the real pixels (mean PSNR against the originals either way, and the largest pixel difference).

  python benchmarks/encode_mixed_sizes.py                           # 200 photos, sides 48-400, 16x, the demo
  python benchmarks/encode_mixed_sizes.py --num-images 8 --max-side 96 --json out.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # every compile is measured cold

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cat_jax import levels as L  # noqa: E402
from cat_jax.data.preprocess import Sizing, load_sized  # noqa: E402
from cat_jax.tokenizer import Tokenizer, bucket_side  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "camera", "immunohistochemistry", "hubble_deep_field")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def write_photos(folder: str, n: int, min_side: int, max_side: int, seed: int) -> list[str]:
  """``n`` PNGs of random sizes cut from scikit-image's photos; returns their paths."""
  import skimage.data

  rng = np.random.default_rng(seed)
  sources = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]
  sources = [np.repeat(s[..., None], 3, -1) if s.ndim == 2 else s[..., :3] for s in sources]
  paths = []
  for i in range(n):
    photo = sources[i % len(sources)]
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    scale = rng.uniform(0.5, 1.0)  # the crop covers 1-2x the output: a resized photo, not a pixel-exact cut
    ch, cw = min(photo.shape[0], round(h / scale)), min(photo.shape[1], round(w / scale))
    y, x = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
    crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    paths.append(os.path.join(folder, f"{i:04d}.png"))
    crop.save(paths[-1])
  return paths


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = float(np.mean(np.square((np.asarray(a, np.float64) - b) / 2.0)))
  return 10 * np.log10(1.0 / max(mse, 1e-10))


def encode_folder(paths: list[str], *, buckets: bool, level: int, batch_size: int, chunk: int) -> dict:
  """Encodes and decodes every file as the encode command does, a chunk at a time; compiles and times."""
  tok = Tokenizer.from_pretrained("demo", batch_size=batch_size)
  tok.shape_buckets = buckets
  compile_s = {event: 0.0 for event in COMPILE_EVENTS}

  def listener(event, duration, **_):
    if event in compile_s:
      compile_s[event] += duration

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    recons, originals = [], []
    start = time.perf_counter()
    for s in range(0, len(paths), chunk):
      images = [load_sized(open(p, "rb").read(), Sizing(), path=p)[0] for p in paths[s:s + chunk]]
      recons += list(tok.decode(tok.encode(images, level)))
      originals += images
    seconds = time.perf_counter() - start
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  counts = tok.compiled_count()
  return {"compiles": counts["encode"] + counts["decode"], "compiles_encode": counts["encode"],
          "compiles_decode": counts["decode"], "seconds": seconds, "compile_s": sum(compile_s.values()),
          "compile_s_by_phase": {event.rsplit("/", 1)[1]: s for event, s in compile_s.items()},
          "images_per_s": len(paths) / seconds,
          "images_per_s_without_compiles": len(paths) / (seconds - sum(compile_s.values())),
          "mean_psnr": float(np.mean([psnr(r, o) for r, o in zip(recons, originals)])), "_recons": recons}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num-images", type=int, default=200)
  p.add_argument("--min-side", type=int, default=48)
  p.add_argument("--max-side", type=int, default=400)
  p.add_argument("--level", default="16x")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--chunk", type=int, default=256, help="images per encode call (encode's --chunk)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", help="also write the result here")
  args = p.parse_args(argv)
  level = L.parse_level(args.level)
  with tempfile.TemporaryDirectory() as folder:
    paths = write_photos(folder, args.num_images, args.min_side, args.max_side, args.seed)
    sizes = [Image.open(path).size[::-1] for path in paths]
    exact = encode_folder(paths, buckets=False, level=level, batch_size=args.batch_size, chunk=args.chunk)
    bucketed = encode_folder(paths, buckets=True, level=level, batch_size=args.batch_size, chunk=args.chunk)
  diff = max(float(np.abs(a - b).max()) for a, b in zip(exact.pop("_recons"), bucketed.pop("_recons")))
  padded = [(-(-h // 32) * 32, -(-w // 32) * 32) for h, w in sizes]
  computed = [(bucket_side(h), bucket_side(w)) for h, w in sizes]
  result = {
      "benchmark": "encode_mixed_sizes", "tokenizer": "demo", "level": L.level_name(level),
      "num_images": args.num_images, "sides": [args.min_side, args.max_side], "batch_size": args.batch_size,
      "chunk": args.chunk, "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "distinct_sizes": len(set(sizes)), "distinct_padded_shapes": len(set(padded)),
      "distinct_bucket_shapes": len(set(computed)),
      "bucket_pixels_over_padded": float(sum(h * w for h, w in computed) / sum(h * w for h, w in padded)),
      "exact": exact, "bucketed": bucketed,
      "ratio": {"compiles": exact["compiles"] / max(bucketed["compiles"], 1),
                "compile_s": exact["compile_s"] / max(bucketed["compile_s"], 1e-9),
                "images_per_s": bucketed["images_per_s"] / exact["images_per_s"]},
      "psnr_change_db": bucketed["mean_psnr"] - exact["mean_psnr"], "max_pixel_difference": diff,
  }
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
