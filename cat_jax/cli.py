"""What the argparse entry points share: every ``--a_b`` option is also ``--a-b`` (and the reverse)."""

from __future__ import annotations

import argparse
from typing import Sequence


def both_spellings(names: Sequence[str]) -> list[str]:
  """``names`` plus, for each long option, its spelling with ``-`` and with ``_`` between words."""
  out = list(names)
  for name in names:
    if name.startswith("--"):
      for alt in ("--" + name[2:].replace("_", "-"), "--" + name[2:].replace("-", "_")):
        if alt not in out:
          out.append(alt)
  return out


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose options (and those of its argument groups) take both spellings; the first
  name given stays the one ``dest`` comes from."""

  def add_argument(self, *names, **kwargs):
    return super().add_argument(*both_spellings(names), **kwargs)

  def add_argument_group(self, *args, **kwargs):
    group = super().add_argument_group(*args, **kwargs)
    add = group.add_argument
    group.add_argument = lambda *names, **kw: add(*both_spellings(names), **kw)
    return group


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1 (``--image-size 0`` is refused, not read as a default)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value} (leave the option out for the "
                                     "images' native size)")
  return value


def add_sizing_arguments(parser: argparse.ArgumentParser) -> None:
  """``--image-size N`` / ``--max-side N`` (one of them; neither: each image at its native size), read back by
  ``sizing``."""
  group = parser.add_mutually_exclusive_group()
  group.add_argument(*both_spellings(["--image-size"]), dest="image_size", type=positive_int, metavar="N",
                     help="resize the shorter side to N and centre-crop N x N (the training and paper protocol); "
                          "default: each image at its native size")
  group.add_argument(*both_spellings(["--max-side"]), dest="max_side", type=positive_int, metavar="N",
                     help="resize images whose longer side is above N down to N, aspect ratio kept")


def sizing(args: argparse.Namespace):
  """The ``cat_jax.data.preprocess.Sizing`` of ``add_sizing_arguments``' options."""
  from cat_jax.data.preprocess import Sizing

  return Sizing(image_size=args.image_size, max_side=args.max_side)
