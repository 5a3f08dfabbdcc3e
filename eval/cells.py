"""The cells of a `dga-eval` run on disk, so that a run stopped part-way (a session that ends, a crash, Ctrl-C)
goes on where it stopped: `dga-eval ... --out DIR --resume` (docs/evaluation.md).

A cell is one (task, length, configuration) of a run: for passkey, copy, perplexity and speed the metrics and
per-sample details of that length's samples under that configuration; for RULER the scores of every RULER task
of the run at that length (eval/ruler.py evaluates a length's tasks together under one configuration). Each
finished cell is written at once, atomically (a temporary file, then a rename: a kill leaves the old file or the
new one, never half of one), to `OUT/cells/<task>/<length>/<configuration>.json`, with the fingerprint of
everything that determines it:

- the task's settings (its `lengths` left out: a run that adds a length keeps the other lengths' cells) and the
  length;
- the configuration's resolved settings (every `DGAConfig` field and the decoding cache, or "dense"), not its
  name;
- the run: the model (its name, type, parameter count and a digest of its weights, `models.weights_digest`:
  other weights under the same path run every cell again), dtype, seed, device type and name, device map, and
  the number of processes.

The versions of dga-hf (and its commit), torch, transformers and lm-eval are not in it: a long run is resumed
over sessions of a repository that keeps changing, and a commit in the fingerprint would throw every cell away at
each commit although nearly none changes what a cell measures. What changes the attention is a `DGAConfig`
setting, and those are in it; a code change that moves the numbers without changing a setting is not seen, so
such a run starts in a new OUT. Each cell records the versions it was computed with, and when.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from .runconfig import DENSE, Setting

CELLS_FOLDER = "cells"


@dataclass(frozen=True)
class CellKey:
    task: str
    length: int
    config: str

    def __str__(self) -> str:
        return f"{self.task}/{self.length}/{self.config}"


def write_atomically(path: Path, content: str | bytes) -> None:
    """`path` holds `content` (text, or bytes: a plot) or what it held before, whenever the process is killed: a
    temporary file of the same folder, flushed to disk, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb" if isinstance(content, bytes) else "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def refusal(out: Path, resume: bool) -> str | None:
    """Why a run may not start in `out` (None: it may): without `resume`, `out` must hold no cells, so that cells
    of two runs are never mixed."""
    if resume:
        return None
    written = sorted((out / CELLS_FOLDER).glob("*/*/*.json"))
    if not written:
        return None
    return (f"{out} already holds {len(written)} cells of an earlier run (in {out / CELLS_FOLDER}): pass --resume to "
            f"reuse those whose settings match and run the rest, or choose another --out")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class CellStore:
    """The cells of one run in `out/cells`. `run` holds the run's part of every fingerprint (model, dtype, seed,
    device, device map, processes), `versions` the package versions recorded with each cell."""

    def __init__(self, out: Path, run: dict[str, Any], versions: dict[str, Any]):
        self.folder = Path(out) / CELLS_FOLDER
        self.run = run
        self.versions = versions

    def path(self, key: CellKey) -> Path:
        # a configuration's name is free text ("n=8", "a/b"): quoted into one file name
        return self.folder / key.task / str(key.length) / f"{quote(key.config, safe='+=,@')}.json"

    def fingerprint(self, key: CellKey, task_spec: dict, setting: Setting) -> dict:
        """Everything that determines the cell (the module docstring says what, and why not the versions), as
        JSON gives it back (tuples as lists), so that it compares equal to a stored one."""
        fingerprint = {
            "run": self.run,
            "task": key.task,
            "task_spec": {name: value for name, value in task_spec.items() if name != "lengths"},
            "length": key.length,
            "config": DENSE if setting.dga is None else setting.describe(),
        }
        return json.loads(json.dumps(fingerprint, default=str))

    def save(self, key: CellKey, fingerprint: dict, cell: dict) -> dict:
        """Write the cell with its fingerprint; returns the cell as it reads back (JSON), which is what a resumed
        run will hold."""
        record = {"task": key.task, "length": key.length, "config": key.config, "written": now(),
                  "versions": self.versions, "fingerprint": fingerprint, "cell": cell}
        text = json.dumps(record, indent=1, default=str)
        write_atomically(self.path(key), text)
        return json.loads(text)["cell"]

    def reusable(self, fingerprints: dict[CellKey, dict]) -> dict[CellKey, dict]:
        """{key: {"cell", "written"}} of the stored cells a resumed run keeps: those whose fingerprint is the one
        given. Every other stored cell is run again, and the log says why: other settings (which ones), an
        error recorded in place of results (often the machine's: out of memory, a missing package), or a file
        that does not read."""
        reused = {}
        for key, fingerprint in fingerprints.items():
            path = self.path(key)
            if not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
                stored, cell, written = record["fingerprint"], record["cell"], record["written"]
            except (ValueError, KeyError, TypeError) as error:
                log(f"cell {key} in {path} does not read ({error!r}): running it again")
                continue
            if stored != fingerprint:
                changed = ", ".join(differences(stored, fingerprint))
                log(f"cell {key} of {written} was computed with other settings ({changed}): running it again")
            elif "error" in cell:
                last = cell["error"].strip().splitlines()[-1:] or [""]
                log(f"cell {key} of {written} recorded an error ({last[0]}): running it again")
            else:
                reused[key] = {"cell": cell, "written": written}
        return reused


def differences(stored: Any, wanted: Any, where: str = "") -> Iterator[str]:
    """The dotted names of the fields in which two fingerprints differ, with both values at the leaves."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for name in [*stored, *(name for name in wanted if name not in stored)]:
            yield from differences(stored.get(name), wanted.get(name), f"{where}.{name}" if where else name)
    elif stored != wanted:
        yield f"{where}: {json.dumps(stored)} -> {json.dumps(wanted)}"


def log(message: str) -> None:
    print(f"dga-eval: {message}", file=sys.stderr, flush=True)
