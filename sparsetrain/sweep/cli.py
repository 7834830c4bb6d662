"""`python -m sparsetrain.sweep RECIPE | grid | report ...`: the command line, generated from the
experiment's Config (every experiment flag; a flag given several values is an axis of the grid)."""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import typing
from dataclasses import fields

from ..experiment.config import ROLE_KEYS, Config
from ..experiment.devices import version_line
from ..experiment.files import WriteFailed, write_json
from .recipes import RECIPES, recipe, variant_keys

__all__ = ["build_parser", "main"]

# experiment fields the sweep sets itself (its --out holds every run; --cpus-per-run the threads)
_OWN = ("out", "threads", "reuse", "profile", "dataset")
# tuple-valued experiment fields given as one value (not an axis); `seeds` is an axis
_AXIS_TUPLES = ("seeds",)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sparsetrain.sweep",
                description="Run a grid of DSD2 experiments on Ray (a recipe of the paper's grids, or `grid` "
                            "with the axes as flags) and aggregate them; or `report` over run directories.",
                epilog="recipes: " + "; ".join(f"{k}: {v['about']}" for k, v in RECIPES.items()))
    p.add_argument("what", metavar="RECIPE|grid|report", help=f"one of {', '.join(RECIPES)}, grid or report")
    p.add_argument("run_dirs", nargs="*", default=[], metavar="RUN_DIR",  # (a default: argparse called it required)
                   help="report: run directories, or folders holding them (e.g. SWEEPS/runs)")
    p.add_argument("--profile", choices=("paper", "quick"), default="paper",
                   help="recipe variant: paper (the paper's grid) or quick (CPU-sized); grid: the experiment's "
                        "--profile")
    p.add_argument("--out", default=None, help="sweep root (default sweeps): runs in OUT/runs (shared by every sweep "
                   "there: a teacher trained by one sweep serves the next), logs and report in OUT/<sweep name>; "
                   "report: where the report goes (default FOLDER/report for one folder of runs)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs reserved per run (its torch threads; default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="GPUs per run, fractional to share one (0.25: four CIFAR runs per GPU; default 0)")
    p.add_argument("--max-concurrent", type=int, default=0, help="at most this many runs at once (0, the default: as "
                   "the resources allow)")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed run (it resumes where it stopped; default 1)")
    p.add_argument("--address", default="", help="an existing Ray cluster (ray start --head; 'auto' or "
                   "HOST:PORT); default: a local Ray on this machine")
    p.add_argument("--version", action="version", version=version_line())
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (runs, dependencies) and exit (1 when a run is invalid)")
    g = p.add_argument_group("grid axes: experiment flags (see python -m sparsetrain.experiment --help); "
                             "several values = an axis")
    g.add_argument("--dataset", nargs="+", default=None, help="dataset(s)")
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if f.name in _OWN:
            continue
        flag, t, help_ = f"--{f.name.replace('_', '-')}", hints[f.name], f.metadata["help"]
        if t is bool:
            g.add_argument(flag, action="store_true", default=None, help=help_)
        elif t is tuple:
            elem = type(f.default[0]) if f.default else str
            g.add_argument(flag, nargs="+", type=elem, default=None, help=help_ + (
                " (an axis: one run per seed)" if f.name in _AXIS_TUPLES else " (one value, all its items)"))
        else:
            g.add_argument(flag, nargs="+", type=t, default=None, help=help_)
    for k, t in (("epochs", int), ("batch_size", int), ("lr", float), ("weight_decay", float), ("rewind_iter", int)):
        g.add_argument(f"--{k.replace('_', '-')}", nargs="+", type=t, default=None, help=f"both roles' {k}")
    g.add_argument("--milestones", nargs="+", type=int, default=None, help="both roles' milestones (one value)")
    return p


def _settings(args, parser) -> dict:
    """Recipe values < the flags given (lists: axes)."""
    if args.what == "grid":
        if not args.dataset:
            parser.error("grid needs --dataset (one or more)")
        settings = {"profile": [args.profile]}
    else:
        try:
            settings = recipe(args.what, args.profile)
        except ValueError as e:
            parser.error(f"{e} (or grid, report)")
    hints, varied = typing.get_type_hints(Config), variant_keys(settings)
    for k in ROLE_KEYS:  # (--epochs etc. set both roles: they replace a recipe's --teacher-/--student-<k>, which
        if getattr(args, k, None) is not None:  # the experiment would let win over them, the flag ignored)
            for role in ("teacher", "student"):
                settings.pop(f"{role}_{k}", None)
    for k, v in vars(args).items():
        if v is None or k in ("what", "run_dirs", "profile", "out", "cpus_per_run", "gpus_per_run",
                              "max_concurrent", "retries", "address", "dry_run"):
            continue
        if k in varied:  # (a variant's value would replace it for that point, silently)
            parser.error(f"--{k.replace('_', '-')}: {args.what} changes it one variant at a time "
                         f"({', '.join(sorted(varied))}); run `grid` with the settings you want instead")
        one_value = hints.get(k) is tuple or k == "milestones"
        settings[k] = (list(v) if not one_value or k in _AXIS_TUPLES else tuple(v)) if isinstance(v, list) else v
        if isinstance(settings[k], (list, tuple)) and len({str(x) for x in settings[k]}) != len(settings[k]):
            parser.error(f"--{k.replace('_', '-')} lists a value twice ({' '.join(map(str, v))}): " + (
                "each value is a point of the sweep" if isinstance(settings[k], list) else
                "name each once (the flag is one value of every point, not an axis)"))
    return settings


def _run_dirs(paths) -> list[str]:
    """Run directories given directly or as folders holding them (one level down); those holding results
    whose config.json was lost too (the report names them: they were left out unnamed before 2026-12-06)."""
    from .aggregate import lost_config
    out = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "config.json")) or lost_config(p):
            out.append(p)
        elif os.path.isdir(p):
            out += sorted(os.path.join(p, d) for d in os.listdir(p)
                          if os.path.isfile(os.path.join(p, d, "config.json")) or lost_config(os.path.join(p, d)))
    return out


def _teacher_only(run_dir: str) -> bool:
    import json

    from .aggregate import teacher_only
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and teacher_only(cfg)


def _leaves(dirs, teacher_runs=None) -> list[str]:
    """The run directories a report shows: a sweep's teacher run is a study's teacher phase (linked into
    it), not a setting of its own, unless no study links it (its study failed before starting: the
    teacher's curve is then the only result of its setting). `teacher_runs`: a sweep's own plan says
    which directories are its teacher runs (another sweep under the same --out may since have trained
    its students in one, rewriting its config.json); else a config.json of --phases teacher does."""
    linked = {os.path.realpath(os.path.join(t, "..", "..")) for d in dirs
              for t in glob.glob(os.path.join(d, "seed*", "teacher")) if os.path.islink(t)}
    teacher = {os.path.realpath(d) for d in teacher_runs} if teacher_runs is not None else None

    def is_teacher_run(d):
        return os.path.realpath(d) in teacher if teacher is not None else _teacher_only(d)
    return [d for d in dirs if not (is_teacher_run(d) and os.path.realpath(d) in linked)]


def _make_folder(parser, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create {path} ({e.strerror or e})")


def _report(plan, sweep_dir: str, settings: dict, what: str, status: dict) -> str:
    """The sweep's report (OUT/<sweep>/report) from its plan and status; returns summary.md's path."""
    from .report import write_sweep_report
    leaves = _leaves([r.run_dir for r in plan if r.run_dir], [r.run_dir for r in plan if r.kind == "teacher"])
    axes = [k for k, v in settings.items() if isinstance(v, list) and len(v) > 1]  # (lists are the grid's axes)
    axes += sorted(variant_keys(settings) - set(axes))  # (and what variants change)
    of_studies = [r.run_dir for r in plan if r.kind == "teacher" and any(r.name in s.deps and s.own_vanilla for s in plan)]
    # the result runs (studies; teacher runs no study links): their points get rows even without a directory
    planned = {r.run_dir or r.name: r.config for r in plan
               if r.kind == "study" or not any(r.name in s.deps for s in plan)}
    return write_sweep_report(leaves, os.path.join(sweep_dir, "report"), status, title=f"sweep {what}",
                              axes=axes, teacher_runs=of_studies, planned=planned)


def main(argv=None) -> int:
    """The sweep's CLI; a file it cannot write (plan.json, status.json, the report: disk full, a read-only
    folder) is one line and exit 2, as the experiment's (WriteFailed names the file; a traceback before);
    `report` and `--dry-run`, which leave nothing to resume, advise running the command again."""
    parser = build_parser()
    args = parser.parse_args(argv)  # (the command as argparse read it, abbreviations included)
    try:
        return _main(parser, args, argv)
    except WriteFailed as e:
        if args.what == "report" or args.dry_run:  # ("... to resume" as if runs had started)
            e.advice = e.advice.replace("run the same command to resume", "run the same command again")
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(parser, args, argv) -> int:
    if args.out is not None and not args.out.strip():  # ('' wrote the sweep into the current folder)
        parser.error(f"--out must be a folder path, not empty, got {args.out!r}")
    if args.out is not None:  # (--out=~/sweeps, which no shell expands: a folder named ~ here; as the experiment's)
        args.out = os.path.expanduser(args.out)
    if args.what == "report":
        stray = [k for k, v in vars(args).items() if k not in ("what", "run_dirs", "out") and v != parser.get_default(k)]
        if stray:  # (a report reads finished runs: it neither filters nor runs anything)
            parser.error(f"report takes run directories and --out only, got {', '.join('--' + k.replace('_', '-') for k in stray)}")
        if not args.run_dirs:  # (it said "no run directory ... in (none given)")
            parser.error("report needs RUN_DIR: one or more run directories, or folders holding them (e.g. sweeps/runs)")
        # (a leading ~ quoted or after '=', as --out: it was looked up as a folder named ~ here)
        args.run_dirs = [os.path.expanduser(d) for d in args.run_dirs]
        dirs = _run_dirs(args.run_dirs)
        if not dirs:
            roots = [os.path.join(d, "runs") for d in args.run_dirs if _run_dirs([os.path.join(d, "runs")])]
            parser.error(f"report: no run directory (with a config.json) in {' '.join(args.run_dirs)}"
                         + (f"; a sweep's runs are in its --out's runs folder: give {' '.join(roots)}" if roots else ""))
        dirs = _leaves(dirs)
        from .aggregate import lost_config
        from .report import write_sweep_report
        out = args.out
        if out is None:  # (beside the runs when one folder was given; else it must be said)
            if len(args.run_dirs) != 1 or os.path.isfile(os.path.join(args.run_dirs[0], "config.json")) \
                    or lost_config(args.run_dirs[0]):
                parser.error("report: give --out DIR for the report of several folders or of run directories")
            out = os.path.join(os.path.abspath(args.run_dirs[0]), "report")
        if os.path.isfile(os.path.join(out, "config.json")):  # (its own summary.md and figures would be replaced)
            parser.error(f"report: --out {out} is a run directory (its summary.md and figures are the run's): "
                         "give another folder")
        _make_folder(parser, out)
        print(write_sweep_report(dirs, out, title="report", sort=True))
        return 0
    if args.run_dirs:
        parser.error(f"unexpected argument(s) {' '.join(args.run_dirs)}: run directories are for report")
    gpus = args.gpus_per_run
    four_places = lambda v: v == round(v, 4)  # noqa: E731  (Ray keeps resources to 0.0001)
    for name, ok, expected in (("cpus_per_run", 1e-4 <= args.cpus_per_run < math.inf and four_places(args.cpus_per_run),
                                ">= 0.0001 and finite, in steps of 0.0001 (Ray's precision)"),
                               ("gpus_per_run", 0 <= gpus < math.inf and (gpus <= 1 or gpus == int(gpus)) and four_places(gpus),
                                ">= 0: a fraction of one GPU in steps of 0.0001 or a whole number (Ray's rules)"),
                               ("max_concurrent", args.max_concurrent >= 0, ">= 0 (0: no limit)"),
                               ("retries", 0 <= args.retries <= 1000, "in [0, 1000]")):
        if not ok:
            parser.error(f"--{name.replace('_', '-')} must be {expected}, got {getattr(args, name)}")
    args.out = "sweeps" if args.out is None else args.out
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file, not a directory")
    runs_dir = os.path.join(args.out, "runs")
    if os.path.lexists(runs_dir) and not os.path.isdir(runs_dir):  # (each run failed there, after Ray started)
        parser.error(f"--out: {runs_dir} is not a directory (every run of the sweep goes there)")
    settings = _settings(args, parser)
    values = lambda k: settings.get(k) if isinstance(settings.get(k), list) else [settings.get(k)]  # noqa: E731
    if gpus == 0:  # (the runner hides every GPU from such runs: each would fail after its teacher's wait)
        cuda = [f"--device {d}" for d in values("device") if str(d).startswith("cuda")] + [  # (--device cpu with
            f"--amp {a}" for a in values("amp") if a in ("bf16", "fp16") and values("device") != ["cpu"]]  # it: invalid)
        if cuda:
            parser.error(f"{cuda[0]} needs a GPU, and --gpus-per-run 0 (the default) gives the runs none: "
                         "give --gpus-per-run (e.g. 1)")
    # Ray shows a run only the ceil(--gpus-per-run) GPUs it gives it, as cuda:0.. (every run failed with "this
    # machine has 1 CUDA device(s)")
    beyond = [d for d in values("device") if re.fullmatch(r"cuda:\d+", str(d)) and int(str(d)[5:]) >= math.ceil(gpus)]
    if gpus and beyond:
        parser.error(f"--device {beyond[0]}: each run sees only the {math.ceil(gpus)} GPU(s) Ray gives it "
                     f"(--gpus-per-run {gpus:g}), numbered from cuda:0: use --device cuda")
    from .plan import make_plan, plan_digest  # (imports torch: after the argument checks)
    try:
        plan = make_plan(settings, args.out, threads=max(1, int(args.cpus_per_run)))
    except ValueError as e:  # (a grid whose points coincide)
        parser.error(str(e))
    sweep_dir = os.path.join(args.out, f"{args.what}-{args.profile}-{plan_digest(plan)}")
    _make_folder(parser, sweep_dir)
    plan_file = os.path.join(sweep_dir, "plan.json")
    if not (args.dry_run and os.path.exists(plan_file)):  # (a dry run leaves a real sweep's record alone)
        write_json(plan_file, {
            "command": ["python", "-m", "sparsetrain.sweep", *(sys.argv[1:] if argv is None else argv)],
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
            "runs": [{"name": r.name, "kind": r.kind, "run_dir": r.run_dir, "deps": r.deps, "error": r.error,
                      "argv": r.argv} for r in plan]})
    if args.dry_run:
        for r in plan:
            print(f"{r.kind:7s} {r.name}" + (f"  after {', '.join(r.deps)}" if r.deps else "") +
                  (f"  INVALID: {r.error}" if r.error else "  (finished)" if r.done() else ""))
        print(f"{len(plan)} runs; plan: {plan_file}")
        invalid = sum(bool(r.error) for r in plan)
        if invalid:  # (exit 1, as the sweep itself would end: it runs the others and reports these failed)
            print(f"error: {invalid} of {len(plan)} runs are invalid (INVALID above)", file=sys.stderr)
        return 1 if invalid else 0
    from .runner import SweepError, execute
    try:
        status = execute(plan, sweep_dir, cpus=args.cpus_per_run, gpus=args.gpus_per_run,
                         max_concurrent=args.max_concurrent, retries=args.retries, address=args.address)
    except KeyboardInterrupt:
        try:  # the report of what finished, the interrupted runs marked (status.json is written by then)
            with open(os.path.join(sweep_dir, "status.json")) as f:
                summary = _report(plan, sweep_dir, settings, args.what, json.load(f))
            print(f"stopped; re-run the same command to resume\nreport: {summary}", file=sys.stderr)
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 (a second Ctrl-C, or no status.json yet)
            print(f"stopped; re-run the same command to resume (no report written: {type(e).__name__})",
                  file=sys.stderr)
        return 130
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = _report(plan, sweep_dir, settings, args.what, status)
    except KeyboardInterrupt:  # (a traceback before 2026-12-06; status.json is written, the runs are finished)
        print(f"stopped while writing the report; re-run the same command to write it (status: "
              f"{os.path.join(sweep_dir, 'status.json')})", file=sys.stderr)
        return 130
    failed = {n: s for n, s in status.items() if s["state"] == "failed"}
    for n, s in failed.items():
        print(f"failed: {n}: {s.get('error', '')} (log: {s['log']})", file=sys.stderr)
    print(f"{sum(s['state'] in ('done', 'skipped') for s in status.values())}/{len(status)} runs finished, "
          f"{len(failed)} failed\nsweep: {sweep_dir}\nreport: {summary}")
    return 1 if failed else 0
