"""Algorithm 2 (the paper's entropy-based early stop), as a rule on a run's logged curve.

The study's loop asks it after every round (on the rows so far); the report replays it on every
finished curve. Control logic only: no tables, no plots.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from ..engine.args import is_int
from .metrics import fin

__all__ = ["algorithm2_stop", "reference_known", "EARLY_STOPS", "RULES"]

# --early-stop: run to the wall; Algorithm 2 as written (entropy relative to the dense model's); or
# the same with the entropy relative to its running peak
RULES = ("entropy", "entropy-peak")
EARLY_STOPS = ("none", *RULES)


def _value(row, key: str) -> float:
    """row[key] as a float: any real number (numpy's float32 too, which the metrics' get() read as
    missing: the rule then never fired); a missing, None or unparsed (str: read_metrics' torn cell)
    value is NaN; anything else (a tensor) is refused."""
    v = row.get(key)
    if isinstance(v, numbers.Real):
        return float(v)
    if v is None or isinstance(v, str):
        return math.nan
    raise TypeError(f"round {row.get('round')!r}: {key} must be a number, got {type(v).__name__} "
                    "(a tensor: take .item())")


def _rows(rows) -> list:
    """The curve as a list of row dicts, each with its own int "round" (else a KeyError, or a
    comparison error from sorted(), or two rows of one round replayed both)."""
    if isinstance(rows, (Mapping, str, bytes)) or not isinstance(rows, Iterable):
        raise TypeError(f"rows must be an iterable of row dicts (a curve), got {type(rows).__name__}")
    rows, seen = list(rows), set()
    for r in rows:
        if not isinstance(r, Mapping):
            raise TypeError(f"rows must hold dicts, got a {type(r).__name__}")
        k = r.get("round")
        if not is_int(k):
            raise ValueError(f"every row needs an int 'round', got {k!r}")
        if k in seen:
            raise ValueError(f"round {k} appears twice in rows: one row per round")
        seen.add(k)
    return rows


def reference_known(rows) -> bool:
    """Whether the curve's round 0 (the dense model) has a finite entropy eta_0, the reference of both
    rules: without it algorithm2_stop's None means "cannot run" (the stop is unknown), not "never stops"."""
    rows = _rows(rows)
    first = min(rows, key=lambda r: r["round"]) if rows else None
    return first is not None and first["round"] == 0 and fin(_value(first, "entropy_mean"))


def algorithm2_stop(rows, t_e=0.8, t_a=0.8, rule: str = "entropy", falls: int = 1) -> int | None:
    """Algorithm 2 (paper App. H) replayed on a curve; returns the round it stops at, None if it never does.

    Round 0 is the dense model: best_acc starts at its val_acc. Phase 1 (lines 7-12) lasts while the
    entropy eta_k stays above the reference: every round updates best_acc = max(best_acc, val_acc).

    * rule "entropy" (the paper's, as written): the reference is T_E * eta_0, the dense model's entropy.
    * rule "entropy-peak" (ours): the reference is T_E * max_{j<=k} eta_j, the running peak, and phase 1
      ends only after `falls` consecutive rounds of falling entropy (eta_k < eta_{k-1}). Where the
      entropy rises through the critical phase, peaks, then falls without going below T_E * eta_0
      (the CPU studies here), the paper's rule never fires; this one fires on the fall.

    The round whose entropy ends phase 1 has its accuracy checked at once against the phase-2 loop
    condition (line 13). Phase 2: stop at the first round with val_acc <= best_acc * T_A; best_acc is
    frozen there (the algorithm does not update it). Online (loop.py, after each round on the rows so
    far) "stop now" is a return value equal to the last round. NaNs: a NaN entropy keeps phase 1 (no
    evidence of a drop) and breaks a run of falls; a NaN accuracy neither updates best_acc nor stops;
    a NaN dense entropy gives None (the rule cannot run: reference_known tells it from "never"); a
    curve without round 0 (the dense model) is a ValueError.

    The report shows both the model at the stop (the paper's line 17 returns it: by construction the
    one whose accuracy just fell) and the best-validation model among the rounds <= the stop; the
    FLOPs are those spent up to the stop round either way.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not is_int(falls) or falls < 1:  # (numpy ints too)
        raise ValueError(f"falls must be an int >= 1, got {falls!r}")
    for name, t in (("t_e", t_e), ("t_a", t_a)):  # (fractions: 80 for 80% would stop at once)
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 < float(t) <= 1:  # (numpy floats too)
            raise ValueError(f"{name} must be a fraction in (0, 1], got {t!r}")
    rows = sorted(_rows(rows), key=lambda r: r["round"])
    if rows and rows[0]["round"] != 0:  # (eta_0 and the first best_acc were a later round's, silently)
        raise ValueError(f"rows must start at round 0, the dense model (Algorithm 2's reference entropy eta_0 and "
                         f"first best_acc, lines 3-4), got round {rows[0]['round']} first: pass the whole curve")
    if not rows or not fin(_value(rows[0], "entropy_mean")):
        return None
    eta0 = _value(rows[0], "entropy_mean")
    best, peak, prev, run, phase1 = -math.inf, eta0, eta0, 0, True
    for r in rows:
        acc, ent = _value(r, "val_acc"), _value(r, "entropy_mean")
        if phase1:
            if fin(acc):
                best = max(best, acc)
            if not fin(ent):
                run = 0
                continue
            if rule == "entropy":
                low = ent <= eta0 * t_e
            else:
                peak, run = max(peak, ent), run + 1 if ent < prev else 0
                low = run >= falls and ent <= peak * t_e
            prev = ent
            if not low:
                continue
            phase1 = False  # line 13 is checked with this round's accuracy right away
        if fin(acc) and acc <= best * t_a:
            return r["round"]
    return None
