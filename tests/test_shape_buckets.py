"""The tokenizer's shape buckets (issue #42): the ladder of padded sides, one batch size per shape (a batch of 3 after
a batch of 8 compiles nothing), latents on the image's own grid, and the keep-code choice made on the image's own
pixels, never its padding."""

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from cat_jax.models.nested_vae import NestedVAE
from cat_jax.tokenizer import Tokenizer, bucket_side


def test_the_ladder_and_its_worst_padding():
  assert [bucket_side(n) for n in (1, 32, 33, 64, 65, 96, 97, 128, 129, 192, 193, 256, 257, 384, 385, 512, 513)] == [
      32, 32, 64, 64, 96, 96, 128, 128, 192, 192, 256, 256, 384, 384, 512, 512, 768]
  ratios = []
  for side in range(1, 4097):
    padded = -(-side // 32) * 32
    bucket = bucket_side(side)
    assert bucket % 32 == 0 and bucket >= padded
    ratios.append(bucket / padded)
  assert max(ratios) < 1.5 and len({bucket_side(s) for s in range(1, 4097)}) == 14  # 32 ... 4096


def test_the_keep_code_choice_ignores_padding():
  """Image 0's own 2x2 pixels are matched by the learned path, its padding by the code: the learned path wins with
  ``valid``, the code without. Image 1 (no padding) decides the same either way."""
  images = jnp.zeros((2, 4, 4, 3))
  learned = images.at[0, 2:, :].set(1.0).at[1].set(0.1)  # wrong only in image 0's padding rows
  code = images.at[0, :2, :2].set(0.5).at[1].set(0.2)    # wrong only in image 0's own pixels
  unmasked = NestedVAE.code_is_closer(images, learned, code)
  masked = NestedVAE.code_is_closer(images, learned, code, jnp.array([[2, 2], [4, 4]]))
  assert unmasked.tolist() == [True, False] and masked.tolist() == [False, False]


@pytest.fixture(scope="module")
def demo():
  return Tokenizer.from_pretrained("demo", batch_size=8)


def test_one_batch_size_per_shape_and_the_images_own_grid(demo):
  photo = skimage.data.astronaut()
  eight = [photo[k:k + 70, k:k + 100] for k in range(8)]  # 70 x 100: padded 96 x 128, bucket 96 x 128
  three = [photo[k:k + 90, k:k + 140] for k in range(3)]  # 90 x 140: padded 96 x 160, bucket 96 x 192
  demo.encode(eight, "16x")
  before = demo.compiled_count()["encode"]
  demo.encode(eight[:3], "16x")  # fewer images of a shape already compiled: nothing new
  assert demo.compiled_count()["encode"] == before
  latents = demo.encode(three, "16x")
  assert demo.compiled_count()["encode"] == before + 1
  assert [z.shape[:2] for z in latents.values] == [(6, 10)] * 3  # 96 x 160 / 16: the image's own grid, not 96 x 192
  assert latents.image_hw(0) == (90, 140) and latents.num_tokens.tolist() == [60] * 3
  out = demo.decode(latents)
  assert out.shape == (3, 90, 140, 3)


def test_buckets_change_the_real_pixels_little_and_the_keep_code_bit_not_at_all(demo):
  """Against each multiple of 32 computed as its own shape (``shape_buckets=False``): the same code bits (chosen on
  the image's own pixels) and PSNR within 0.2 dB per image (the convolutions' zero padding moves further from the
  image; benchmarks/encode_mixed_sizes.py: -0.011 dB mean over 200 photos)."""
  exact = demo.with_params(demo.params)
  exact.shape_buckets = False
  photo = skimage.data.coffee()
  crops = [photo[:130, :260], photo[50:220, :300], photo[100:200, 100:250]]  # buckets 192 x 384, 192 x 384, 128 x 192
  originals = [c.astype(np.float32) / 127.5 - 1 for c in crops]
  for level in ("8x", "16x", "32x"):
    a, b = demo.encode(crops, level), exact.encode(crops, level)
    assert a.code_only_flags().tolist() == b.code_only_flags().tolist(), level
    for x, ya, yb in zip(originals, demo.decode(a), exact.decode(b)):
      psnr = lambda y: 10 * np.log10(4.0 / np.mean(np.square(y - x)))
      assert ya.shape == yb.shape == x.shape and abs(psnr(ya) - psnr(yb)) < 0.2, (level, psnr(ya), psnr(yb))
