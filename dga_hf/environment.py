"""What a recorded result ran on: the versions written next to every JSON result."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """Python's version and each package's installed version ("not installed" when absent)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
