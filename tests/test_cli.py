"""Every argparse entry point takes `--a-b` and `--a_b` alike (cat_jax.cli.ArgumentParser)."""

import importlib

import pytest

ENTRY_POINTS = ("cat_jax.encode", "cat_jax.evaluate", "cat_jax.score", "cat_jax.sample", "cat_jax.convert.__main__")


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_option_has_both_spellings(module):
  parser = importlib.import_module(module).build_parser()
  options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]  # noqa: SLF001
  two_word = [o for o in options if "_" in o[2:] or "-" in o[2:]]
  assert two_word, module  # every entry point has some
  for option in two_word:
    for spelling in ("--" + option[2:].replace("_", "-"), "--" + option[2:].replace("-", "_")):
      assert spelling in options, (module, option, spelling)


def test_both_spellings_parse_to_the_same_arguments():
  from cat_jax import encode

  base = ["--checkpoint", "demo", "--input", "in", "--out", "out"]
  a = encode.build_parser().parse_args(base + ["--image_size", "32", "--no-reconstructions", "--on-bad-image", "raise"])
  b = encode.build_parser().parse_args(base + ["--image-size", "32", "--no_reconstructions", "--on_bad_image", "raise"])
  assert vars(a) == vars(b) and a.image_size == 32 and a.no_reconstructions and a.on_bad_image == "raise"
