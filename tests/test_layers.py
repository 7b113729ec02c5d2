"""Layers point down: import-linter checks the contract in .importlinter (entry points on top, independent of each
other; no library module imports one; every module of the package placed in a layer)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def test_import_contracts_hold():
  proc = subprocess.run([sys.executable, "-c", LINT, str(ROOT / ".importlinter")], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "1 kept, 0 broken" in proc.stdout
