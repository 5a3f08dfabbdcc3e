"""Kept only for tests/test_decoding.py, whose rewrite (another branch) still imports `ARCHS` from here; the
architectures are defined in helpers.py. Delete this file once test_decoding.py imports helpers."""

from helpers import ARCHS  # noqa: F401
