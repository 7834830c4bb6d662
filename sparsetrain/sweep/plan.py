"""A sweep's plan: the grid expanded into ordinary experiment runs with explicit dependencies.

Each grid point and seed is resolved by the experiment's own parser (presets and validation
included) into a Config. Its teacher phase becomes a *teacher run* (`--phases teacher`, the
student settings left at their defaults so the run directory is the same whatever the students
are); its students a *study run* (`--phases vanilla distill --reuse <the runs it needs>`) that
links the finished teacher instead of training it. Every phase (teacher, vanilla, distill-*) is
owned by the first run that finished it, else part-trained it, else needs it (experiment/reuse.py's
phase_key names it): another run that needs the same phase depends on the owner and links it, so
nothing is trained twice (but where two runs already hold it, or waiting would close a circle).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from ..experiment.config import ROLE_KEYS, Config
from ..experiment.config_resolve import config_to_argv
from ..experiment.reuse import needed_phases, phase_done, phase_key, phase_names
from ..experiment.study import run_dir_of
from .grid import expand, grid_points  # noqa: F401 (expand: re-exported)

__all__ = ["Run", "expand", "make_plan", "plan_digest", "STUDENT_ONLY"]

# settings only the students read: left at their defaults in a teacher run (one teacher run per
# teacher setting, whatever the students)
STUDENT_ONLY = ("student", "teachers", "alpha", "tau", "early_stop", "t_e", "t_a", "stop_falls")
_DEFAULT = Config()


@dataclass
class Run:
    """One experiment invocation of the sweep."""
    name: str                     # the run directory's name (unique in the sweep)
    kind: str                     # "teacher" or "study"
    run_dir: str
    argv: list = field(default_factory=list)   # python -m sparsetrain.experiment <argv>
    deps: list = field(default_factory=list)   # names of runs that must finish first
    point: dict = field(default_factory=dict)  # the grid point (for the report and the log)
    seed: int = 0
    phases: list = field(default_factory=list)  # phases it trains or reads: all finished = done
    error: str = ""                # the experiment's own message when the point is invalid
    program: str = "sparsetrain.experiment"  # what the run executes (python -m; or a script path)
    own_vanilla: bool = False      # a study training its vanilla student (its teacher run's curve is not it)
    config: dict = field(default_factory=dict)  # its resolved settings as config.json records them (the report's
    # row of a point whose run failed before writing one); an invalid point's: the point itself
    needs: dict = field(default_factory=dict)  # dep name -> the phases this run links from it (a failed dep
    # that finished them does not stop this run)

    def done(self) -> bool:
        """Every phase finished and the run's own report written after them (the report comes last: a
        run stopped while writing it is run again, which then only writes the report; the seeds of a
        run share its summary.md, so it must be newer than this seed's phases)."""
        phases = [os.path.join(self.run_dir, f"seed{self.seed}", p) for p in self.phases]
        if self.error or not all(phase_done(p) for p in phases) or self._other_data_dir():
            return False
        summary = os.path.join(self.run_dir, "summary.md")
        return os.path.isfile(summary) and all(
            os.path.getmtime(summary) >= os.path.getmtime(os.path.join(p, "best.json")) for p in phases)

    def _other_data_dir(self) -> bool:
        """The data its phases were trained on was read from outside this run's --data-dir (config.json's
        data_source, recorded once): the experiment, run again, checks that data's fingerprint against the one
        it trained on (a sweep re-run on other data skipped its finished runs unchecked, and its report mixed
        the two datasets' results). A source elsewhere (Debian's Fashion-MNIST) is checked so too; a run with
        no config.json or no source recorded, or no --data-dir planned, has nothing to compare."""
        try:
            with open(os.path.join(self.run_dir, "config.json")) as f:
                src = json.load(f).get("data_source")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, AttributeError):  # (unreadable: the experiment says why)
            return True
        root = self.config.get("data_dir")
        if not src or not isinstance(src, str) or not isinstance(root, str):
            return False
        root = os.path.abspath(root)
        return os.path.commonpath([os.path.abspath(src), root]) != root


def teacher_config(cfg: Config) -> Config:
    """The teacher run of a study: its student settings at their defaults (students of every kind
    share it), the student schedule = the teacher's (so the run is also its own vanilla student)."""
    return dataclasses.replace(cfg, **{k: getattr(_DEFAULT, k) for k in STUDENT_ONLY},
                               **{f"student_{k}": getattr(cfg, f"teacher_{k}") for k in ROLE_KEYS},
                               phases=("teacher",), reuse=())


def make_plan(settings: dict, out: str, threads: int) -> list[Run]:
    """Every run of the grid `settings` (recipe values < command-line flags; lists are axes), in an
    order where a run comes after the runs it depends on (the grid's order: a study that finished or part-trained
    a phase another study links may come after it). Runs live in OUT/runs."""
    plan = _Planner(os.path.join(os.path.abspath(out), "runs"))
    studies = []
    for p, seed, cfg, err in grid_points(settings, plan.root, threads):
        if cfg is None:
            plan.add_invalid(p, seed, err)
            continue
        plan.add_teacher_run(cfg, p, seed)
        if cfg.phases != ("teacher",):
            studies.append((cfg, p, seed, os.path.basename(run_dir_of(cfg))))
    for study in studies:  # (every study's own directory first: which phases it holds decides their owners)
        plan.scan_study(*study)
    for study in studies:
        plan.add_study(*study)
    return plan.result()


class _Planner:
    """The plan being built: its runs and who owns each phase. A phase is owned by the first run (plan order)
    that finished it in its own directory, else by the first that part-trained it there (it resumes it), else
    by the first that needs it: a grid value added before a study links what that study finished or started
    (it trained them again before 2026-12-06, and the study's own unfinished phase then hid the new one's:
    PhaseMissing). A run resumes a phase it part-trained and never links from a run whose directory will hold
    one of those (it would hide that run's); nor waits for a run that waits for it (dependencies on unfinished
    phases form no cycle: it trains the phase itself instead, and that run, where it was to train the phase only as
    the first to need it, links it from this one: _hand_over)."""

    def __init__(self, root: str):
        self.root = root  # OUT/runs
        self.runs: dict[str, Run] = {}
        self.owner: dict[str, str] = {}  # phase key -> name of the run that trains it
        self.teacher_of: dict[str, str] = {}  # teacher phase key -> its teacher run
        # phase key -> the first run (plan order, teacher runs first) whose own directory holds it finished /
        # part-trained (a phase it trains again: it resumes there)
        self.finished: dict[str, str] = {}
        self.started: dict[str, str] = {}
        # run -> the phase keys its directory holds once it ran (its phases, those finished)
        self.holds: dict[str, set] = {}
        self.done_in: dict[str, set] = {}  # run -> the phase keys finished in its directory (not links)
        # teacher runs that are a point's result (--phases teacher), not only its studies' teacher
        self.results: set = set()
        self.plans: dict[str, tuple] = {}  # study run -> (its config, train, reads, phase keys, part-trained keys)
        self.waits: dict[str, set] = {}  # run -> the runs it waits for (a phase unfinished when planned)
        self.shown: dict[tuple, dict] = {}  # the phases a study shows (their keys) -> its point
        self.final: dict[str, Config] = {}  # study run -> the config its argv says (--reuse its dependencies')

    def add_invalid(self, p: dict, seed: int, err: str) -> None:
        """A point the experiment rejects: a run that fails at once with its message."""
        name = "invalid-" + hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:8]
        self.runs[name] = Run(name, "study", "", point=p, seed=seed, error=err, config=_record(p))

    def add_teacher_run(self, cfg: Config, p: dict, seed: int) -> None:
        """The point's teacher run, where it trains or reads the teacher phase (not for a vanilla student of
        another model, nor for students of --teachers PATH only) and no earlier point's run trains it."""
        tcfg = teacher_config(cfg)
        td = run_dir_of(tcfg)
        tname = os.path.basename(td)
        key = phase_key(tcfg, "teacher", seed)
        if cfg.phases == ("teacher",) and key in self.teacher_of:  # (teacher runs only: a setting they ignore)
            _refuse_twins(self.runs[self.teacher_of[key]].point, p)
        if key not in self.teacher_of and "teacher" in sum(needed_phases(cfg), []):
            self.runs[tname] = Run(tname, "teacher", td, config_to_argv(tcfg), point=p, seed=seed,
                                   phases=["teacher"], config=_record(tcfg))
            self.teacher_of[key] = tname
            _scan(tname, os.path.join(td, f"seed{seed}"), {"teacher": key}, ["teacher"], self.finished,
                  self.started, self.done_in)
            self.holds[tname] = {key}
        if cfg.phases == ("teacher",):
            self.results.add(tname)

    def scan_study(self, cfg: Config, p: dict, seed: int, name: str) -> None:
        """The phases study `name` trains and reads, and those its directory holds finished or part-trained."""
        if name in self.plans or (name in self.runs and self.runs[name].kind == "study"):
            return
        sd = os.path.join(run_dir_of(cfg), f"seed{seed}")
        own_teacher = "teacher" in cfg.phases and _part_trained(os.path.join(sd, "teacher"))  # (the plain command's)
        scfg = _study_config(cfg, name in self.runs or own_teacher)
        train, reads = needed_phases(scfg)
        keys = {ph: phase_key(scfg, ph, seed) for ph in phase_names(scfg)}
        part = _scan(name, sd, keys, train, self.finished, self.started, self.done_in)
        self.holds[name] = {keys[ph] for ph in train + reads} | self.done_in[name]
        self.plans[name] = scfg, train, reads, keys, part

    def add_study(self, cfg: Config, p: dict, seed: int, name: str) -> None:
        """Study `name`'s run: each phase linked from the run that owns it, or trained by this one."""
        if name in self.runs and self.runs[name].kind == "study":
            if self.runs[name].point != p:
                _refuse_twins(self.runs[name].point, p)
            return
        scfg, train, reads, keys, part = self.plans[name]
        deps, needs = [], {}
        for phase in train + reads:
            source = self._source(name, keys[phase], part)
            if source is None and phase in reads and "teacher" in cfg.phases:  # (no run to read it from: it trains it)
                scfg = dataclasses.replace(scfg, phases=cfg.phases)
                train, reads = needed_phases(scfg)
            if source is not None:
                deps += [] if source in deps else [source]
                needs.setdefault(source, []).append(phase)
        # a point showing every curve another's study shows is that study; one whose curves are a part of
        # another's links them from it (trains none: refused as "the same study" before 2026-12-06, where it came
        # after the other; the other way round, the larger one linked them)
        curves = tuple(sorted(keys[ph] for ph in train + reads))
        if self.shown.setdefault(curves, p) is not p:
            _refuse_twins(self.shown[curves], p)
        scfg = self.final[name] = dataclasses.replace(scfg, reuse=tuple(os.path.join(self.root, d) for d in deps))
        self.runs[name] = Run(name, "study", run_dir_of(scfg), config_to_argv(scfg), deps, p, seed,
                              phases=train + reads, own_vanilla=scfg.separate_vanilla(), config=_record(scfg),
                              needs=needs)

    def _source(self, name: str, key: str, part: set) -> str | None:
        """The run study `name` links phase `key` from (recorded in self.waits if unfinished there), or None: it
        trains it (its own phase, one it part-trained, or no run it may link it from)."""
        first = self.finished.get(key, self.started.get(key, self.teacher_of.get(key, name)))
        first = self.owner.setdefault(key, first)
        for o in ([] if key in part else dict.fromkeys(x for x in (first, self.teacher_of.get(key)) if x)):
            if o == name:
                return None
            blocks = key not in self.done_in.get(o, ())  # (a dependency serves at once with a finished phase)
            # (what o links from this run is this run's own phase: it hides nothing)
            mine = ({self.plans[o][3][ph] for ph in self.runs[o].needs.get(name, ())}
                    if o in self.plans and o in self.runs else set())
            circle = blocks and _reaches(self.waits, o, name)
            if not (self.holds[o] - mine) & part and not circle:
                self.waits.setdefault(name, set()).update([o] if blocks else [])
                return o
            if circle and self._hand_over(o, name, key):
                return None
        return None

    def _hand_over(self, o: str, name: str, key: str) -> bool:
        """Whether phase `key`, which study `o` (planned earlier, waiting for this run `name`) was to train only as
        the first run needing it (neither finished nor part-trained there, nothing of o's own that `name` would
        hide), is now trained by `name` and linked by `o` from it: o's dependencies, needs and --reuse gain `name`.
        (The later one trained it too before 2026-12-06: `(dense,)` listed before `(dense, best)` with the
        teacher's own student, whose teacher run is the larger study; o, served once the teacher phase finished,
        ran beside it.)"""
        r, (_, _, _, keys, part) = self.runs.get(o), self.plans.get(o, (None,) * 5)
        phase = next((ph for ph, k in (keys or {}).items() if k == key), None)
        if (r is None or r.kind != "study" or o not in self.final or phase not in r.phases or key in part
                or key in self.done_in.get(o, ()) or any(phase in v for v in r.needs.values())
                or self.holds[name] & part):
            return False
        self.owner[key] = name
        r.deps += [] if name in r.deps else [name]
        r.needs.setdefault(name, []).append(phase)
        self.waits.setdefault(o, set()).add(name)
        cfg = self.final[o]
        there = os.path.join(self.root, name)
        cfg = self.final[o] = dataclasses.replace(cfg, reuse=cfg.reuse + (() if there in cfg.reuse else (there,)))
        r.argv, r.config = config_to_argv(cfg), _record(cfg)
        return True

    def result(self) -> list[Run]:
        """The runs in plan order, less the teacher runs nobody needs."""
        # a teacher run nobody links whose phase another run's directory holds (the experiment's own command's)
        elsewhere = {n for k, n in self.teacher_of.items() if self.finished.get(k, self.started.get(k, n)) != n}
        return _drop_unneeded_teachers(self.runs, self.results, elsewhere)


def _drop_unneeded_teachers(runs: dict, results: set, elsewhere: set) -> list[Run]:
    """The plan without the unfinished teacher runs whose every study has finished (the experiment's own
    command trained them with their teacher phase: the sweep trained a teacher nobody would link before
    2026-12-06), nor those `elsewhere` (their phase held by a study's directory) that no run links (a study
    added to such finished ones links theirs: the sweep trained it again before 2026-12-06); their studies'
    --reuse and dependencies lose them."""
    users = {n: [s for s in runs.values() if n in s.deps] for n in runs}
    drop = {n for n, r in runs.items() if r.kind == "teacher" and n not in results and not r.done()
            and (all(s.done() for s in users[n]) if users[n] else n in elsewhere)}
    for r in runs.values():
        if drop & set(r.deps):
            gone = [runs[d].run_dir for d in r.deps if d in drop]
            i = r.argv.index("--reuse")
            end = next((j for j in range(i + 1, len(r.argv)) if r.argv[j].startswith("--")), len(r.argv))
            kept = [a for a in r.argv[i + 1:end] if a not in gone]
            r.argv = r.argv[:i] + (["--reuse", *kept] if kept else []) + r.argv[end:]
            r.deps = [d for d in r.deps if d not in drop]
            r.needs = {d: v for d, v in r.needs.items() if d not in drop}
    return [r for n, r in runs.items() if n not in drop]


def _part_trained(pdir: str) -> bool:
    """A phase directory of the run's own (not a link) that has not finished: its training resumes there."""
    return os.path.isdir(pdir) and not os.path.islink(pdir) and not phase_done(pdir)


def _scan(name: str, seed_dir: str, keys: dict, train: list, finished: dict, started: dict, done_in: dict) -> set:
    """Record the phases (`keys`: phase -> key) run `name` holds in `seed_dir`, not links: each finished one in
    `finished` and done_in[name], each part-trained one it trains in `started` (the first run of a key kept);
    returns the keys of those part-trained ones (which it resumes)."""
    done_in[name], part = set(), set()
    for ph, key in keys.items():
        d = os.path.join(seed_dir, ph)
        if phase_done(d) and not os.path.islink(d):
            finished.setdefault(key, name)
            done_in[name].add(key)
        elif ph in train and _part_trained(d):
            started.setdefault(key, name)
            part.add(key)
    return part


def _reaches(waits: dict, a: str, b: str) -> bool:
    """Whether run `a` waits, directly or through others, for run `b` (`waits`: run -> the runs it waits for)."""
    seen, todo = set(), [a]
    while todo:
        n = todo.pop()
        if n == b:
            return True
        if n not in seen:
            seen.add(n)
            todo += waits.get(n, ())
    return False


def _study_config(cfg: Config, is_teacher_run: bool) -> Config:
    """A study whose settings are its teacher run's (students = the teacher's model and schedule, default
    distillation) *is* that run: it trains every phase; otherwise the teacher is linked."""
    return cfg if is_teacher_run else \
        dataclasses.replace(cfg, phases=tuple(k for k in cfg.phases if k != "teacher") or ("vanilla",))


def _record(cfg) -> dict:
    """What the run's config.json would record of its settings (study.py's: the student resolved);
    a rejected point's own values (json: tuples as lists)."""
    if isinstance(cfg, Config):
        rec = {**dataclasses.asdict(cfg), "student": cfg.resolved_student()}
    else:  # (--batch-size etc. set both roles' settings, as the experiment's parser would)
        rec = {**{f"{role}_{k}": v for k, v in cfg.items() if k in ROLE_KEYS for role in ("teacher", "student")}, **cfg}
    return json.loads(json.dumps(rec, default=str))


def _refuse_twins(a: dict, b: dict) -> None:
    """Two points of the grid that are one study (aliases of a model, or values of a setting the runs
    ignore): ValueError naming the values that differ."""
    differ = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
    if not differ:  # (a recipe's variant equal to its baseline, or to another variant)
        raise ValueError(f"the grid holds the same point twice ({', '.join(f'{k}={v!r}' for k, v in sorted(a.items()))})")
    advice = "name each model once" if "model" in differ else "vary only settings the runs use"
    raise ValueError("two points of the grid are the same study (" + ", ".join(
        f"--{k.replace('_', '-')} {a.get(k)!r} and {b.get(k)!r}" for k in differ) + f"): {advice}")


def plan_digest(plan: list[Run]) -> str:
    """8 hex digits naming a plan (its runs' directories): the same sweep finds its logs again."""
    return hashlib.sha256("\n".join(sorted(r.name for r in plan)).encode()).hexdigest()[:8]
