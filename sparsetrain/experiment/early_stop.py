"""Algorithm 2 (the paper's entropy-based early stop), as a rule on a run's logged curve.

The study's loop asks it after every round (on the rows so far); the report replays it on every
finished curve. Control logic only: no tables, no plots.
"""
from __future__ import annotations

import math

from .metrics import fin, get

__all__ = ["algorithm2_stop", "EARLY_STOPS"]

EARLY_STOPS = ("none", "entropy")  # --early-stop: run to the wall, or Algorithm 2


def algorithm2_stop(rows, t_e=0.8, t_a=0.8) -> int | None:
    """Algorithm 2 (paper App. H) replayed on a curve; returns the round it stops at, None if it never does.

    Round 0 is the dense model: eta0 = its entropy_mean, best_acc = its val_acc. Phase 1 (lines 7-12), while
    the entropy stays above eta0*T_E: every round updates best_acc = max(best_acc, val_acc); the round whose
    entropy falls to <= eta0*T_E ends phase 1 and its accuracy is checked at once against the phase-2 loop
    condition (line 13). Phase 2: stop at the first round with val_acc <= best_acc*T_A; best_acc is frozen
    (the algorithm does not update it there). Online (loop.py, after each round on the rows so far)
    "stop now" is a return value equal to the last round. NaNs: a NaN entropy keeps phase 1 (no evidence of a
    drop), a NaN accuracy neither updates best_acc nor stops; a NaN dense entropy gives None.

    Deviation (the table's use): the paper's line 17 returns the last model, which by construction is the
    collapsed one (accuracy just fell below T_A*best); we report the best-validation model among the rounds
    <= the stop round instead; the FLOPs are those spent up to the stop round either way.
    """
    rows = sorted(rows, key=lambda r: r["round"])
    if not rows or not fin(get(rows[0], "entropy_mean")):
        return None
    eta0, best, phase1 = get(rows[0], "entropy_mean"), -math.inf, True
    for r in rows:
        acc, ent = get(r, "val_acc"), get(r, "entropy_mean")
        if phase1:
            if fin(acc):
                best = max(best, acc)
            if not fin(ent) or ent > eta0 * t_e:
                continue
            phase1 = False  # line 13 is checked with this round's accuracy right away
        if fin(acc) and acc <= best * t_a:
            return r["round"]
    return None
