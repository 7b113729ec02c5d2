"""Calibrates a tokenizer folder's knob-free ``levels="auto"`` (``auto_levels`` in its config.json) on a data source.

The scores of a level predictor (``--predictor``: a ``python -m cat_jax.train_predictor`` workdir, copied into the
folder) or, without one, JPEG bits per pixel at the tokenizer's training size; thresholds such that the source's
images average the fixed-16x token count (``cat_jax.complexity.assign.calibrate_auto_levels``). config.json changes
and the predictor's two files are added; the tokenizer's weights do not change.

  python scripts/calibrate_auto_levels.py --folder cat_jax/pretrained/demo --predictor /tmp/pred   # the shipped demo
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cat_jax.data import PreprocessConfig, get_source, preprocess  # noqa: E402
from cat_jax.complexity.assign import calibrate_auto_levels  # noqa: E402
from cat_jax.complexity.predictor import LevelPredictor  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--folder", required=True, help="a tokenizer folder (config.json + model.safetensors)")
  p.add_argument("--split", default=None, help="default: the config's training split")
  p.add_argument("--budget-tokens", type=float, default=None, help="default: the fixed-16x count")
  p.add_argument("--predictor", help="a train_predictor workdir or predictor folder (default: JPEG)")
  args = p.parse_args()
  predictor = LevelPredictor.load(args.predictor) if args.predictor else None
  path = pathlib.Path(args.folder) / "config.json"
  config = json.loads(path.read_text())
  data = config["data"]
  source = get_source(data["source"], args.split or data["split"], **data.get("source_kwargs", {}))
  prep = PreprocessConfig(image_size=int(data["image_size"]), min_size=1)
  images = [preprocess(source[i]["image"], prep, path=str(i)) for i in range(len(source))]
  size = predictor.image_size if predictor is not None else int(data["image_size"])
  auto = calibrate_auto_levels(images, image_size=size, budget_tokens=args.budget_tokens, predictor=predictor)
  config["auto_levels"] = dict(auto.to_dict(), source=f"{data['source']} ({args.split or data['split']})")
  if predictor is not None:
    predictor.save(args.folder)
  path.write_text(json.dumps(config, indent=2, sort_keys=True))
  print(json.dumps(config["auto_levels"]))


if __name__ == "__main__":
  main()
