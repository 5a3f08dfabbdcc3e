"""The offline long-text corpus: Python's own `pydoc_data.topics`, topics joined in sorted key order."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_tokens(tokenizer) -> list[int]:
    return tokenizer(pydoc_text(), add_special_tokens=False)["input_ids"]
