"""The DSD2 study: per seed, the teacher run, the vanilla student, the distilled students.

Per seed: (1) the teacher run: train dense, then prune -> perturb -> retrain -> evaluate until the wall (Algorithm 1,
loop.py), a full run on the teacher's schedule; (2) the vanilla student run on the student's schedule (the teacher run
doubles as it when the student is the same model trained the same way); (3) for each teacher choice, the student
pruned the same way under the distillation loss (Eq. 2). Early stops apply to the student runs only. The run directory
keeps the resolved config (with git commit and versions), per-round metrics and checkpoints; re-running the same
command continues where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys

import torch

from . import data as D
from . import distributed as dist
from . import report
from .checkpoint import load_model
from .config import ADDED_DEFAULTS, Config, config_from_args, notes, validate
from .devices import changed_since, describe_device, git_commit, resolve_device, threads_for
from .files import (EXIT_BUSY, Busy, CorruptFile, WriteFailed, finish_interrupted_writes, folder_lock, make_folder,
                    make_link, remove_empty_folder, write_json)
from .loop import PhaseError, run_phase
from .metrics import teacher_tag
from .reuse import (PhaseMissing, check_linked, needed_phases, other_runs_hint, phase_done, phase_settings,
                    prepare_phases, settings_differ, spelled_twin, teacher_fingerprint, unlink_reused)
from .seed_status import SeedStatus
from .teachers import load_teacher, teacher_checkpoint

__all__ = ["run_study", "main", "run_dir_of", "prepare_run_dir"]

# config keys that do not change results (may differ between a run and its resume)
_NON_RESULT_KEYS = ("out", "threads", "data_dir", "no_download", "device", "phases", "reuse")


class UsageError(Exception):
    """An expected user error: main() prints it on one line and exits with code 2."""


# ============================================================================ run directory
def result_settings(cfg: Config) -> dict:
    """The resolved settings that change results (JSON types): what names a run and what a resume must match.
    Settings added since runs were named are left out at their defaults (ADDED_DEFAULTS: `--amp auto` follows the
    device as --device does; no --l1, --dropout, --augment), so those runs keep their names; any other value is
    part of the run."""
    resolved = {**dataclasses.asdict(cfg), "student": cfg.resolved_student()}
    return {k: v for k, v in json.loads(json.dumps(resolved)).items()
            if k not in _NON_RESULT_KEYS and not (k in ADDED_DEFAULTS and v == ADDED_DEFAULTS[k])}


def run_dir_of(cfg: Config) -> str:
    """OUT/<dataset>-eps<eps>-<profile>-<model>[-<student>]-<8 hex digits of the settings' hash> (or its run under
    other spellings of the models: reuse.spelled_twin): the same settings always find it, different ones never collide."""
    digest = hashlib.sha256(json.dumps(settings := result_settings(cfg), sort_keys=True).encode()).hexdigest()[:8]
    models = cfg.model + ("" if cfg.resolved_student() == cfg.model else f"-{cfg.resolved_student()}")
    head = f"{cfg.dataset}-eps{cfg.eps:g}-{cfg.profile}-"
    rd = os.path.join(cfg.out, f"{head}{models}-{digest}")
    return rd if os.path.isfile(os.path.join(rd, "config.json")) else spelled_twin(cfg.out, head, rd, settings) or rd


def legacy_run_dir(cfg: Config) -> str | None:
    """A run directory in the naming used before 2026-12-01 (OUT/<dataset>-eps<eps>-<profile>), if one exists for
    this dataset, noise and profile: it can be reported, not resumed."""
    rd = os.path.join(cfg.out, f"{cfg.dataset}-eps{cfg.eps:g}-{cfg.profile}")
    return rd if os.path.isfile(os.path.join(rd, "config.json")) else None


def _read_config(path: str) -> dict:
    """A run's config.json ({} where none was written yet); UsageError for one that does not parse, or that is
    missing beside trained phases (rewritten, the resume went on with whatever data and settings it was given)."""
    try:
        if not os.path.exists(path) and not _trained(os.path.dirname(path)):
            return {}
        with open(path) as f:
            old = json.load(f)
        if not isinstance(old, dict) or not old:  # ({}: it was taken for a run directory without one)
            raise ValueError("not a JSON object of settings")
        if not (isinstance(r := old.get("resumed_with", []), list) and all(isinstance(e, dict) for e in r)):
            raise ValueError(f"its resumed_with is not a list of JSON objects: {r!r:.80}")  # (AttributeError before)
        if "data_fingerprint" not in old and _trained(os.path.dirname(path)):  # (written before any phase trains)
            raise ValueError("it has no data_fingerprint, yet the run directory holds trained phases")
        return old
    except (OSError, ValueError) as e:
        why = (f"is corrupt ({type(e).__name__}: {e})" if not isinstance(e, FileNotFoundError) else
               "is missing, but the run directory holds trained phases")
        raise UsageError(f"{path} {why}: a resume checks the run's settings and data against it (the data's "
                         "fingerprint is recorded nowhere else); restore it from a backup copy, or start over, every "
                         f"phase trained again, in another --out (or move {os.path.dirname(path)} aside: its trained "
                         "phases are kept there)") from None


def prepare_run_dir(cfg: Config, resuming: bool = True, device=None) -> str:
    """Create the run directory with its resolved config.json; refuse a directory holding a run with different
    result-affecting settings (a hash collision or a hand-edited config). `resuming`: whether this invocation has
    work left (a finished run re-invoked gains no resumed_with entry); `device`: the one this process computes on
    (torchrun: its rank's GPU), else where --device resolves."""
    rd = run_dir_of(cfg)
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is a file, not a directory")
    path = os.path.join(rd, "config.json")
    if (legacy := legacy_run_dir(cfg)) and not os.path.exists(path):
        print(f"note: {legacy} is a run directory of an earlier sparsetrain (named without a settings hash); it "
              f"is not resumed: this run starts in {rd} (`--report-only` still reports the old one)", file=sys.stderr)
    old = _read_config(path)
    resolved = {**dataclasses.asdict(cfg), "student": cfg.resolved_student(),  # (a run found under another spelling
                **{k: old[k] for k in ("model", "student") if k in old}}  # of its models keeps its own: spelled_twin)
    if old and (diff := settings_differ(old, result_settings(cfg))):
        raise UsageError(f"{rd} holds a run with different settings ({', '.join(diff)}); "
                         "choose another --out, or move it aside (its trained phases are kept there)")
    import torchvision

    from .. import __version__
    now = {"git_commit": git_commit(), "sparsetrain_version": __version__,
           "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                        "python": sys.version.split()[0]},
           "torch_threads": torch.get_num_threads(),  # (the kernels' sums are deterministic per thread count)
           "world_size": dist.world(),  # (torchrun processes: per-rank batches and BatchNorm statistics)
           "ran_on": describe_device(device or cfg.device, cfg.amp)}  # (what --device/--amp auto resolved to)
    # a resumed run keeps the commit, versions and threads it started with; those it resumed with, if others
    # than it last ran with (a return to the start's too), follow (a record an older run lacks is not a difference)
    resumed = list(old.get("resumed_with", []))
    last = resumed[-1] if resumed else old
    if resuming and old and (changed := changed_since(last, now)):  # (one rule: each entry is said)
        print(f"note: {rd} resumes with {'; '.join(changed)}: the rounds trained from here on may not be bitwise "
              "those of an uninterrupted run (config.json lists it under resumed_with)", file=sys.stderr)
        resumed.append(now)
    try:
        os.makedirs(rd, exist_ok=True)
        write_json(path, {**resolved, **{k: old.get(k, "unknown" if old else v) for k, v in now.items()},
                          **({"resumed_with": resumed} if resumed else {}),
                          **{k: old[k] for k in ("data_fingerprint", "data_source", "teacher_fingerprints") if k in old}})
    except OSError as e:
        raise UsageError(f"--out {cfg.out}: cannot write the run directory {rd} ({e.strerror or e})") from None
    return rd


def check_data(rd: str, fingerprint: str, source: str = "") -> None:
    """Record the fingerprint of the data a run trains on and the folder it was read from (said once: Fashion-MNIST
    may come from Debian's copy, not --data-dir) in its config.json; refuse to continue a run on different data."""
    cfg = _read_config(path := os.path.join(rd, "config.json"))
    if cfg.get("data_fingerprint", fingerprint) != fingerprint:
        raise UsageError(f"{rd} was trained on other data (fingerprint {cfg['data_fingerprint']}, now "
                         f"{fingerprint}): point --data-dir at the original data, or use another --out")
    if "data_fingerprint" not in cfg:
        write_json(path, {**cfg, "data_fingerprint": fingerprint, "data_source": source})
        if source:  # (a loader registered elsewhere may not say)
            print(f"data: read from {source}")


# ============================================================================ the study
def run_study(cfg: Config) -> str:
    """Run (or continue) every phase of every seed; returns the path of summary.md. A Config built
    in Python is checked as the CLI checks its flags (ValueError, TypeError naming the flag)."""
    validate(cfg)
    torch.set_num_threads(threads_for(cfg))
    dev = resolve_device(cfg.device)
    try:
        dev = dist.rank_device(dev)  # torchrun on GPUs: one per rank
        dist.setup(dev)
    except ValueError as e:  # (a launch without torchrun's variables, or one not a number)
        raise UsageError(str(e)) from None
    if dist.world() > 1 and dist.is_main():
        # (torchrun sets OMP_NUM_THREADS=1 where it is unset: on CPUs say what each rank runs on)
        per_rank = f"; {torch.get_num_threads()} CPU thread(s) per rank (--threads)" if dev.type == "cpu" else ""
        print(f"data parallel: {dist.world()} ranks ({torch.distributed.get_backend()}), global batch split "
              f"across them{per_rank}", flush=True)
        train = needed_phases(cfg)[0]  # (a batch under 2 rows a rank runs whole on every rank: train.py, dist.shard)
        for role in ["teacher"] * ("teacher" in train) + ["student"] * any(p != "teacher" for p in train):
            if cfg.hyper(role).batch_size < 2 * dist.world():
                print(f"note: --{role}-batch-size {cfg.hyper(role).batch_size} is under 2 rows per rank: each of the "
                      f"{dist.world()} ranks trains every batch whole (the same results, no faster than one process); "
                      f"give {2 * dist.world()} or more, or fewer processes", file=sys.stderr, flush=True)
    rd, fresh, made, d = run_dir_of(cfg), [], [], os.path.abspath(cfg.out)
    while not os.path.isdir(d) and d != os.path.dirname(d):  # (--out's folders this run makes, deepest first)
        made, d = made + [d], os.path.dirname(d)
    with contextlib.ExitStack() as held:
        def setup():
            held.enter_context(folder_lock(rd))
            finish_interrupted_writes(rd)  # (what a kill left half-renamed or half-written)
            fresh.append(not os.path.isfile(os.path.join(rd, "config.json")))
            prepare_run_dir(cfg, resuming=not all(phase_done(os.path.join(rd, f"seed{seed}", p))
                                                  for seed in cfg.seeds for p in needed_phases(cfg)[0]), device=dev)
            check_teacher_files(cfg, rd)
            prepare_phases(cfg, rd)  # links what --reuse offers, checks the phases only read
        try:
            _on_main(setup)
            return _run_seeds(cfg, rd, dev, held.enter_context(SeedStatus()))  # (a seed's status.json)
        except _EXPECTED:
            # refused before anything ran (in set-up, or by the data: its size, its files): no run is
            # left for a report or --resume to find, nor an empty run directory (its lock alone)
            if dist.is_main() and fresh == [True]:
                if os.path.isfile(written := os.path.join(rd, "config.json")) and not _trained(rd):
                    os.remove(written)
                    unlink_reused(rd)  # (its --reuse links: the plain command refused them, "trained on other data")
                remove_empty_folder(rd)
                with contextlib.suppress(OSError):  # (--out's folders it made, while empty: a user's typo)
                    list(map(os.rmdir, made))
            raise


def _trained(rd: str) -> bool:
    """Whether this run directory holds work of its own: a phase's metrics, state or checkpoints
    (phases linked in by --reuse are links, which os.walk does not enter)."""
    return any({"metrics.csv", "state.pt"} & set(files) or os.path.basename(d) == "ckpt"
               for d, _, files in os.walk(rd))


_EXPECTED = (UsageError, PhaseMissing, PhaseError, D.DatasetNotFound, D.DataError, CorruptFile, Busy, WriteFailed)


def _on_main(fn) -> None:
    dist.on_main(fn, _EXPECTED)  # (an expected error on rank 0 raised on every rank)


def load_splits(cfg: Config, seed: int, first: bool = True):
    """The dataset's splits for `seed`. Under torchrun rank 0 loads `first`, downloading what is missing, and the
    other ranks read its files after it (torchvision writes an archive in place and then checks and extracts it:
    ranks downloading at once corrupt each other's); rank 0's DatasetNotFound or DataError stops every rank."""
    def load(download: bool):
        return D.load_dataset(cfg.dataset, cfg.data_dir, eps=cfg.eps, noise=cfg.noise,
                              val_fraction=cfg.val_fraction, clean_val=cfg.clean_val, seed=seed,
                              subset=cfg.subset or None, label_file=cfg.label_file or None, download=download)
    if dist.world() == 1 or cfg.no_download:
        return load(not cfg.no_download)
    if not first:  # (the first seed's load left the files in place)
        return load(False)
    got = {}
    _on_main(lambda: got.update(splits=load(True)))
    return got["splits"] if dist.is_main() else load(False)


def _run_seeds(cfg: Config, rd: str, dev: torch.device, status: SeedStatus) -> str:
    train, reads = needed_phases(cfg)
    todo = reads + train
    student = cfg.resolved_student()
    for seed in cfg.seeds:
        splits = load_splits(cfg, seed, first=seed == cfg.seeds[0])
        if not dist.same_everywhere((splits.fingerprint, splits.labels_fingerprint)):  # (a node's other files)
            raise UsageError(f"the {dist.world()} ranks loaded different data (seed {seed}: their data or label "
                             "fingerprints differ): every rank must read the same files of --data-dir")
        _on_main(lambda: (check_data(rd, splits.fingerprint, splits.source),
                          check_linked(rd, seed, splits.fingerprint, splits.labels_fingerprint)))
        if len(splits.val) == 0:  # (its accuracy would be NaN: round 0 "best", no early stop)
            raise UsageError(f"--val-fraction {cfg.val_fraction}: the validation split is empty ({len(splits.train)} "
                             "training images); the study picks each run's best round and stops early on it")
        if len(splits.train) < dist.world():  # (a rank without rows has no layer shapes for the entropy's sums)
            raise UsageError(f"{len(splits.train)} training images for {dist.world()} ranks: every rank needs rows "
                             "of its own; use fewer processes or more data (--subset)")
        if len(splits.train) < 2:  # (BatchNorm trains on batch statistics: one image has none)
            raise UsageError(f"{len(splits.train)} training image(s) after the validation split: the study needs at "
                             "least 2 (raise --subset or lower --val-fraction)")
        roles = ["teacher"] * ("teacher" in train) + ["student"] * any(ph != "teacher" for ph in train)
        too_big = [(r, cfg.hyper(r).batch_size) for r in roles if cfg.hyper(r).batch_size > len(splits.train)]
        if too_big:  # (it was clamped to the whole split, silently)
            role, bs = too_big[0]
            raise UsageError(f"--{role}-batch-size {bs} is larger than the {len(splits.train)} training images: give "
                             "--batch-size (or --teacher-/--student-batch-size) at most the split's size, or more "
                             "data (--subset)")
        if seed == cfg.seeds[0]:
            check_teachers_fit(cfg, splits)
        sd = os.path.join(rd, f"seed{seed}")
        make_folder(sd)
        status.start(sd, todo)  # ("running"; "failed"/"stopped" where it raises: SeedStatus's exit in run_study)
        _on_main(lambda: write_json(os.path.join(sd, "noise.json"),  # (a collective: also the ranks' barrier)
                                    {"flipped": splits.flipped.tolist(), **splits.summary()}))
        splits = dataclasses.replace(splits, train=splits.train.to(dev), val=splits.val.to(dev),
                                     test=splits.test.to(dev))
        tdir = os.path.join(sd, "teacher")
        if "teacher" in todo:
            run_phase(cfg, "teacher", splits, seed, "teacher", cfg.model, tdir)
        if "vanilla" in todo:
            run_phase(cfg, "student", splits, seed, "vanilla", student, os.path.join(sd, "vanilla"))
        served = {}  # teacher checkpoint -> the phase distilled from it (this seed)
        for choice in cfg.teachers:
            phase = f"distill-{teacher_tag(choice)}"
            if phase not in todo:
                continue
            pdir, (path, cost) = os.path.join(sd, phase), teacher_checkpoint(choice, tdir)
            key = os.path.realpath(path)
            if key in served:  # the same teacher (best = dense when the best round is 0): the same student
                _on_main(lambda: os.path.lexists(pdir) or make_link(served[key], pdir))  # (also the barrier)
            else:
                teacher, teacher_arch = load_teacher(path, tdir if choice in ("best", "dense") else None)
                run_phase(cfg, "student", splits, seed, phase, student, pdir, teacher=teacher.to(dev),
                          teacher_cost=cost, teacher_arch=teacher_arch)
            served.setdefault(key, phase)
        status.done()
    return report.write_report(rd) if dist.is_main() else os.path.join(rd, "summary.md")


def check_teachers(cfg: Config) -> None:
    """A --teachers PATH must be a readable sparsetrain checkpoint before anything trains, and two
    paths must not share a file name (their phases are named after it: teacher_tag)."""
    paths, tags = [c for c in cfg.teachers if c not in ("best", "dense")], {}
    for choice in paths:
        if not os.path.isfile(choice):
            raise UsageError(f"--teachers {choice}: no such file (expected best, dense or a checkpoint path)")
        other = tags.setdefault(teacher_tag(choice), choice)
        if os.path.realpath(other) != os.path.realpath(choice):
            raise UsageError(f"--teachers {other} and {choice}: two checkpoints of one file name would share the "
                             f"phase distill-{teacher_tag(choice)}; rename one")
    for choice in paths:
        try:
            load_model(choice)
        except ValueError as e:  # corrupt (CorruptFile) or not a sparsetrain model checkpoint
            raise UsageError(f"--teachers {choice}: {e}") from None


def check_teacher_files(cfg: Config, rd: str) -> None:
    """Record the fingerprint (sha256) of every --teachers PATH in the run's config.json (what --reuse
    matches distilled students by); refuse to continue a student distilled from a file that has
    changed since (one not started yet takes the new file)."""
    now = {c: teacher_fingerprint(c) for c in cfg.teachers if c not in ("best", "dense")}
    path = os.path.join(rd, "config.json")
    old = _read_config(path)
    recorded = old.get("teacher_fingerprints") or {}
    for choice, fp in now.items():
        phase = f"distill-{teacher_tag(choice)}"
        started = [s for s in cfg.seeds if os.path.lexists(os.path.join(rd, f"seed{s}", phase))]
        if recorded.get(choice, fp) != fp and started:
            raise UsageError(f"--teachers {choice} is not the file seed {started[0]}'s distilled student started from "
                             f"(sha256 {recorded[choice][:12]}..., now {fp[:12]}...): restore it, or use another --out")
    if now and {**recorded, **now} != recorded:
        write_json(path, {**old, "teacher_fingerprints": {**recorded, **now}})


def check_teachers_fit(cfg: Config, splits) -> None:
    """A --teachers PATH must take this dataset's images and give one logit per class (checked on
    two training images before anything trains; a model of another dataset is refused here)."""
    xb = next(D.iterate(splits.train, 2))[0].cpu()
    for choice in (c for c in cfg.teachers if c not in ("best", "dense")):
        try:
            with torch.no_grad():
                shape = tuple(load_teacher(choice)[0](xb).shape)
        except (RuntimeError, ValueError, TypeError) as e:
            raise UsageError(f"--teachers {choice}: the model does not take {cfg.dataset}'s images "
                             f"{tuple(xb.shape[1:])} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if shape != (xb.shape[0], splits.num_classes):
            raise UsageError(f"--teachers {choice}: the model gives {shape[-1]} outputs per image, "
                             f"{cfg.dataset} has {splits.num_classes} classes")


def main(argv=None) -> int:
    """The CLI: every expected user error is one line on stderr and exit code 2 (a run directory in
    use by another process: EXIT_BUSY, 75); a traceback means a bug."""
    cfg, args = config_from_args(argv)
    try:  # (RANK read as a string: "x", or a single process's leftover "1", printed and wrote nothing, exit 0)
        rd, main_rank = run_dir_of(cfg), dist.launch_main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in notes(cfg, args) if main_rank and not args.report_only else ():
        print(f"note: {line}", file=sys.stderr)  # (settings the run ignores; a wall no round reaches)
    if (args.print_config or args.report_only) and not main_rank:
        return 0  # (under torchrun: rank 0 prints the settings or writes the report, once)
    if args.print_config:  # (the phases this command runs; the vanilla one, when it is the teacher run, says so)
        runs = set(sum(needed_phases(cfg), [])) | ({"vanilla"} if "vanilla" in cfg.phases else set())
        phases = {p: v for p, v in phase_settings(cfg).items() if p in runs}
        try:
            print(json.dumps({"run_dir": rd, "config": dataclasses.asdict(cfg), "phases": phases}, indent=1),
                  flush=True)
        except BrokenPipeError:  # (`--print-config | head`: the reader has what it wanted, no traceback)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    try:
        if args.report_only and not os.path.isfile(os.path.join(rd, "config.json")) and legacy_run_dir(cfg):
            rd = legacy_run_dir(cfg)  # a run directory in the earlier naming: reported as it is
        if (args.report_only or args.resume) and not os.path.isfile(os.path.join(rd, "config.json")):
            _read_config(os.path.join(rd, "config.json"))  # (one missing beside trained phases: not "no run")
            flag = "--report-only" if args.report_only else "--resume"
            raise UsageError(f"{flag}: no run to {'report' if args.report_only else 'resume'} in {rd} "
                             "(no config.json); run the same command without it to start one"
                             + other_runs_hint(cfg.out, rd, settings=result_settings(cfg)))
        if args.report_only:
            try:
                print(report.write_report(rd))
            except WriteFailed as e:  # (the report is written anew: there is no run to resume)
                e.advice = e.advice.replace("run the same command to resume", "run --report-only again")
                raise
            return 0
        check_teachers(cfg)
        summary = run_study(cfg)
        main_rank = dist.is_main()
    except _EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BUSY if isinstance(e, Busy) else 2
    except KeyboardInterrupt:
        print(f"interrupted: every finished epoch is saved in {rd}; the same command resumes", file=sys.stderr)
        return 130
    finally:
        dist.teardown()
    if main_rank:
        print(f"\nresults: {os.path.dirname(summary)}\nsummary: {summary}")
    return 0
