"""Every module of the project imports first, before any other module of the project.

An import cycle shows only when the imports start from the right module (issue #13: importing
`dga_hf.ops.triton_backward` before `dga_hf.ops.triton_backend` failed with a partially initialised
module). One fresh process imports the third-party libraries once, then, for each module, forgets every
project module (`sys.modules`) and imports that one: what the project's own import order does is the same as
in a process of its own, at a fraction of the cost (torch, transformers and triton load once). The modules
come from scripts/import_graph.py, which walks the folders setup.cfg maps to packages, so a module added or
turned into a package is covered without editing this file. ``TRITON_INTERPRET=1``: the Triton modules
import on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, load_script

MODULES = sorted(load_script("import_graph").modules())
PROJECT_PACKAGES = ("dga_hf", "dga_eval")

IMPORT_EACH_FIRST = r"""
import importlib, json, sys, traceback
import torch, transformers, triton  # third-party, loaded once
failures = {}
for module in sys.argv[2:]:
    for name in [n for n in sys.modules if n.split(".")[0] in sys.argv[1].split(",")]:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    except Exception:
        failures[module] = traceback.format_exc()[-3000:]
print(json.dumps(failures))
"""


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    """module -> traceback, for the modules whose import failed when it came first."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, ",".join(PROJECT_PACKAGES), *MODULES],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_walk_finds_the_modules_of_the_issue():
    assert {"dga_hf.ops.triton_backward", "dga_hf.ops.triton_backend", "dga_hf.rule", "dga_eval.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module, import_failures):
    assert module not in import_failures, f"import {module} failed when it came first:\n{import_failures[module]}"
