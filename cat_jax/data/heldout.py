"""Held-out photos: natural images the embedded dataset never draws from, for checking generalisation offline.

Eight pictures that ship with scikit-image and matplotlib (a portrait, a motorcycle in a garage, a retina, a
printed page, handwriting on paper, a colour wheel, a microscope cell, a blurred clock), none of which the embedded
dataset's ``photo`` or ``texture`` kinds use. Each contributes ``crops_per_image`` deterministic square crops
(covering 30-100% of the shorter side), resized to ``image_size``. No download.
"""

from __future__ import annotations

import functools
import io
import os

import numpy as np
from PIL import Image

# (file, where it ships, caption)
PICTURES = (
    ("grace_hopper.jpg", "matplotlib", "a portrait of a woman in a naval uniform in front of a flag"),
    ("motorcycle_left.png", "skimage", "a red motorcycle in a cluttered garage"),
    ("retina.jpg", "skimage", "a photograph of a human retina with blood vessels"),
    ("page.png", "skimage", "a scanned page of printed text"),
    ("text.png", "skimage", "handwritten mathematics on paper, photographed at an angle"),
    ("color.png", "skimage", "a colour wheel on black"),
    ("cell.png", "skimage", "a microscope image of a cell"),
    ("clock_motion.png", "skimage", "a motion-blurred photograph of a clock"),
)


@functools.lru_cache(maxsize=None)
def _picture(name: str, where: str) -> np.ndarray:
  if where == "matplotlib":
    try:
      import matplotlib
    except ImportError as e:
      raise ImportError("the held-out photos include one that ships with matplotlib: pip install matplotlib") from e
    folder = os.path.join(matplotlib.get_data_path(), "sample_data")
  else:
    try:
      import skimage.data
    except ImportError as e:
      raise ImportError("the held-out photos ship with scikit-image: pip install scikit-image") from e
    folder = os.path.dirname(skimage.data.__file__)
  with Image.open(os.path.join(folder, name)) as img:
    return np.asarray(img.convert("RGB"), np.uint8)


def heldout_image(index: int, *, crops_per_image: int = 8, image_size: int = 256) -> np.ndarray:
  """Crop ``index`` as a uint8 (image_size, image_size, 3) array. Deterministic."""
  picture = index // crops_per_image
  arr = _picture(*PICTURES[picture][:2])
  rng = np.random.default_rng([7, picture, index % crops_per_image])
  h, w = arr.shape[:2]
  side = int(min(h, w) * rng.uniform(0.3, 1.0))
  y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  crop = Image.fromarray(arr[y0:y0 + side, x0:x0 + side]).resize((image_size, image_size), Image.BICUBIC)
  return np.asarray(crop, np.uint8)


class HeldoutSource:
  """The held-out photos as a source (any split name gives the same images): ``'image'`` is PNG bytes."""

  def __init__(self, split: str = "test", *, crops_per_image: int = 8, image_size: int = 256):
    del split  # one fixed set: it is never trained on
    self.crops_per_image = int(crops_per_image)
    self.image_size = int(image_size)
    if self.crops_per_image <= 0:
      raise ValueError(f"crops_per_image must be positive, got {crops_per_image}")

  def __len__(self) -> int:
    return len(PICTURES) * self.crops_per_image

  def id_of(self, index: int) -> str:
    return f"heldout/{PICTURES[index // self.crops_per_image][0].split('.')[0]}/{index % self.crops_per_image}"

  def ids(self) -> list[str]:
    return [self.id_of(i) for i in range(len(self))]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} held-out images")
    buf = io.BytesIO()
    Image.fromarray(heldout_image(index, crops_per_image=self.crops_per_image, image_size=self.image_size)).save(
        buf, format="PNG", compress_level=1)
    return {"id": self.id_of(index), "image": buf.getvalue(),
            "caption": f"A crop of {PICTURES[index // self.crops_per_image][2]}."}

  def __repr__(self) -> str:
    return f"HeldoutSource(crops_per_image={self.crops_per_image}, image_size={self.image_size})"
