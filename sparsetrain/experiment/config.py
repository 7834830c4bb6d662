"""The experiment's one config dataclass, its validation and the CLI generated from it.

Resolution order: dataclass defaults < preset (profile x dataset group x model: presets.py's tables)
< explicit flags. `paper` = the paper's Table 4 for the model actually trained; `quick` = a CPU
budget that shows the same teacher -> vanilla student -> distilled student study in minutes.
Choice lists come from the registries they name (datasets, models, pruning rules, perturbations,
engines), so adding one of those needs no edit here.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields

from ..engine.bsr import BLOCK_SIZES
from ..engine.policy import ENGINES
from ..prune import PERTURBATIONS, RULES, SCOPES
from .data import NOISE_KINDS, POLICIES
from .config_types import Hyper, check_types, normalize
from .cli_flags import Parser, add_flag
from .datasets import DATASETS, HUMAN_NOISE
from .early_stop import EARLY_STOPS
from .devices import AMPS, check_spelling, resolve_amp, resolve_device, version_line
from .models import MODEL_NAMES, canonical_name, resolve_name
from .presets import PROFILES, STUDY, family, preset, schedule

__all__ = ["Config", "Hyper", "ADDED_DEFAULTS", "PROFILES", "ROLES", "ROLE_KEYS", "PHASE_KINDS", "preset", "schedule",
           "resolve_amp", "validate", "ignored_settings", "notes", "build_parser", "config_from_args", "resolve",
           "config_from_json"]

PHASE_KINDS = ("teacher", "vanilla", "distill")  # what --phases may name (distill: every --teachers choice)


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


ROLES = ("teacher", "student")
# the hyper-parameters of Table 4 that differ between models: one value per role
ROLE_KEYS = ("epochs", "batch_size", "lr", "milestones", "weight_decay", "rewind_iter")
_ROLE_HELP = {"epochs": "training epochs per round", "batch_size": "mini-batch size", "lr": "SGD learning rate",
              "milestones": "epochs at which the LR is multiplied by --drop", "weight_decay": "SGD weight decay",
              "rewind_iter": "iteration of the dense training that --perturb rewind returns to"}


def _role(role: str, key: str, default):
    return _f(default, f"{_ROLE_HELP[key]} of the {role} run{'s' if role == 'student' else ''} "
                       f"(default: Table 4 for the {role}'s model; --{key.replace('_', '-')} sets both roles)", role=role)


@dataclass
class Config:
    dataset: str = _f("cifar10", "dataset", positional=True, choices=DATASETS)
    eps: float = _f(0.2, "label-noise fraction in [0, 1) applied to the training (and validation) split")
    noise: str = _f("symmetric", "noise kind: symmetric (a different class, as the authors' code) or uniform (any class)",
                    choices=NOISE_KINDS)
    profile: str = _f("paper", "preset: paper (the paper's protocol, Table 4 per model) or quick (CPU budget, "
                      "minutes)", choices=PROFILES)
    model: str = _f("resnet18", f"teacher model: {', '.join(MODEL_NAMES)} (or vgg_d<delta>g<gamma>, e.g. vgg_d5g5)")
    student: str = _f("", "student model, vanilla and distilled (empty: same as --model)")
    teachers: tuple = _f(("dense", "best"), "teachers to distill from: dense (round 0 of the teacher run), best "
                         "(its best-validation round: the pruned teacher) or a checkpoint PATH; each runs a study")
    alpha: float = _f(0.8, "distillation weight alpha in [0, 1] (Eq. 2)")
    tau: float = _f(10.0, "distillation temperature tau > 0 (Eq. 2)")
    rate: float = _f(0.2, "fraction of the remaining weights pruned per round, in (0, 1)")
    wall: float = _f(0.999, "sparsity wall in (0, 1): as in the paper's Algorithm 1, no round is trained at or "
                     "beyond it (the last round is the last one below it)")
    scope: str = _f("global", "magnitude threshold: global (one over all layers) or layer (per layer); "
                    "for unstructured and block pruning", choices=SCOPES)
    structure: str = _f("unstructured", "what a round prunes: unstructured (weights), filter (l1 filter pruning per "
                        "layer that physically removes channels, Appendix G; sequential models only) or block "
                        "(whole --block x --block tiles by norm); both train dense layers, whatever --engine",
                        choices=tuple(RULES))
    block: int = _f(32, "tile side for --structure block: 16, 32 or 64 (the BSR block sizes)", choices=BLOCK_SIZES)
    perturb: str = _f("none", "after pruning: none (keep weights), rewind (to iteration --rewind-iter), reinit",
                      choices=PERTURBATIONS)
    engine: str = _f("auto", "auto (each layer >= 50%% sparse timed once, sparse vs dense masked, at its "
                     "sparsity; sparse where faster), dense (masked), sparse (every layer); sparse convs "
                     "followed by a BatchNorm run fused with it",
                     choices=ENGINES)
    early_stop: str = _f("none", "stop the student runs online: none, entropy (Algorithm 2 as written: entropy "
                         "<= T_E x the dense model's) or entropy-peak (entropy <= T_E x its running peak, after "
                         "--stop-falls consecutive falls); the summary replays both rules either way",
                         choices=EARLY_STOPS)
    t_e: float = _f(0.8, "Algorithm 2 entropy threshold T_E (relative to the dense or the peak entropy)")
    t_a: float = _f(0.8, "Algorithm 2 accuracy threshold T_A (relative to the best validation accuracy)")
    stop_falls: int = _f(1, "entropy-peak rule: consecutive entropy falls required before it may stop (>= 1)")
    teacher_epochs: int = _role("teacher", "epochs", 160)
    teacher_batch_size: int = _role("teacher", "batch_size", 128)
    teacher_lr: float = _role("teacher", "lr", 0.1)
    teacher_milestones: tuple = _role("teacher", "milestones", (80, 120))
    teacher_weight_decay: float = _role("teacher", "weight_decay", 1e-4)
    teacher_rewind_iter: int = _role("teacher", "rewind_iter", 1000)
    student_epochs: int = _role("student", "epochs", 160)
    student_batch_size: int = _role("student", "batch_size", 128)
    student_lr: float = _role("student", "lr", 0.1)
    student_milestones: tuple = _role("student", "milestones", (80, 120))
    student_weight_decay: float = _role("student", "weight_decay", 1e-4)
    student_rewind_iter: int = _role("student", "rewind_iter", 1000)
    momentum: float = _f(0.9, "SGD momentum (every run)")
    drop: float = _f(0.1, "LR drop factor at the milestones, in (0, 1] (every run)")
    # Appendix D's regularizers (Fig. 6), off by default as in the paper's main runs (l2: --weight-decay)
    l1: float = _f(0.0, "l1 regularization: lambda x sum |w| over every conv and linear weight added to each "
                   "training loss (Appendix D: 1e-5, 1e-4; 0: off)")
    dropout: float = _f(0.0, "a dropout layer of this probability before the classifier of every model the "
                        "study trains (Appendix D: 0.5; 0: none), in [0, 1)")
    augment: str = _f("standard", "training augmentation: standard (the dataset's shifts and flips; none for "
                      "MNIST-like and flowers102) or autoaugment (Appendix D: standard, then AutoAugment's "
                      "CIFAR-10 policy and one Cutout square of half the image side)", choices=POLICIES)
    val_fraction: float = _f(0.1, "validation split held out of the training data, in (0, 1) (flowers102 keeps "
                                  "its official one)")
    clean_val: bool = _f(False, "keep validation labels clean (default: same noise as training)")
    subset: int = _f(0, "use only N training images (0: all; all when the dataset has fewer): the first N, "
                        "spread over the classes for flowers102 and imagefolder")
    seeds: tuple = _f((0,), "seeds; each runs the whole study (mean +- std over them)")
    data_dir: str = _f("data", "where datasets are looked for / downloaded")
    no_download: bool = _f(False, "never download a missing dataset (fail with where it was looked for)")
    label_file: str = _f("", "cifar100n: the CIFAR-N human-label file (empty: DATA_DIR/CIFAR-100_human.pt)")
    out: str = _f("runs", "output root; the run directory is OUT/<dataset>-eps<eps>-<profile>-<models>-<hash of "
                  "the settings>, so the same settings find their run again and different ones never collide")
    device: str = _f("auto", "where every pass runs: auto (CUDA when available), cpu, cuda or cuda:N; a run "
                     "started on one device resumes on another")
    amp: str = _f("auto", "mixed precision of training and evaluation: bf16 or fp16 autocast (fp32 master weights; "
                  "fp16 with a GradScaler), off, or auto (bf16 on a CUDA device that supports it, else off; CPU "
                  "runs are fp32: the CPU kernels compute in fp32)", choices=AMPS)
    threads: int = _f(0, "torch threads (0: this run's CPU share: OMP_NUM_THREADS, else the CPUs the process "
                      "may run on); with several runs on one machine give each cores / runs")
    phases: tuple = _f(PHASE_KINDS, "phases this command trains: teacher, vanilla, distill; a phase they need "
                       "(the teacher of a distilled student) must be finished here or in a --reuse directory",
                       choices=PHASE_KINDS)
    reuse: tuple = _f((), "run directories whose finished phases are linked into this run instead of trained, "
                      "where they were trained with the same settings and data (how sweeps share one teacher)")

    def __post_init__(self):  # (1 and 1.0, a list and a tuple: one value, one run name; config_types)
        normalize(self)

    def resolved_student(self) -> str:
        return self.student or self.model

    def hyper(self, role: str) -> Hyper:
        """The training schedule of a role ("teacher" or "student")."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return Hyper(**{k: getattr(self, f"{role}_{k}") for k in ROLE_KEYS}, momentum=self.momentum, drop=self.drop)

    def separate_vanilla(self) -> bool:
        """Whether the vanilla student needs its own run: the teacher run is the vanilla run only when
        the student is the same model (any alias) trained the same way (rewind_iter: under rewind only)."""
        hp = {r: self.hyper(r) if self.perturb == "rewind" else dataclasses.replace(self.hyper(r), rewind_iter=0)
              for r in ROLES}
        return canonical_name(self.resolved_student()) != canonical_name(self.model) or hp["student"] != hp["teacher"]


# settings added after runs were named: at their defaults they are left out of a run's name and a
# phase's key (study.result_settings, reuse.phase_key), so older runs keep theirs
ADDED_DEFAULTS = {k: Config.__dataclass_fields__[k].default for k in ("amp", "l1", "dropout", "augment")}


# ---------------------------------------------------------------------------- validation
_F32_MAX = 3.4028234663852886e38  # float32's largest (the optimizer applies lr and weight decay to float32 weights)
_TAU_MAX = 1e18  # (tau^2 stays finite in float32: < 3.4e38)


def _check_models(values: dict) -> None:
    for k in ("model", "student"):
        if values.get(k) or k == "model" and k in values:  # (an empty --student: the teacher's model)
            try:
                resolve_name(values[k])
            except ValueError as e:
                raise ValueError(f"--{k}: {e}") from None


def validate(cfg: Config, flags: dict | None = None, here: bool = True) -> None:
    """Raises ValueError naming the argument and what was expected (`flags`: {field: the flag that
    set it}, e.g. teacher_lr: --lr); TypeError for a field of another type (a Config built in Python). `here`:
    whether --device and --amp must run on this machine (else their spelling alone: devices.check_spelling)."""
    flags = flags or {}
    check_types(cfg)
    for f in fields(Config):
        allowed = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        many = isinstance(value, tuple)  # (--phases: each value must be a choice)
        if allowed is not None and any(v not in allowed for v in (value if many else (value,))):
            raise ValueError(f"--{f.name.replace('_', '-')} must be {'some' if many else 'one'} of "
                             f"{', '.join(map(str, allowed))}, got {' '.join(map(str, value)) if many else repr(value)}")
    checks = [("eps", 0.0 <= cfg.eps < 1.0, "in [0, 1)"), ("rate", 0.0 < cfg.rate < 1.0, "in (0, 1)"),
              ("wall", 0.0 < cfg.wall < 1.0, "in (0, 1) (above the dense model's sparsity, 0)"),
              ("alpha", 0.0 <= cfg.alpha <= 1.0, "in [0, 1]"),
              ("tau", 0 < cfg.tau <= _TAU_MAX, f"> 0 and <= {_TAU_MAX:g} (tau^2 scales the KD loss in float32)"),
              ("t_e", 0 < cfg.t_e <= 1, "in (0, 1] (a fraction of the dense or peak entropy)"),
              ("t_a", 0 < cfg.t_a <= 1, "in (0, 1] (a fraction of the best validation accuracy)"),
              ("stop_falls", cfg.stop_falls >= 1, ">= 1"), ("subset", cfg.subset >= 0, ">= 0 (0: all)"),
              ("val_fraction", 0.0 <= cfg.val_fraction < 1.0 and (cfg.val_fraction > 0 or cfg.dataset == "flowers102"),
               "in (0, 1) (the study picks each run's best round and stops early on the validation split)"),
              ("threads", 0 <= cfg.threads <= 4096, "in [0, 4096] (0: this run's CPU share)"),
              ("out", cfg.out.strip() != "", "a folder path (the runs' root), not empty"),
              ("data_dir", cfg.data_dir.strip() != "", "a folder path, not empty (its default: data)"),
              ("momentum", 0.0 <= cfg.momentum < 1.0, "in [0, 1)"), ("drop", 0 < cfg.drop <= 1, "in (0, 1]"),
              ("l1", 0 <= cfg.l1 <= _F32_MAX, ">= 0 and finite in float32 (<= 3.4e38)"),
              ("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"),
              ("seeds", len(set(cfg.seeds)) == len(cfg.seeds) > 0 and all(0 <= s < 2**32 for s in cfg.seeds),
               "one or more distinct seeds in [0, 2^32)"),  # (data.seeded: a larger seed shares streams)
              ("teachers", len(set(cfg.teachers)) == len(cfg.teachers) > 0, "one or more distinct of best, dense, PATH"),
              ("phases", len(set(cfg.phases)) == len(cfg.phases) > 0, "one or more distinct of " + ", ".join(PHASE_KINDS))]
    for role in ROLES:
        hp = cfg.hyper(role)
        checks += [(f"{role}_epochs", 1 <= hp.epochs <= 1000, "in [1, 1000] (round r's epoch e draws stream e + 1000 r)"),
                   (f"{role}_batch_size", hp.batch_size >= 2, ">= 2 (BatchNorm trains on batch statistics)"),
                   (f"{role}_lr", 0 < hp.lr <= _F32_MAX, "> 0 and finite in float32 (<= 3.4e38)"),
                   (f"{role}_weight_decay", 0 <= hp.weight_decay <= _F32_MAX, ">= 0 and finite in float32 (<= 3.4e38)"),
                   (f"{role}_rewind_iter", hp.rewind_iter >= 0, ">= 0"),
                   (f"{role}_milestones", all(m >= 1 for m in hp.milestones)
                    and list(hp.milestones) == sorted(set(hp.milestones)), "increasing epochs >= 1")]
    for name, ok, expected in checks:
        if not ok:
            flag = flags.get(name, f"--{name.replace('_', '-')}")
            raise ValueError(f"{flag} must be {expected}, got {getattr(cfg, name)!r}")
    _check_models({"model": cfg.model, "student": cfg.student})
    if here:
        resolve_amp(cfg.amp, resolve_device(cfg.device))
    else:
        check_spelling(cfg.device, cfg.amp)
    if cfg.dataset in HUMAN_NOISE and cfg.eps > 0:
        raise ValueError(f"--eps must be 0 for {cfg.dataset} (its human labels are the noise), got {cfg.eps}")
    if cfg.label_file and cfg.dataset not in HUMAN_NOISE:  # (it would be ignored, and change the run's name)
        raise ValueError(f"--label-file is for {', '.join(HUMAN_NOISE)} (human labels), not {cfg.dataset}")
    if cfg.structure == "filter" and any(family(n) == "resnet" for n in (cfg.model, cfg.resolved_student())):
        raise ValueError("--structure filter supports sequential models (vgg_like, lenet300); residual "
                         f"connections tie channel counts (got --model {cfg.model} / student {cfg.resolved_student()})")


def ignored_settings(cfg: Config) -> dict[str, str]:
    """{field: why} for the settings this configuration never reads: they change no result but still
    name the run; the CLI notes those given (`notes`). A phase's key leaves out the pruning ones and
    rewind_iter (reuse._applying, _hyper), so a sweep refuses an axis of them (twin points)."""
    out = {}
    if cfg.structure != "block":
        out["block"] = f"it is the tile side of --structure block, and this run prunes {cfg.structure}"
    if cfg.structure == "filter":
        out["scope"] = "--structure filter ranks each layer's filters on their own"
    if RULES[cfg.structure].needs_dense:
        out["engine"] = f"--structure {cfg.structure} trains dense masked layers whatever the engine"
    if cfg.perturb != "rewind":
        out.update({f"{r}_rewind_iter": f"only --perturb rewind reads it, and this run's is {cfg.perturb}"
                    for r in ROLES})
    if cfg.eps == 0:
        out["noise"] = "it is the kind of --eps's label noise, and --eps is 0"
        if cfg.dataset not in HUMAN_NOISE:
            out["clean_val"] = "with --eps 0 every label is clean"
    if cfg.alpha == 0:
        out["tau"] = "it is the temperature of Eq. 2's distillation term, which --alpha 0 turns off"
    if cfg.dataset == "flowers102":  # (data.load_dataset: its official split, whatever the fraction)
        out["val_fraction"] = "flowers102 keeps its official validation split"
    return out


def notes(cfg: Config, args: argparse.Namespace) -> list[str]:
    """One line per setting the command line gave away from its preset that the run ignores, and for a
    wall no pruned round reaches: the run starts anyway (stderr notes, not errors)."""
    ref = {**dataclasses.asdict(Config(dataset=cfg.dataset, profile=cfg.profile)),
           **preset(cfg.profile, cfg.dataset, cfg.model or None, cfg.student or None)}
    out, said = [], set()
    for k, why in ignored_settings(cfg).items():
        both = k.split("_", 1)[1] if k.split("_", 1)[0] in ROLES else None  # (--rewind-iter sets both roles)
        name = k if getattr(args, k, None) is not None else both if both and getattr(args, both) is not None else None
        if name is None or getattr(cfg, k) == ref[k] or name in said:
            continue
        said.add(name)
        v = getattr(cfg, k)
        shown = f"--{name.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {v}")
        out.append(f"{shown} has no effect: {why}; it still names the run")
    late = {}  # (the preset's milestones kept with --epochs alone, as documented; given ones that late are refused)
    for r in ROLES:  # (1 epoch: no milestone can lower the LR)
        if cfg.hyper(r).epochs > 1 and (ms := " ".join(str(m) for m in cfg.hyper(r).milestones if m >= cfg.hyper(r).epochs)):
            late.setdefault((ms, cfg.hyper(r).epochs), []).append(r)
    for (ms, n), rs in late.items():
        whose = "the teacher run's" if rs == ["teacher"] else f"the {' and '.join(rs)} runs'"
        out.append(f"{whose} milestone(s) {ms} (--profile's) at or past their {n} epochs never lower the LR; give "
                   "--milestones (or --teacher-/--student-milestones) below the epochs")
    if cfg.structure != "filter" and cfg.rate >= cfg.wall:  # (a round trains while its target is below the wall)
        out.append(f"--wall {cfg.wall:g} is at or below the first pruned round's sparsity (--rate {cfg.rate:g}): only "
                   "the dense round 0 trains" + ", unless a block round prunes less" * (cfg.structure == "block"))
    return out


# ---------------------------------------------------------------------------- CLI
# the fields a profile's preset sets for every dataset (no single default) or for some (eps: cifar100n)
PRESET_ALWAYS = frozenset(set.intersection(*(set(row) for row in STUDY.values()))
                          | {f"{r}_{k}" for r in ROLES for k in ROLE_KEYS})
PRESET_FIELDS = PRESET_ALWAYS | {k for row in STUDY.values() for k in row} | {"eps"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sparsetrain.experiment",
        description="DSD2 study: iterative magnitude pruning of a teacher, of a vanilla student, and of "
                    "students distilled from the teacher; entropy, early stop and FLOPs per round.")
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if f.metadata.get("positional"):
            p.add_argument(f.name, help=f.metadata["help"], choices=f.metadata.get("choices"))
        else:
            add_flag(p, f"--{f.name.replace('_', '-')}", hints[f.name], f.default, f.metadata["help"],
                     f.metadata.get("choices"),
                     preset="always" if f.name in PRESET_ALWAYS else "some" if f.name in PRESET_FIELDS else "")
    for k in ROLE_KEYS:  # both roles at once; --teacher-<k> / --student-<k> set one role
        f = next(f for f in fields(Config) if f.name == f"teacher_{k}")
        p.add_argument(f"--{k.replace('_', '-')}", dest=k, default=None, nargs="+" if hints[f.name] is tuple else None,
                       type=type(f.default[0]) if hints[f.name] is tuple else hints[f.name],
                       help=f"{_ROLE_HELP[k]} of every run (teacher and students) (default: unset: each role "
                            f"keeps its own; --teacher-{k.replace('_', '-')} / --student-{k.replace('_', '-')}, given "
                            "too, win for their role)")
    p.add_argument("--version", action="version", version=version_line())
    what = p.add_mutually_exclusive_group()  # (what the command does, besides running: one at most)
    what.add_argument("--resume", action="store_true",
                      help="require an existing run to continue (error if the run directory holds none); without "
                           "it, re-running the same command also continues an interrupted run")
    what.add_argument("--report-only", action="store_true", help="only (re)write summary.md and plots of the run "
                      "the other flags name (give those it was started with: its settings find it)")
    what.add_argument("--print-config", action="store_true",
                      help="print the resolved configuration of every phase as JSON and exit (reads no data)")
    return p


def resolve(given: dict, both: dict, here: bool = True) -> Config:
    """The Config of the settings `given` ({field: value}, the dataset and profile among them) and `both` ({a
    ROLE_KEYS key: value}, each role's unless `given` has the role's own) over the profile's preset (lists as
    tuples, -0.0 as 0.0). ValueError naming the flag for a bad value, TypeError for one of another type; `here`:
    validate's."""
    given, flags = dict(given), {}
    for k, v in both.items():
        for role in ROLES:
            if f"{role}_{k}" not in given:
                given[f"{role}_{k}"], flags[f"{role}_{k}"] = v, f"--{k.replace('_', '-')}"
    given = {k: tuple(v) if isinstance(v, list) else v + 0.0 if isinstance(v, float) else v for k, v in given.items()}
    base = Config(dataset=given.get("dataset", "cifar10"), profile=given.get("profile", "paper"))
    _check_models(given)  # (the preset reads the models' families)
    p = preset(base.profile, base.dataset, given.get("model"), given.get("student"))
    cfg = Config(**{**dataclasses.asdict(base), **p, **given})
    validate(cfg, flags, here)
    for role in ROLES:  # (given milestones past the run's epochs would never lower the LR; the preset's
        hp, key = cfg.hyper(role), f"{role}_milestones"  # with --epochs alone are kept, as documented)
        if key in given and any(m >= hp.epochs for m in hp.milestones):
            flag = flags.get(key, f"--{key.replace('_', '-')}")
            if hp.epochs == 1:  # ([1, 1) named no epoch: say why none fits and what to give)
                raise ValueError(f"{flag}: no milestone fits 1 epoch ({flags.get(f'{role}_epochs', f'--{role}-epochs')} "
                                 f"1, the {role} runs' LR never drops); leave {flag} out, got "
                                 f"{' '.join(map(str, hp.milestones))}")
            raise ValueError(f"{flag} must be epochs in [1, {hp.epochs}) (the {role} runs' epochs: a milestone "
                             f"at or past the last epoch never lowers the LR), got {' '.join(map(str, hp.milestones))}")
    return cfg


def config_from_args(argv=None, here: bool | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a resolved Config: defaults < preset (per role) < --<key> (both roles) <
    --<role>-<key>. Bad arguments exit with code 2 and a one-line message. `here` (validate's): by default
    unless --print-config, which shows the settings of a run planned for another machine (a GPU's) too."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    try:
        cfg = resolve(given, {k: getattr(args, k) for k in ROLE_KEYS if getattr(args, k) is not None},
                      not args.print_config if here is None else here)
    except ValueError as e:
        parser.error(str(e))
    return cfg, args


def config_from_json(d: dict) -> Config:
    """A Config from a run directory's config.json (lists back to tuples; extra keys such as
    git_commit ignored, missing ones at their defaults); TypeError naming a key of the wrong type."""
    names = {f.name for f in fields(Config)}
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})
    check_types(cfg, key=True)  # (a hand-edited "block": "32" was a TypeError from make_rule, rounds later)
    return cfg
