"""Every argparse entry point takes `--a-b` and `--a_b` alike (cat_jax.cli.ArgumentParser); the trainers' command
lines list their flags and end bad input in one line, exit status 2."""

import importlib
import subprocess
import sys

import pytest

ENTRY_POINTS = ("cat_jax.encode", "cat_jax.decode", "cat_jax.evaluate", "cat_jax.score", "cat_jax.sample", "cat_jax.convert.__main__")


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


def _run(*args, cwd):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module", ["cat_jax.train", "cat_jax.train_dit", "cat_jax.train_predictor"])
def test_trainer_help_lists_its_flags(module, tmp_path):
  result = _run(module, "--help", cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]  # absl's --help exits 1 by itself
  out = result.stdout
  assert "--config:" in out and "--workdir:" in out and "--config.KEY=VALUE" in out


def test_trainer_errors_are_one_line_with_exit_status_2(tmp_path):
  """From a directory outside the repository (configs by name), no traceback: the problem and the fix."""
  (tmp_path / "a_file").write_text("")
  cases = [
      (["--config", "cat:runlocal", "--workdir", "w", "--config.batch_sizee=3"], 'Did you mean "batch_size"'),
      (["--config", "cat:nosuch", "--workdir", "w"], "unknown config variant 'nosuch'"),
      (["--config", "missing.py", "--workdir", "w"], "config file missing.py does not exist"),
      (["--config", "cat:runlocal", "--workdir", "a_file"], "is a file; give a directory"),
      (["--config", "cat:runlocal"], "--config and --workdir are required"),
      # the repository's path to a shipped config names it from any directory (no configs/cat.py here)
      (["--config", "configs/cat.py:nosuch", "--workdir", "w"], "unknown config variant 'nosuch'"),
      (["--config", "configs/cat.py:demo", "--workdir", "a_file"], "is a file; give a directory"),
      (["--config=cat:runlocal", "--workdir", "w", "--config.batch_size=abc"], "invalid literal for int()"),
  ]
  cases = [("cat_jax.train", args, expected) for args, expected in cases] + [
      ("cat_jax.train_predictor", ["--config", "predictor", "--workdir", "w"], "set --config.teacher"),
      ("cat_jax.train_predictor", ["--config", "predictor", "--workdir", "w", "--config.teacher=grade"],
       "needs data.source=embedded"),
      ("cat_jax.train_predictor", ["--config", "predictor:demo", "--workdir", "w", "--config.teacher=nosuch.jsonl"],
       "no such score manifest"),
      ("cat_jax.train_predictor", ["--config", "configs/predictor.py:demo", "--workdir", "w",
                                   "--config.teacher=nosuch.jsonl"], "no such score manifest"),
      ("cat_jax.train_dit", ["--config", "configs/dit.py:demo", "--workdir", "w", "--config.nosuchkey=1"],
       "no such key: nosuchkey"),
  ]
  for module, args, expected in cases:
    result = _run(module, *args, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(errors) == 1 and expected in errors[0], (args, result.stderr)
  assert not (tmp_path / "w").exists()  # nothing was started


def test_sample_on_a_tokenizer_workdir_says_it_needs_a_dit_workdir(runlocal_workdir, capsys):
  from cat_jax import sample

  assert sample.main(["--workdir", runlocal_workdir, "--out", "unused.png"]) == 2
  assert "not a python -m cat_jax.train_dit workdir" in capsys.readouterr().err


MISSING = "/nonexistent/cat_jax_missing"


@pytest.mark.parametrize("module,args,names", [
    ("score", ["--method", "jpeg", "--path", MISSING], "image folder"),
    ("encode", ["--checkpoint", "demo", "--input", MISSING, "--out", "{tmp}/out"], "--input"),
    ("encode", ["--checkpoint", MISSING, "--input", "{tmp}/images", "--out", "{tmp}/out"], MISSING),
    ("decode", ["--latents", MISSING, "--out", "{tmp}/out"], "--latents"),
    ("evaluate", ["--workdir", "demo", "--data", "folder:" + MISSING, "--out", "{tmp}/out"], "image folder"),
    ("evaluate", ["--workdir", MISSING], MISSING),
    ("sample", ["--workdir", MISSING, "--out", "{tmp}/g.png"], MISSING),
    ("convert.__main__", ["to_torch", "--src", MISSING, "--out", "{tmp}/t"], MISSING),
    ("convert.__main__", ["release", "--src", MISSING, "--out", "{tmp}/r"], MISSING),
    ("convert.__main__", ["sd_vae", "--src", MISSING, "--out", "{tmp}/s"], MISSING),
])
def test_a_missing_folder_or_file_is_one_error_line_with_exit_status_2(module, args, names, tmp_path, capsys):
  from PIL import Image

  (tmp_path / "images").mkdir()
  Image.new("RGB", (40, 40)).save(tmp_path / "images" / "a.png")
  main = importlib.import_module(f"cat_jax.{module}").main
  rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert rc == 2 and "Traceback" not in err and len(errors) == 1 and names in errors[0], err
