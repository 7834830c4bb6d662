"""The teacher a distilled student learns from (study.py): the checkpoint a --teachers choice names in
the seed's teacher run, the FLOPs spent obtaining it, and the model loaded from it."""
from __future__ import annotations

import json
import os

from .checkpoint import load_model
from .files import CorruptFile, ReadFailed
from .integrity import delete_advice as _delete, round_misplaced
from .loop import PhaseError
from .metrics import read_metrics

__all__ = ["teacher_checkpoint", "load_teacher"]


def teacher_checkpoint(choice: str, teacher_dir: str) -> tuple[str, tuple]:
    """(checkpoint path, (exact, paper-convention) FLOPs spent obtaining it: the teacher run's
    cumulative cost up to the chosen round) for --teachers best | dense | PATH (cost 0)."""
    if choice not in ("best", "dense"):
        return choice, (0, 0)
    try:
        rows = read_metrics(os.path.join(teacher_dir, "metrics.csv"))
        with open(os.path.join(teacher_dir, "best.json")) as f:
            best = json.load(f)
        rnd = best["round"] if choice == "best" else 0
        cost = (int(rows[rnd]["cum_flops"]), int(rows[rnd].get("paper_cum_flops", 0)))
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:  # (written whole: edited or deleted by hand)
        _unreadable(e)
        raise PhaseError(f"{teacher_dir}: its best.json and metrics.csv do not name the teacher's {choice} round "
                         f"({type(e).__name__}: {e}); {_delete(teacher_dir)} to train the teacher again") from None
    path = os.path.join(teacher_dir, "ckpt", f"round_{rnd:02d}.pt")
    try:  # (a run of before 2026-12-05 has no checksums that verify_phase could miss)
        os.stat(path)
    except OSError as e:
        _unreadable(e)
        raise PhaseError(f"{path}, the teacher's {choice} round, is missing; {_delete(teacher_dir)} to train the "
                         "teacher again") from None
    return path, cost


def _unreadable(e: Exception) -> None:
    """An OSError that says nothing of the files' content (no permission, an I/O error) is ReadFailed, naming the
    file: the teacher may be intact, and deleting it (another run's, for a --reuse link) would lose it."""
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, NotADirectoryError)):
        raise ReadFailed(e.errno, e.strerror or str(e), e.filename) from e


def load_teacher(path: str, teacher_dir: str | None = None):
    """(the teacher model of a checkpoint (teacher_checkpoint), in eval mode, without gradients; its
    architecture's build_model arguments, for its dense cost). `teacher_dir`: the teacher run whose
    round checkpoint `path` is (--teachers best | dense), which it must be (check_round)."""
    model, _, payload = load_model(path)
    if teacher_dir is not None:
        check_round(path, payload)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, payload["arch"]


def check_round(path: str, payload: dict) -> None:
    """A teacher phase's ckpt/round_XX.pt must be that phase's round XX (integrity.round_misplaced): a round
    checkpoint copied in from another run, seed or phase with its .sha256 record, or two rounds swapped, pass
    the checksums."""
    if (wrong := round_misplaced(path, payload)) is not None:
        raise CorruptFile(f"{wrong}; {_delete(os.path.dirname(os.path.dirname(path)))} to train the teacher again")
