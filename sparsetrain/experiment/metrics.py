"""Reading a run directory: RUN/config.json and RUN/seed{S}/{phase}/metrics.csv.

Phase "teacher", "vanilla" (absent when the student is the teacher's model: the teacher run is then
the vanilla run) or "distill-<teacher>". Works on partial runs (any subset of seeds/phases/rounds)
and on NaNs.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re

from .files import CorruptFile

__all__ = ["read_metrics", "load_run", "fin", "get", "NAN", "teacher_tag", "best_index"]

_INT_COLS = {"seed", "round", "epochs", "sparse_layers", "is_best"}
_STR_COLS = {"phase"}
# what the report's tables and plots cannot do without (every metrics.csv a study wrote has them)
_CURVE_COLS = ("round", "sparsity", "val_acc", "test_acc", "entropy_mean", "cum_flops")
NAN = float("nan")


def teacher_tag(choice: str) -> str:
    """A --teachers choice's phase name after "distill-": best, dense, or path-<file stem>."""
    return choice if choice in ("best", "dense") else "path-" + os.path.splitext(os.path.basename(choice))[0]


def fin(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def get(row: dict, key: str, default=NAN):
    v = row.get(key, default)
    return v if isinstance(v, (int, float)) else default


def best_index(rows) -> int | None:
    """Index of the best-validation round (w_best: the first of ties) among the rows with a finite
    val_acc; None when none has one (a NaN compared as never better, so a NaN first row won)."""
    scored = [i for i, r in enumerate(rows) if fin(get(r, "val_acc"))]
    return max(scored, key=lambda i: (rows[i]["val_acc"], -i)) if scored else None


def _conv(col: str, v):
    if col in _STR_COLS or v is None:
        return v
    if v == "":
        return NAN
    try:
        return int(float(v)) if col in _INT_COLS else float(v)
    except (ValueError, OverflowError):  # (an int column's inf or 1e999: an OverflowError traceback, as a torn cell)
        return v


def read_metrics(path, require=()) -> list[dict]:
    """Rows of a metrics.csv, types converted (int columns int, others float, phase str), sorted by round;
    a round written twice keeps its last row; a row without a parsable round (torn write) is skipped.
    CorruptFile when the header lacks a column of `require` (a foreign CSV read as no rows or all-NaN)."""
    by_round: dict[int, dict] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in require if reader.fieldnames and c not in reader.fieldnames]
        if missing:
            raise CorruptFile(f"{path} is not a metrics.csv of a sparsetrain run: no column(s) {', '.join(missing)} "
                              f"(its columns: {', '.join(reader.fieldnames)}); move it out of the run directory")
        for raw in reader:
            row = {k: _conv(k, v) for k, v in raw.items() if k is not None}
            if isinstance(row.get("round"), int):
                by_round[row["round"]] = row
    return [by_round[k] for k in sorted(by_round)]


def load_run(run_dir) -> dict:
    """{"config": config.json (or {}), "curves": {phase: {seed: rows}}, "running": {phase: [seeds whose
    phase has not finished (no best.json)]}, "ended": {phase: {seed: why a finished phase ended (best.json's
    "stop": "wall", "nothing to prune" or "early stop", the first two with "; " and why an --early-stop rule could not run; None before 2026-12-06 or unreadable)}}, "same_as": {phase: {seed: the phase of that seed whose
    directory this one links to}}}; empty curves are left out. (A seed's distill-best links to its
    distill-dense when the best-validation teacher is round 0: one teacher checkpoint, one student run.)
    CorruptFile for a metrics.csv without the columns of a curve (_CURVE_COLS) or without round 0, and for
    a curve in a seed folder the study did not write (_check_seed)."""
    config: dict = {}
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        pass
    curves: dict = {}
    running: dict = {}
    ended: dict = {}
    same_as: dict = {}
    for d in sorted(os.listdir(run_dir)):
        m, sd = re.fullmatch(r"seed(\d+)", d), os.path.join(run_dir, d)
        if not m or not os.path.isdir(sd):
            continue
        for phase in sorted(os.listdir(sd)):
            p = os.path.join(sd, phase, "metrics.csv")
            rows = read_metrics(p, _CURVE_COLS) if os.path.isfile(p) else []
            if rows:
                _check_seed(os.path.join(sd, phase), d, int(m.group(1)), rows, config)
                if rows[0]["round"] != 0:  # (Algorithm 2's reference entropy and the labels' a_0 are round 0's)
                    raise CorruptFile(f"{p} has no row of round 0, the dense model (its first is round "
                                      f"{rows[0]['round']}): restore it, or remove the phase folder to retrain it")
                curves.setdefault(phase, {})[int(m.group(1))] = rows
                if not os.path.isfile(os.path.join(sd, phase, "best.json")):
                    running.setdefault(phase, []).append(int(m.group(1)))
                else:
                    ended.setdefault(phase, {})[int(m.group(1))] = _stop_of(os.path.join(sd, phase, "best.json"))
                real = os.path.realpath(os.path.join(sd, phase))
                # a link to a directory of another phase's name: the same run as the sibling phase resolving
                # there (its owner; itself a link too where --reuse linked every phase of the seed)
                if os.path.islink(os.path.join(sd, phase)) and os.path.basename(real) != phase:
                    twin = [q for q in sorted(os.listdir(sd)) if q != phase
                            and os.path.realpath(os.path.join(sd, q)) == real]
                    twin.sort(key=lambda q: q != os.path.basename(real))
                    if twin:
                        same_as.setdefault(phase, {})[int(m.group(1))] = twin[0]
    return {"config": config, "curves": curves, "running": running, "ended": ended, "same_as": same_as}


def _check_seed(pdir: str, name: str, seed: int, rows: list, config) -> None:
    """CorruptFile for a curve in a seed folder the study did not write: a name it never gives (seed01 was read
    as seed 1, over or under seed1's curve), a seed the run was not started for (config.json's seeds, which
    name the run) or rows of another seed (a folder copied by hand: one more seed in the means and the count)."""
    if name != f"seed{seed}":
        raise CorruptFile(f"{pdir} holds a curve, but {name} is not a seed folder the study writes (seed{seed} "
                          "is): rename it, or move it out of the run directory")
    seeds = config.get("seeds") if isinstance(config, dict) else None
    if isinstance(seeds, list) and seed not in seeds:  # (a run without the record, an older one's: any seed)
        raise CorruptFile(f"{pdir} holds a curve of seed {seed}, which the run was not started for (its seeds: "
                          f"{seeds}, config.json): a folder copied in from another run; move it out of the run directory")
    other = sorted({r["seed"] for r in rows if type(r.get("seed")) is int and r["seed"] != seed})
    if other:
        raise CorruptFile(f"{os.path.join(pdir, 'metrics.csv')} holds rows of seed {other[0]}, not of seed {seed}: a "
                          "folder copied from another seed; move it out of the run directory")


def _stop_of(path: str):
    """best.json's "stop" (loop.should_stop's reason the phase ended), None where absent or unreadable."""
    try:
        with open(path) as f:
            stop = json.load(f).get("stop")
    except (OSError, ValueError, AttributeError):  # (AttributeError: JSON that is not an object)
        return None
    return stop if isinstance(stop, str) else None
