"""Configs live in the package (cat_jax/configs) behind one loader; the repository's configs/*.py re-export them."""

import importlib.util
import pathlib

import pytest

from cat_jax import configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"cat": ("imagenet", "demo", "runlocal", "sd3", "sdxl"), "dit": ("imagenet", "demo", "runlocal"),
            "predictor": ("imagenet", "demo", "runlocal"),
            "reproduce": ("nested", "fixed8x", "fixed16x", "fixed32x")}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_loads_by_name_and_through_the_repository_file(name):
  spec = importlib.util.spec_from_file_location(f"repo_configs_{name}", ROOT / "configs" / f"{name}.py")
  shim = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(shim)
  module = importlib.import_module(f"cat_jax.configs.{name}")
  assert shim.get_config is module.get_config
  for variant in VARIANTS[name]:
    by_name = configs.load(f"{name}:{variant}")
    by_path = configs.load(f"{ROOT / 'configs' / name}.py:{variant}")
    assert by_name.to_dict() == by_path.to_dict()
    assert by_name.variant.endswith(variant)
  assert configs.load(name).to_dict() == configs.load(f"{name}:{VARIANTS[name][0]}").to_dict()


def test_bad_specs_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    configs.load(str(tmp_path / "missing.py:demo"))
  with pytest.raises(ValueError, match=r"use one of \['cat', 'dit', 'predictor', 'reproduce'\]"):
    configs.load("catt:demo")
  with pytest.raises(ValueError, match="unknown config variant"):
    configs.load("cat:nope")


@pytest.mark.parametrize("variant", ["nested", "fixed8x", "fixed32x"])
def test_reproduce_variants_build_their_training_data(variant):
  """The reproduction's models inherit the demo's config: each must still build its training batches (the demo's
  2 : 1 : 1 level mix once made the one-level models fail before their first step)."""
  from cat_jax import train

  config = configs.load(f"reproduce:{variant}")
  config.data.source_kwargs = dict(config.data.source_kwargs, num_images=64)
  batch = next(train._make_data(config, split="train", train=True, process_batch=config.batch_size))  # noqa: SLF001
  assert batch["image"].shape == (config.batch_size, 64, 64, 3)
