"""Every module of the package imports first, alone, in a fresh Python process.

An import cycle shows only when the process starts from the right module (issue #13: importing
`dga_hf.ops.triton_backward` before `dga_hf.ops.triton_backend` failed with a partially initialised
module), so each module gets a process of its own. The modules are found by walking the source folders
that setup.cfg maps to packages (a module added or turned into a package is covered without editing
this file). ``TRITON_INTERPRET=1`` is set as the test suite runs: the Triton modules import on a machine
without a GPU.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _package_folders() -> dict[str, Path]:
    """Package name -> source folder: ``dga_hf`` and every ``package_dir`` entry of setup.cfg."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    folders = {"dga_hf": ROOT / "dga_hf"}
    for line in setup["options"]["package_dir"].strip().splitlines():
        package, folder = (part.strip() for part in line.split("="))
        folders[package] = ROOT / folder
    return folders


def _module_names() -> list[str]:
    names = set()
    for package, folder in _package_folders().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join((package, *parts)))
    return sorted(names)


MODULES = _module_names()


def test_walk_finds_the_modules_of_the_issue():
    assert {"dga_hf.ops.triton_backward", "dga_hf.ops.triton_backend", "dga_hf.rule", "dga_eval.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first_in_a_fresh_process(module):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-3000:]}"
