"""The errors of the run's files (files.py re-exports them) and `remove_file`, which raises one: each prints
as one line from the CLI (exit 2), where any other OSError is a bug and keeps its traceback."""
from __future__ import annotations

import os

__all__ = ["CorruptFile", "WriteFailed", "ReadFailed", "RemoveFailed", "remove_file", "Busy", "EXIT_BUSY"]


class CorruptFile(ValueError):
    """A file no longer matches the size and checksum recorded when it was written."""


class WriteFailed(OSError):
    """A file of the run could not be written (disk full, read-only folder, I/O error): raised by
    atomic_write only, so the CLI prints one line (exit 2) for these and still a traceback for any
    other OSError (a bug). The finished epochs are on disk: the same command resumes."""

    op, advice = "write", "free space (or fix permissions) and run the same command to resume"

    def __str__(self):
        return f"cannot {self.op} {self.filename}: {self.strerror}; {self.advice}"


class ReadFailed(WriteFailed):
    """A file of the run could not be read (no permission, an I/O error): not a corrupt file, nothing to delete."""
    op, advice = "read", "fix its permissions (or the disk) and run the same command again"


class RemoveFailed(WriteFailed):
    """A file of the run could not be removed (a read-only folder, an I/O error): it needs no space."""
    op, advice = "remove", "fix the folder's permissions (or the disk) and run the same command"


def remove_file(path: str, failed: type[WriteFailed] = WriteFailed) -> None:
    """os.remove(path), a missing file being fine; any other OSError is `failed` naming the file (one line
    from the CLI, as a write's; not exists() then remove(): a --reuse-linked phase is another run's too)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise failed(e.errno, e.strerror or str(e), path) from e


class Busy(RuntimeError):
    """Another process holds the folder's lock (the same run started twice)."""


EXIT_BUSY = 75  # the study's exit code for Busy (EX_TEMPFAIL, sysexits.h): a sweep waits for that process
