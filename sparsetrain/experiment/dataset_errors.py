"""The errors of the dataset readers (datasets.py, images.py), and their one-line messages."""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["DatasetNotFound", "DataError", "brief_error", "download_note", "load_error", "warn_caller"]

# the files of the dataset readers, load_dataset's included: a warning points past their frames
_HERE = os.path.dirname(os.path.abspath(__file__))
_READERS = {os.path.join(_HERE, f) for f in ("data.py", "datasets.py", "dataset_checks.py", "dataset_errors.py",
                                             "images.py")}


class DatasetNotFound(FileNotFoundError):
    """The dataset's files are missing (and could not be downloaded)."""


class DataError(ValueError):
    """A dataset file is unreadable or inconsistent (truncated, wrong format, counts that disagree)."""


def brief_error(e: BaseException) -> str:
    """An exception as one short line (torch's load errors run over many lines)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def download_note(download: bool, err) -> str:
    """The not-found message's note on the download: its error text, or that none was allowed."""
    return f" (download attempt failed: {err})" if download and err else (
        "" if download else " (download=False)")


def load_error(e: BaseException) -> str:
    """torch.load's error in one line, without its advice to retry with weights_only=False or to allow
    the global (unsafe for a downloaded file, and no help for a damaged one)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(advice)]
    if not lines:
        return f"{type(e).__name__}: empty or truncated" if isinstance(e, EOFError) else brief_error(e)
    return f"{type(e).__name__}: {lines[0].split('. ')[0].rstrip('.')[:200]}"  # (its first sentence: advice follows)


def warn_caller(message: str) -> None:
    """warnings.warn(message) pointing at the first frame outside the dataset readers: the code that called
    load_dataset (the user's), however deep in the readers it is raised (a fixed stacklevel pointed one warning
    at a line of datasets.py)."""
    frame, level = sys._getframe(1), 2  # (stacklevel 2: this function's caller)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) in _READERS:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
