"""Files that survive a kill: every file a run writes goes through `atomic_write`.

The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
the target (`os.replace` is atomic on POSIX within one filesystem): a reader sees the old file or
the new one, never a torn one. No torch import here: the report uses it too.
"""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from typing import Callable

__all__ = ["atomic_write", "write_json", "write_csv", "git_commit"]


def atomic_write(path: str, data: str | bytes | Callable, *, binary: bool | None = None) -> None:
    """Write `data` (text, bytes, or a function writing to an open file) to `path` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    binary = isinstance(data, bytes) if binary is None else binary
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1))


def write_csv(path: str, rows: list[dict]) -> None:
    """Rows as CSV; the header is the union of the rows' keys in first-seen order."""
    keys = list(rows[0].keys()) if rows else []
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def git_commit(short: bool = False) -> str:
    """The commit of the sparsetrain checkout this code runs from ("unknown" outside git)."""
    try:
        return subprocess.check_output(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                                       cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
