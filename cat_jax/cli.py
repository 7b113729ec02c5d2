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
