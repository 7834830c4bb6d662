"""What a phase folder must hold before a run resumes it or reads it (loop.run_phase calls
verify_phase on rank 0): every file still what was written (files.verify against its `.sha256`
record), no record without its file, no file without the record its phase's other files have, and
a finished phase whose best.json, metrics.csv and round checkpoints agree. A failed check is a
CorruptFile naming the file and what to delete."""
from __future__ import annotations

import glob
import json
import os
import re
import sys

from .files import CorruptFile, ReadFailed, verify
from .metrics import read_metrics

__all__ = ["verify_phase", "check_metrics_present", "where_of", "places_of", "check_place", "check_best_place",
           "delete_advice", "round_misplaced", "RESTART"]


def delete_advice(pdir: str, what: str = "") -> str:
    """What to delete to retrain a phase: its folder (`what` its name, e.g. "the phase folder "), or for one
    linked from another run (--reuse) that run's phase and the link (deleting the link alone, the next run with
    --reuse linked the same damaged phase again), or, leaving that run's folder as it is, the link alone and
    --reuse left out (the phase is trained here)."""
    if not os.path.islink(pdir):
        return f"delete {what}{pdir}"
    return (f"delete {os.path.realpath(pdir)}, the phase of another run that {pdir} links (--reuse), and the link "
            "(or, to leave that run's folder as it is, remove the link alone and run without --reuse)")


def where_of(state_path: str) -> str:
    """A phase's state.pt's place, run directory/seed<N>/phase: the run's name holds its settings' hash, so a
    state of the same model from another run, seed or phase (which the architecture check passes) is told apart."""
    return "/".join(os.path.normpath(os.path.abspath(state_path)).split(os.sep)[-4:-1])


# what to do about a state.pt that cannot be resumed (corrupt, another model's, another place's)
RESTART = "delete it and its .sha256 record to restart this phase from its first round"


def places_of(pdir: str) -> list[str]:
    """The places (where_of) a phase folder answers to: its real folder's first (a --reuse link is its run's),
    then its path's."""
    return [where_of(os.path.join(d, "state.pt")) for d in (os.path.realpath(pdir), pdir)]


def check_place(pdir: str, where) -> None:
    """A finished phase's best.json names the place it was trained in (`where`; None before 2026-12-06): a phase
    folder copied in from another run, seed or phase with its records is refused (one linked by --reuse is its
    run's)."""
    mine = places_of(pdir)
    if where is not None and where not in mine:
        raise CorruptFile(f"{os.path.join(pdir, 'best.json')} is the result of {where}, not of this phase ({mine[0]}): "
                          f"a phase folder copied from another run, seed or phase; {delete_advice(pdir)} to retrain "
                          "this phase")


def check_best_place(pdir: str) -> None:
    """check_place with the place a finished phase's best.json names, read before its files are verified (a whole
    phase folder copied: refused as one, before its metrics.csv's record, which names its place too); one that
    cannot be read is left to the checks that read it."""
    try:
        with open(os.path.join(pdir, "best.json")) as f:
            where = json.load(f).get("where")
    except (OSError, ValueError, AttributeError):
        return
    check_place(pdir, where)


def check_metrics_present(pdir: str) -> None:
    """CorruptFile for a finished phase (its best.json) whose metrics.csv is gone: the run refuses it, and its
    reports (--report-only, sweep report) dropped its rows without a word before 2026-12-07."""
    metrics = os.path.join(pdir, "metrics.csv")
    if os.path.lexists(os.path.join(pdir, "best.json")) and not os.path.exists(metrics):
        raise CorruptFile(f"{metrics}: metrics.csv missing (the phase is finished: best.json); "
                          f"{delete_advice(pdir, 'the phase folder ')} to retrain it")


def verify_phase(pdir: str, resumed=None) -> None:
    """Every file a resume relies on (state.pt) or a phase leaves as a result (ckpt/round_XX.pt, and
    metrics.csv and best.json once finished) must still be what was written (size and sha256
    recorded at write time; a round checkpoint whose record remains must exist, and be this phase's own round:
    _check_round_places), and a finished
    phase must hold a checkpoint for each of its rounds; else a clear error, whose advice for a phase linked
    from another run (--reuse) names that run's folder and the link (delete_advice). `resumed()`: the round
    state.pt resumes, whose checkpoint (a kill after it, before the next round's state) the resume writes anew:
    that one damaged is left to it, with a note."""
    state = os.path.join(pdir, "state.pt")
    ckpt = os.path.join(glob.escape(pdir), "ckpt")
    rounds = sorted({p[:-len(".sha256")] if p.endswith(".sha256") else p for p in
                     glob.glob(os.path.join(ckpt, "round_*.pt")) + glob.glob(os.path.join(ckpt, "round_*.pt.sha256"))})
    finished = os.path.lexists(os.path.join(pdir, "best.json"))
    results = [os.path.join(pdir, f) for f in ("metrics.csv", "best.json")] if finished else []
    for path in [state] + rounds + results:  # (a folder in a file's place: open() would raise IsADirectoryError)
        if os.path.isdir(path):
            raise CorruptFile(f"{path} is a folder, not the file the run wrote; {delete_advice(pdir)} to retrain this phase")
    check_metrics_present(pdir)  # (read by the report and a distillation's teacher cost)
    _check_records(pdir, state, rounds, results)
    try:
        if os.path.exists(state) or os.path.exists(state + ".sha256"):
            verify(state)  # (a record without its file: a write a kill cut short is finished, else lost)
    except CorruptFile as e:
        if not os.path.exists(state) and not finished:  # (run_phase drops a finished phase's state first)
            raise CorruptFile(f"{state} is missing but its record is here: the phase's progress was lost; delete "
                              f"{state}.sha256 to restart the phase from round 0") from None
        raise CorruptFile(f"{e}; {RESTART}") from None
    if finished:
        check_best_place(pdir)
    recorded = {}
    for path in rounds + results:
        try:
            recorded[path] = verify(path)
        except CorruptFile as e:
            redo = resumed() if resumed and not finished and path in rounds else None
            if isinstance(redo, int) and os.path.basename(path) == f"round_{redo:02d}.pt":
                print(f"note: {e}; round {redo} is being resumed: its measurement writes it anew", file=sys.stderr)
                continue
            what = "a finished phase's results" if finished else "a trained round"
            raise CorruptFile(f"{e}; {what} cannot be rebuilt: {delete_advice(pdir)} to retrain this phase") from None
    if results:
        _check_finished(pdir, results, rounds, old=not recorded[results[0]])
    _check_round_places(pdir, [p for p in rounds if recorded.get(p)], finished)  # (after best.json's place)
    if not results and os.path.isfile(os.path.join(pdir, "metrics.csv")) and (os.path.exists(state + ".sha256")
                                                                              or any(recorded.values())):
        # an unfinished phase: each row's round was checkpointed before the row was written (loop.run_phase)
        try:
            rows = read_metrics(os.path.join(pdir, "metrics.csv"))
        except (OSError, ValueError):
            return  # (rewritten from state.pt's rows at the next round)
        _check_rounds(pdir, rows, rounds)


def _check_round_places(pdir: str, rounds: list[str], finished: bool) -> None:
    """Each verified round checkpoint must be this phase's own round (the round and place, where_of, it records at
    save: round_misplaced, as teachers.check_round's, for every phase): a vanilla or distilled round copied in from another run,
    seed or phase with its .sha256 record passed its checksum. Checkpoints of before 2026-12-06 name no place
    (their round alone is checked); one torch cannot read is left to the load that needs it."""
    import torch  # (here only: the report checks places without torch)
    here = places_of(pdir)
    for path in rounds:
        try:  # (mmap: the tensors' bytes are not read, only the small pickle that names round and place)
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 (torch raises several types; verify already matched its record)
            continue
        if not re.fullmatch(r"round_(\d+)\.pt", os.path.basename(path)) or not isinstance(payload, dict):
            continue
        if (wrong := round_misplaced(path, payload, here)) is not None:
            what = "a finished phase's results" if finished else "a trained round"
            raise CorruptFile(f"{wrong}; {what} cannot be rebuilt: {delete_advice(pdir)} to retrain this phase")


def round_misplaced(path: str, payload: dict, here: list[str] | None = None) -> str | None:
    """How the round checkpoint `path` (its loaded `payload`) is not its phase's round XX, or None: the round and
    the phase's place (where_of: run directory/seed/phase) it records at save against its file name and folder
    (`here`: places_of that phase, when known). Checkpoints of before 2026-12-06 name no place (their round
    alone is checked); a phase linked from another run (--reuse) is that run's."""
    here = here or places_of(os.path.dirname(os.path.dirname(path)))
    name = re.fullmatch(r"round_(\d+)\.pt", os.path.basename(path))
    rnd = int(name[1]) if name else payload.get("round")
    got_rnd, got_where = payload.get("round", rnd), payload.get("where")
    if got_rnd != rnd or (got_where is not None and got_where not in here):
        return (f"{path} is round {got_rnd} of {got_where or 'a phase'}, not round {rnd} of this phase ({here[0]}): "
                "copied from another run, seed or phase, or swapped with another round's")
    return None


def _check_rounds(pdir: str, rows: list[dict], rounds: list[str]) -> None:
    """Every round metrics.csv has a row for must have its checkpoint."""
    lost = sorted({f"round_{r['round']:02d}.pt" for r in rows if isinstance(r.get("round"), int)}
                  - {os.path.basename(p) for p in rounds})
    if lost:
        raise CorruptFile(f"{pdir}: the checkpoint of {', '.join(lost)} is missing (and its checksum); "
                          f"{delete_advice(pdir)} to retrain this phase")


def _check_records(pdir: str, state: str, rounds: list[str], results: list[str]) -> None:
    """Since 2026-12-01 every checkpoint (round_XX.pt, state.pt) is written with its record, and since
    2026-12-05 a finished phase's metrics.csv and best.json too: once a phase holds one record, a
    checkpoint without its record was damaged or replaced (deleting the record turned the check off)."""
    def has(path):
        return os.path.exists(path + ".sha256")
    if any(map(has, [state] + rounds + results)):
        for path in [state] + rounds:
            if os.path.exists(path) and not has(path):
                what = ("delete it to restart this phase from its first round" if path == state
                        else f"{delete_advice(pdir)} to retrain this phase")
                raise CorruptFile(f"{path}: its .sha256 record is missing (the phase's other files have theirs), so "
                                  f"it cannot be checked; {what}")
    if any(map(has, results)):  # (a phase finished before 2026-12-05 has neither)
        for path in results:
            if not has(path):
                raise CorruptFile(f"{path}: its .sha256 record is missing (the phase's other files have theirs), so "
                                  f"it cannot be checked; {delete_advice(pdir)} to retrain this phase")


def _check_finished(pdir: str, results: list[str], rounds: list[str], old: bool) -> None:
    """best.json's round is metrics.csv's best row (is_best), and every row has its checkpoint
    (runs before 2026-12-05 kept no checksum of their metrics: their rows are not checked so)."""
    metrics, best_file = results
    try:
        rows = read_metrics(metrics)
        with open(best_file) as f:
            best = json.load(f)
        best, where = best["round"], best.get("where")
    except (OSError, ValueError, KeyError, TypeError) as e:
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):  # (EACCES, EIO: not damaged)
            raise ReadFailed(e.errno, e.strerror or str(e), e.filename or metrics) from e
        raise CorruptFile(f"{pdir}: its metrics.csv or best.json cannot be read ({type(e).__name__}: {e}); "
                          f"{delete_advice(pdir)} to retrain this phase") from None
    check_place(pdir, where)
    marked = [r["round"] for r in rows if r.get("is_best") == 1]
    if best not in [r["round"] for r in rows] or (marked and marked != [best]):
        raise CorruptFile(f"{best_file} names round {best}, but {metrics}'s best round is "
                          f"{marked[0] if marked else 'none of its rows'}; {delete_advice(pdir)} to retrain this phase")
    if not old:
        _check_rounds(pdir, rows, rounds)
