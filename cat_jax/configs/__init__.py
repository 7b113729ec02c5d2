"""The configs, as code (ml_collections): ``cat`` (the tokenizer), ``dit`` (the DiT), ``predictor`` (the level
predictor), ``reproduce`` (docs/reproduction.md).

``load("cat:demo")`` is the one loader: a config name with an optional argument (its ``get_config(arg)``), or a path
``path/to/file.py[:arg]`` for a config file of your own. The files in the repository's ``configs/`` only re-export
these, so ``python -m cat_jax.train --config configs/cat.py:demo`` and ``cat_jax/configs/cat.py:demo`` are the same;
from any other directory, where no ``configs/cat.py`` exists, that path still names the shipped ``cat``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import ml_collections

NAMES = ("cat", "dit", "predictor", "reproduce")


def shipped_name(path: str) -> str | None:
  """The shipped config a path names when no such file exists here: ``configs/cat.py`` (or ``cat_jax/configs/cat.py``)
  run outside the repository root -> ``cat``; None for any other path."""
  parent, base = os.path.split(os.path.normpath(path))
  stem, ext = os.path.splitext(base)
  if ext == ".py" and stem in NAMES and os.path.basename(parent) == "configs" and not os.path.isfile(path):
    return stem
  return None


def load(spec: str) -> ml_collections.ConfigDict:
  """``"cat"``, ``"cat:demo"``, ``"configs/cat.py:runlocal"`` or ``"/my/config.py:arg"`` -> the ConfigDict."""
  name, _, arg = str(spec).partition(":")
  name = shipped_name(name) or name
  if name in NAMES:
    module = importlib.import_module(f"cat_jax.configs.{name}")
  elif name.endswith(".py"):
    if not os.path.isfile(name):
      raise FileNotFoundError(f"config file {name} does not exist (expected path/to/config.py[:variant] or one of "
                              f"{list(NAMES)}[:variant])")
    module_spec = importlib.util.spec_from_file_location(f"_cat_config_{abs(hash(os.path.abspath(name)))}", name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    raise ValueError(f"unknown config {spec!r}: use one of {list(NAMES)}[:variant] or path/to/config.py[:variant]")
  return module.get_config(arg or None)


def resolve_spec(spec: str) -> str:
  """``"cat:demo"`` -> ``"<package>/configs/cat.py:demo"`` (a file path, as ml_collections' ``--config`` flag takes);
  anything else unchanged."""
  name, sep, arg = str(spec).partition(":")
  name = shipped_name(name) or name
  if name not in NAMES:
    return spec
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py") + sep + arg
