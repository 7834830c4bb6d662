"""The errors of the dataset readers (datasets.py, images.py), and their one-line messages."""
from __future__ import annotations

__all__ = ["DatasetNotFound", "DataError", "brief_error", "download_note", "load_error"]


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
