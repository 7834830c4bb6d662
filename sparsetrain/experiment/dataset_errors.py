"""The errors of the dataset readers (datasets.py, images.py), and their one-line messages."""
from __future__ import annotations

__all__ = ["DatasetNotFound", "DataError", "brief_error", "download_note"]


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
