"""Which phases a run trains, and sharing finished phases between run directories.

A study's phases per seed: "teacher", "vanilla" (only when the student differs from the teacher
run: another model or schedule) and "distill-<teacher>". A phase's results depend on the data
(dataset, noise, split, seed), the pruning procedure, its own model and schedule and, for a
distilled student, its teacher (a --teachers PATH by the file's bytes): `phase_key` hashes exactly
those settings, leaving out those a run ignores (a run's own config.json records the fingerprints
of the teacher files it used). A run given `--reuse DIR`
links (a relative symlink) every phase that DIR finished under the same key instead of training
it again: a sweep trains each teacher once and every student run that needs it links it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re

from .config import ADDED_DEFAULTS, Config, config_from_json, ignored_settings
from .files import CorruptFile, make_folder, make_link
from .metrics import teacher_tag
from .models import canonical_name, one_spelling

__all__ = ["phase_names", "needed_phases", "phase_settings", "phase_key", "teacher_fingerprint", "link_reused",
           "prepare_phases", "check_linked", "recorded_labels", "phase_done", "PhaseMissing", "other_runs_hint",
           "settings_differ", "spelled_twin"]

# settings every phase of a seed depends on: the data and the pruning procedure (those that apply:
# _applying); a distilled student also on its teacher checkpoint's bytes (teacher_fingerprint)
_DATA_KEYS = ("dataset", "eps", "noise", "val_fraction", "clean_val", "subset", "label_file")
_PRUNE_KEYS = ("rate", "wall", "scope", "structure", "block", "perturb", "engine", "momentum", "drop")
_STUDENT_KEYS = ("early_stop", "t_e", "t_a", "stop_falls")


class PhaseMissing(Exception):
    """A phase this run needs but does not train is neither finished here nor reusable."""


def phase_names(cfg: Config) -> list[str]:
    """Every phase of the full study, in training order."""
    return ["teacher"] + (["vanilla"] if cfg.separate_vanilla() else []) + \
        [f"distill-{teacher_tag(t)}" for t in cfg.teachers]


def needed_phases(cfg: Config) -> tuple[list[str], list[str]]:
    """(phases this run trains (--phases), phases they read without training them). A distilled
    student reads its teacher run; a vanilla student that is the teacher run is the teacher phase."""
    train = [p for p in phase_names(cfg) if p.split("-")[0] in cfg.phases]
    if "vanilla" in cfg.phases and not cfg.separate_vanilla() and "teacher" not in train:
        train.insert(0, "teacher")  # the vanilla student *is* the teacher run: training it trains the teacher
    reads = ["teacher"] if any(p in ("distill-dense", "distill-best") for p in train) and "teacher" not in train \
        else []
    return train, reads


def phase_settings(cfg: Config) -> dict:
    """Every phase the study runs per seed, fully resolved: {phase: settings} (for --print-config)."""
    common = {k: getattr(cfg, k) for k in ("rate", "wall", "scope", "structure", "perturb", "engine")}
    out = {"teacher": {"model": cfg.model, **dataclasses.asdict(cfg.hyper("teacher")), **common,
                       "early_stop": "none (the teacher is a full run)", "role": "teacher"}}
    student = {"model": cfg.resolved_student(), **dataclasses.asdict(cfg.hyper("student")), **common,
               "early_stop": cfg.early_stop, "t_e": cfg.t_e, "t_a": cfg.t_a, "stop_falls": cfg.stop_falls,
               "role": "student"}
    out["vanilla"] = {**student, "run": "its own run"} if cfg.separate_vanilla() else {
        **out["teacher"], "run": "the teacher run (a full run: no early stop)"}
    for t in cfg.teachers:
        out[f"distill-{teacher_tag(t)}"] = {**student, "teacher": t, "alpha": cfg.alpha, "tau": cfg.tau}
    return out


def _hyper(cfg: Config, role: str) -> dict:
    hp = dataclasses.asdict(cfg.hyper(role))
    if f"{role}_rewind_iter" in ignored_settings(cfg):  # (only --perturb rewind reads it)
        del hp["rewind_iter"]
    return hp


def _applying(cfg: Config, keys) -> dict:
    """cfg's settings `keys`, less those this configuration ignores: a run that ignores a setting
    gives the same results whatever it says, so it must not stop a reuse."""
    skip = set(ignored_settings(cfg)) & set(_PRUNE_KEYS)  # (scope, block, engine; the data keys all count)
    if cfg.early_stop == "none":
        skip.update(("t_e", "t_a", "stop_falls"))
    elif cfg.early_stop != "entropy-peak":
        skip.add("stop_falls")
    return {k: getattr(cfg, k) for k in keys if k not in skip}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def teacher_fingerprint(path: str) -> str:
    """sha256 of a --teachers checkpoint's bytes: a student distilled from it depends on what the
    file holds, not on its name (a retrained teacher saved over it is another teacher). A file that
    cannot be read (a sweep's plan: the run itself will say why) is named by its path."""
    try:
        st = os.stat(path)
        return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return f"unreadable {os.path.abspath(path)}"


def phase_key(cfg: Config, phase: str, seed: int, teachers: dict | None = None) -> str:
    """A hash of every setting the phase's results depend on (nothing else: not alpha for the
    teacher, not the other teachers of a distilled student, no setting the run ignores).
    `teachers`: {--teachers PATH: its fingerprint} as a run recorded them (its config.json); None:
    this process's files (teacher_fingerprint). A PATH without one matches nothing."""
    common = _applying(cfg, _DATA_KEYS + _PRUNE_KEYS)
    common.update({k: getattr(cfg, k) for k, d in ADDED_DEFAULTS.items() if getattr(cfg, k) != d})  # (as the run's name)
    teacher = {"model": canonical_name(cfg.model), "hyper": _hyper(cfg, "teacher")}
    student = {"model": canonical_name(cfg.resolved_student()), "hyper": _hyper(cfg, "student"),
               **_applying(cfg, _STUDENT_KEYS)}
    if phase == "teacher":
        own = {"teacher": teacher}
    elif phase == "vanilla":
        own = {"student": student}
    elif phase.startswith("distill-"):
        choice = next(t for t in cfg.teachers if f"distill-{teacher_tag(t)}" == phase)
        if choice in ("dense", "best"):
            source = teacher
        elif teachers is None:
            source = teacher_fingerprint(choice)
        else:
            source = teachers.get(choice, f"unrecorded {choice}")
        own = {"student": student, "alpha": cfg.alpha, "tau": cfg.tau, "choice": teacher_tag(choice),
               "teacher": source}
    else:
        raise ValueError(f"phase must be teacher, vanilla or distill-<teacher>, got {phase!r}")
    doc = json.dumps({"seed": seed, "phase": phase.split("-")[0], **common, **own}, sort_keys=True, default=list)
    return hashlib.sha256(doc.encode()).hexdigest()


def phase_done(pdir: str) -> bool:
    """A phase is finished once its best.json exists (written last, loop.finish)."""
    return os.path.isfile(os.path.join(pdir, "best.json"))


def _config_of(run_dir: str) -> tuple[Config | None, str | None, dict]:
    """(its Config, its data fingerprint, its --teachers PATH fingerprints) from a run's config.json."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            d = json.load(f)
        return config_from_json(d), d.get("data_fingerprint"), d.get("teacher_fingerprints") or {}
    except (OSError, ValueError, TypeError):
        return None, None, {}


def _others(cfg: Config) -> list:
    """[(directory, its Config, its teacher fingerprints)] of every --reuse directory."""
    return [(o, *_config_of(o)[::2]) for o in cfg.reuse]


def link_reused(cfg: Config, run_dir: str, seed: int, phase: str, others: list | None = None) -> bool:
    """Link RUN/seed{seed}/{phase} to the same phase finished in a --reuse directory with the same
    key (`others`: _others(cfg) when not given). A phase already present here (trained or linked
    before) is kept; a link whose target is gone is replaced; an unfinished phase here that hides a
    finished one there is refused (PhaseMissing: remove it to reuse). Returns whether the phase is
    present afterwards."""
    here = os.path.join(run_dir, f"seed{seed}", phase)
    if os.path.islink(here) and not os.path.exists(here):
        os.unlink(here)  # (a dangling link holds no work)
    if os.path.lexists(here) and (os.path.islink(here) or phase_done(here)):
        return True
    key = phase_key(cfg, phase, seed)
    for other, ocfg, teachers in (others if others is not None else _others(cfg)):
        src = os.path.realpath(os.path.join(other, f"seed{seed}", phase))
        if ocfg is None or not phase_done(src) or phase_key(ocfg, phase, seed, teachers) != key:
            continue
        if os.path.lexists(here):
            raise PhaseMissing(f"{here} is an unfinished {phase} phase that hides the finished one in --reuse "
                               f"{other}: remove it to reuse that one, or run without --reuse to resume it")
        make_folder(os.path.dirname(here))
        # (relative to the link's real folder: --out may pass through a symlink at another depth)
        make_link(os.path.relpath(src, os.path.realpath(os.path.dirname(here))), here)  # (WriteFailed on a full disk)
        return True
    return os.path.lexists(here)


def prepare_phases(cfg: Config, run_dir: str) -> None:
    """Link what --reuse offers for every seed, then check that every phase this run reads but does
    not train is finished (PhaseMissing with what to do, before anything trains)."""
    train, reads = needed_phases(cfg)
    others = _others(cfg)  # (each read once)
    for other, ocfg, _ in others:
        if ocfg is None:
            raise PhaseMissing(f"--reuse {other}: not a run directory (no readable config.json)")
    for seed in cfg.seeds:
        for phase in train + reads:
            link_reused(cfg, run_dir, seed, phase, others)
        for phase in reads:
            if not phase_done(os.path.join(run_dir, f"seed{seed}", phase)):
                where = f"in --reuse {' '.join(cfg.reuse)} or here" if cfg.reuse else "here (no --reuse given)"
                raise PhaseMissing(f"--phases {' '.join(cfg.phases)}: seed {seed} needs a finished {phase} phase, "
                                   f"found none {where} with the same settings; add teacher to --phases or "
                                   "finish the teacher run first")


def unlink_reused(run_dir: str) -> None:
    """Remove the phases prepare_phases linked into a run refused before it trained (and the seed folders they
    leave empty): a refused --reuse left its link, which the same command without --reuse then refused as
    "trained on other data", however often it ran."""
    seeds = [os.path.join(run_dir, d) for d in os.listdir(run_dir) if d.startswith("seed")]
    for sd in filter(os.path.isdir, seeds):
        for phase in os.listdir(sd):
            if os.path.islink(os.path.join(sd, phase)):
                os.unlink(os.path.join(sd, phase))
        with contextlib.suppress(OSError):  # (not empty: kept)
            os.rmdir(sd)


def check_linked(run_dir: str, seed: int, fingerprint: str, labels: str | None = None) -> None:
    """A linked phase must come from a run on the same data (the fingerprint its run recorded) and,
    where both recorded it, the same split and noisy labels (`labels`: Splits.labels_fingerprint), as
    must this seed's own earlier rounds (its noise.json)."""
    sd = os.path.join(run_dir, f"seed{seed}")
    drawn = recorded_labels(sd)
    if labels and drawn and drawn != labels:
        raise PhaseMissing(f"{sd} trained on another split or other noisy labels than this run draws (labels "
                           f"fingerprint {drawn}, now {labels}): a torch release or a sparsetrain version redraws "
                           "them; continue it with the versions its config.json records, or use another --out")
    for phase in sorted(os.listdir(sd)) if os.path.isdir(sd) else []:
        here = os.path.join(sd, phase)
        if os.path.islink(here):
            source = os.path.dirname(os.path.dirname(os.path.realpath(here)))
            _, theirs, _ = _config_of(source)
            if theirs and theirs != fingerprint:
                raise PhaseMissing(f"{here} links {source}, trained on other data (fingerprint {theirs}, here "
                                   f"{fingerprint}): remove the link, or point --data-dir at that run's data")
            drawn = recorded_labels(os.path.join(source, f"seed{seed}"))
            if labels and drawn and drawn != labels:
                raise PhaseMissing(f"{here} links {source}, whose seed {seed} drew another split or other noisy "
                                   f"labels (labels fingerprint {drawn}, here {labels}): a torch release or this "
                                   "version redraws them; remove the link and train the phase here")


def recorded_labels(seed_dir: str) -> str | None:
    """The labels fingerprint a seed's noise.json recorded (None: none yet, or a run from before
    2026-12-05, which did not record it); CorruptFile for one that does not parse (it turned the check
    off, and the run rewrote it)."""
    path = os.path.join(seed_dir, "noise.json")
    try:
        with open(path) as f:
            return json.load(f).get("labels_fingerprint")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}" if not isinstance(e, AttributeError) else "not a JSON object"
        raise CorruptFile(f"{path} is corrupt ({why}): it records the split and noisy labels this seed trained on, "
                          "which the run must draw again; restore it, or delete it to continue without that check") \
            from None


def other_runs_hint(out: str, rd: str, shown: int = 5, settings: dict | None = None) -> str:
    """For --report-only/--resume that found no run in `rd`: the runs `out` does hold (other settings name
    other directories: the command must give the flags a run was started with), or "" when it holds none;
    with `settings` (study.result_settings of this command) also the settings the nearest one differs in."""
    try:
        names = sorted(n for n in os.listdir(out) if os.path.join(out, n) != rd
                       and os.path.isfile(os.path.join(out, n, "config.json")))
    except OSError:
        return ""
    if not names:
        return ""
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return (f"; {out} holds {', '.join(names[:shown])}{more}: a run is found by its settings, so give the flags "
            "it was started with (its config.json has them)" + _nearest(out, names, settings))


def _runs_settings(out: str, names: list):
    """(name, its config.json's settings) of each run `names` lists in `out` whose config.json reads as an object."""
    for n in names:
        try:
            with open(os.path.join(out, n, "config.json")) as f:
                there = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(there, dict):
            yield n, there


def _setting(settings: dict, k: str):
    """A result setting as runs are compared by: at ADDED_DEFAULTS' default where absent (a setting added since),
    a model or student name in its one spelling (--model LeNet-300-100 is lenet300)."""
    v = settings.get(k, ADDED_DEFAULTS.get(k))
    return one_spelling(v) if k in ("model", "student") else v


def settings_differ(there: dict, settings: dict) -> list[str]:
    """The result settings (study.result_settings) a run's recorded `there` differs from `settings` in."""
    return [k for k in sorted({**ADDED_DEFAULTS, **settings}) if _setting(there, k) != _setting(settings, k)]


def spelled_twin(out: str, head: str, rd: str, settings: dict) -> str | None:
    """The run directory in `out`, other than `rd`, of a run with these `settings` whose model or student was
    spelled another way (the run name hashes the spelling: before 2026-12-08 `--model LeNet-300-100` started afresh
    beside a `--model lenet300` run, and its --resume found no run); None where there is none. Only folders named as
    runs of this dataset, noise and profile, `head` (<dataset>-eps<eps>-<profile>-: not a run moved aside as RUN.old,
    a copy, the hash-less naming of before 2026-12-01); of several, the one that recorded its names in their one
    spelling, then by name."""
    named = re.compile(re.escape(head) + r"[^-].*-[0-9a-f]{8}")  # (<dataset>-eps<eps>-<profile>-<models>-<hash>)
    try:
        found = [(n, there) for n, there in _runs_settings(out, sorted(n for n in os.listdir(out) if named.fullmatch(n)))
                 if os.path.join(out, n) != rd and not settings_differ(there, settings)]
    except OSError:
        return None
    spelt = lambda t: any(t.get(k) != one_spelling(t.get(k)) for k in ("model", "student"))  # noqa: E731
    return os.path.join(out, min(found, key=lambda f: (spelt(f[1]), f[0]))[0]) if found else None


def _nearest(out: str, names: list, settings: dict | None) -> str:
    """"; the nearest, NAME, differs in --wall (0.5 there, 0.996 here), ..." (fewest differences first)."""
    found = []
    for n, there in _runs_settings(out, names) if settings is not None else ():
        diff = settings_differ(there, settings)
        found.append((len(diff), n, [(k, _setting(there, k), _setting(settings, k)) for k in diff]))
    if not found:
        return ""
    _, name, diff = min(found)
    said = ", ".join(f"{'dataset' if k == 'dataset' else '--' + k.replace('_', '-')} "
                     f"({_shown(a)} there, {_shown(b)} here)" for k, a, b in diff[:4])
    return f"; the nearest, {name}, differs in {said}{', ...' if len(diff) > 4 else ''}"


def _shown(v) -> str:
    return " ".join(map(str, v)) or "none" if isinstance(v, list) else "''" if v == "" else str(v)
