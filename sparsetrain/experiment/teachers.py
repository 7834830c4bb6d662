"""The teacher a distilled student learns from (study.py): the checkpoint a --teachers choice names in
the seed's teacher run, the FLOPs spent obtaining it, and the model loaded from it."""
from __future__ import annotations

import json
import os

from .checkpoint import load_model
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
        raise PhaseError(f"{teacher_dir}: its best.json and metrics.csv do not name the teacher's {choice} round "
                         f"({type(e).__name__}: {e}); delete that folder to train the teacher again") from None
    path = os.path.join(teacher_dir, "ckpt", f"round_{rnd:02d}.pt")
    if not os.path.exists(path):  # (a run of before 2026-12-05 has no checksums that verify_phase could miss)
        raise PhaseError(f"{path}, the teacher's {choice} round, is missing; delete {teacher_dir} to train the "
                         "teacher again")
    return path, cost


def load_teacher(path: str):
    """(the teacher model of a checkpoint (teacher_checkpoint), in eval mode, without gradients; its
    architecture's build_model arguments, for its dense cost)."""
    model, _, payload = load_model(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, payload["arch"]
