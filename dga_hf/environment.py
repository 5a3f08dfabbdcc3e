"""What a recorded result ran on (the versions written next to every JSON result), and the one
Transformers keyword that changed name across the supported versions."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable

import torch


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Python's version and each package's installed version ("not installed" when absent)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def dtype_argument(dtype: torch.dtype) -> dict:
    """`from_pretrained`/`from_config` take `dtype` since transformers 4.56 and `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}
