"""The offline long-text corpora: prose, Python's own `pydoc_data.topics` (topics joined in sorted key
order), and source code, the Python standard library's own source (a fixed list of modules, joined in that
order). A default chosen on one corpus over-fits it (shared/MEASUREMENTS.md: the previous default lost 3.5%
on the prose it was chosen on and 13% on held-out code), so settings are measured on both.

The code corpus is the source of the running Python: its text, hence the numbers, follow the Python
version (results record it).
"""

from __future__ import annotations

import functools
import importlib
import inspect

CORPORA = ("pydoc", "stdlib-code")
# large, long-lived modules of the standard library, in this order
CODE_MODULES = (
    "argparse", "ast", "asyncio.base_events", "collections", "configparser", "csv", "dataclasses", "difflib",
    "email.message", "enum", "functools", "inspect", "json.decoder", "logging", "pathlib", "pickle", "shutil",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest.case", "zipfile",
)


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=1)
def code_text() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


def corpus_text(name: str = "pydoc") -> str:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: the corpora are {CORPORA}")
    return pydoc_text() if name == "pydoc" else code_text()


def corpus_tokens(tokenizer, name: str = "pydoc") -> list[int]:
    return tokenizer(corpus_text(name), add_special_tokens=False)["input_ids"]
