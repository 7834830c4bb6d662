"""The experiment's one config dataclass, its named presets (as data) and the CLI generated from it.

Resolution order: dataclass defaults < preset (profile x dataset group x model, the tables below)
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
from .data import NOISE_KINDS
from .datasets import DATASETS
from .early_stop import EARLY_STOPS
from .models import MODEL_NAMES, resolve_name

__all__ = ["Config", "PROFILES", "preset", "validate", "build_parser", "config_from_args"]

PROFILES = ("paper", "quick")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    dataset: str = _f("cifar10", "dataset", positional=True, choices=DATASETS)
    eps: float = _f(0.2, "label-noise fraction in [0, 1) applied to the training (and validation) split")
    noise: str = _f("symmetric", "noise kind: symmetric (a different class, the paper's) or uniform (any class)", choices=NOISE_KINDS)
    profile: str = _f("paper", "preset: paper (Table 4 hyper-parameters) or quick (CPU budget, minutes)", choices=PROFILES)
    model: str = _f("resnet18", f"teacher / vanilla model: {', '.join(MODEL_NAMES)} (or vgg_d<delta>g<gamma>, e.g. vgg_d5g5)")
    student: str = _f("", "student model for the distillation study (empty: same as --model)")
    teachers: tuple = _f(("best",), "teachers to distill from: best (best-validation round of the teacher "
                         "run), dense (its round 0) or a checkpoint PATH; several run several studies")
    alpha: float = _f(0.8, "distillation weight alpha in [0, 1] (Eq. 2)")
    tau: float = _f(10.0, "distillation temperature tau > 0 (Eq. 2)")
    rate: float = _f(0.2, "fraction of the remaining weights pruned per round, in (0, 1)")
    wall: float = _f(0.999, "stop after the first round whose sparsity reaches this (0, 1)")
    scope: str = _f("global", "magnitude threshold: global (one over all layers) or layer (per layer); "
                    "for unstructured and block pruning", choices=SCOPES)
    structure: str = _f("unstructured", "what a round prunes: unstructured (weights), filter (l1 filter "
                        "pruning per layer that physically removes channels, Appendix G; sequential models "
                        "only) or block (whole --block x --block tiles by norm); both train dense layers, whatever --engine", choices=tuple(RULES))
    block: int = _f(32, "tile side for --structure block: 16, 32 or 64 (the BSR block sizes)", choices=BLOCK_SIZES)
    perturb: str = _f("none", "after pruning: none (keep weights), rewind (to iteration --rewind-iter), reinit", choices=PERTURBATIONS)
    rewind_iter: int = _f(1000, "iteration of the dense training that rewind returns to")
    engine: str = _f("auto", "auto (sparse kernels per layer once sparse enough), dense (masked), sparse", choices=ENGINES)
    early_stop: str = _f("none", "none (run to the wall) or entropy (Algorithm 2, stops the runs)", choices=EARLY_STOPS)
    t_e: float = _f(0.8, "Algorithm 2 entropy threshold T_E (relative to the dense model's)")
    t_a: float = _f(0.8, "Algorithm 2 accuracy threshold T_A (relative to the best validation accuracy)")
    epochs: int = _f(160, "training epochs per round")
    lr: float = _f(0.1, "SGD learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    milestones: tuple = _f((80, 120), "epochs at which the LR is multiplied by --drop")
    drop: float = _f(0.1, "LR drop factor at the milestones")
    batch_size: int = _f(128, "mini-batch size")
    val_fraction: float = _f(0.1, "validation split held out of the training data")
    clean_val: bool = _f(False, "keep validation labels clean (default: same noise as training)")
    subset: int = _f(0, "use only the first N training images (0: all)")
    seeds: tuple = _f((0,), "seeds; each runs the whole study (mean +- std over them)")
    data_dir: str = _f("data", "where datasets are looked for / downloaded")
    no_download: bool = _f(False, "never download a missing dataset (fail with where it was looked for)")
    label_file: str = _f("", "cifar100n: the CIFAR-N human-label file (default DATA_DIR/CIFAR-100_human.pt)")
    out: str = _f("runs", "output root; the run directory is OUT/<dataset>-eps<eps>-<profile>")
    threads: int = _f(0, "torch threads (0: torch's default)")

    def resolved_student(self) -> str:
        return self.student or self.model


# ---------------------------------------------------------------------------- presets (data)
# Which dataset group a dataset's hyper-parameters come from.
GROUP = {"cifar10": "cifar", "cifar100": "cifar", "cifar100n": "cifar", "mnist": "mnist",
         "fashion-mnist": "mnist", "flowers102": "flowers", "imagefolder": "imagenet"}
# The paper's Table 4 per (dataset group, model family); "*" = any family. The MNIST-like row is
# not in the paper: the quick study's schedule (README, "What the quick study shows") at full size.
TABLE4 = {
    ("cifar", "*"): dict(epochs=160, batch_size=128, lr=0.1, milestones=(80, 120), weight_decay=1e-4,
                         rewind_iter=1000),
    ("cifar", "vgg"): dict(epochs=160, batch_size=128, lr=0.001, milestones=(80, 120), weight_decay=1e-4,
                           rewind_iter=0),
    ("flowers", "*"): dict(epochs=160, batch_size=64, lr=0.001, milestones=(80, 120), weight_decay=1e-5,
                           rewind_iter=0),
    ("imagenet", "*"): dict(epochs=90, batch_size=1024, lr=0.1, milestones=(30, 60), weight_decay=1e-4,
                            rewind_iter=0),
    ("mnist", "*"): dict(epochs=30, batch_size=128, lr=0.1, milestones=(15, 22), weight_decay=1e-4,
                         rewind_iter=1000, wall=0.995),
}
# The models each profile studies per dataset group (teacher --model, --student).
MODELS = {
    ("paper", "cifar"): dict(model="resnet18", student="vgg_d5g5"),  # Fig. 5 / Table 1
    ("paper", "mnist"): dict(model="lenet300", student=""),
    ("paper", "flowers"): dict(model="resnet18", student=""),
    ("paper", "imagenet"): dict(model="resnet18", student=""),
    ("quick", "mnist"): dict(model="lenet300", student=""),
    ("quick", "*"): dict(model="vgg_d1g5", student=""),
}
# The quick profile: a CPU budget (LeNet-300-100 on 10k MNIST-like images, 30 epochs x 24 rounds to
# 99.5%, the README's quick study; a small VGG-like on 5k images elsewhere), whatever the model.
QUICK = {
    "mnist": dict(subset=10000, epochs=30, milestones=(15, 22), lr=0.1, batch_size=128, wall=0.995, rewind_iter=0),
    "*": dict(subset=5000, epochs=10, milestones=(5, 8), lr=0.01, batch_size=128, wall=0.99, rewind_iter=0),
}


def _family(model: str) -> str:
    """Model family for Table 4: resnet, vgg, lenet."""
    return resolve_name(model)[0].rstrip("0123456789").removesuffix("_like")


def preset(profile: str, dataset: str, model: str | None = None) -> dict:
    """The profile's settings for a dataset: its models (an explicit `model` replaces them and is
    its own student) and the hyper-parameters of the model actually trained."""
    group = GROUP[dataset]
    p = dict(MODELS.get((profile, group), MODELS.get((profile, "*"))))
    if model:
        p = dict(model=model, student="")
    if profile == "paper":
        p.update(TABLE4.get((group, _family(p["model"])), TABLE4[(group, "*")]))
    else:
        p.update(QUICK.get(group, QUICK["*"]))
    return p


# ---------------------------------------------------------------------------- validation
def _check_models(values: dict) -> None:
    for k in ("model", "student"):
        if values.get(k):
            try:
                resolve_name(values[k])
            except ValueError as e:
                raise ValueError(f"--{k}: {e}") from None


def validate(cfg: Config) -> None:
    """Raises ValueError naming the argument and what was expected."""
    for f in fields(Config):
        allowed = f.metadata.get("choices")
        if allowed is not None and getattr(cfg, f.name) not in allowed:
            raise ValueError(f"--{f.name.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, "
                             f"got {getattr(cfg, f.name)!r}")
    checks = [("eps", 0.0 <= cfg.eps < 1.0, "in [0, 1)"), ("rate", 0.0 < cfg.rate < 1.0, "in (0, 1)"),
              ("wall", 0.0 < cfg.wall < 1.0, "in (0, 1) (above the dense model's sparsity, 0)"),
              ("alpha", 0.0 <= cfg.alpha <= 1.0, "in [0, 1]"), ("tau", cfg.tau > 0, "> 0"),
              ("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
              ("lr", cfg.lr > 0, "> 0"), ("subset", cfg.subset >= 0, ">= 0 (0: all)"),
              ("val_fraction", 0.0 <= cfg.val_fraction < 1.0, "in [0, 1)"),
              ("threads", cfg.threads >= 0, ">= 0 (0: torch's default)"),
              ("rewind_iter", cfg.rewind_iter >= 0, ">= 0"), ("drop", cfg.drop > 0, "> 0"),
              ("seeds", len(cfg.seeds) > 0 and all(s >= 0 for s in cfg.seeds), "one or more seeds >= 0"),
              ("teachers", len(cfg.teachers) > 0, "at least one of best, dense, PATH")]
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {getattr(cfg, name)!r}")
    _check_models({"model": cfg.model, "student": cfg.student})
    if RULES[cfg.structure].name == "filter" and any(_family(n) == "resnet" for n in (cfg.model, cfg.resolved_student())):
        raise ValueError("--structure filter supports sequential models (vgg_like, lenet300); residual "
                         f"connections tie channel counts (got --model {cfg.model} / student {cfg.resolved_student()})")


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsetrain.experiment",
        description="DSD2 study: iterative magnitude pruning of a teacher, of a vanilla student, and of a "
                    "student distilled from the teacher; entropy, early stop and FLOPs per round.")
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        name, help_, t = f.name, f.metadata["help"], hints[f.name]
        flag, choices = f"--{name.replace('_', '-')}", f.metadata.get("choices")
        if f.metadata.get("positional"):
            p.add_argument(name, help=help_, choices=choices)
        elif t is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
        elif t is tuple:
            elem = type(f.default[0]) if f.default else str
            p.add_argument(flag, nargs="+", type=elem, default=None,
                           help=f"{help_} (default {' '.join(map(str, f.default))})")
        else:
            p.add_argument(flag, type=t, default=None, choices=choices, help=f"{help_} (default {f.default})")
    p.add_argument("--resume", action="store_true",
                   help="require an existing run to continue (error if the run directory holds none); without "
                        "it, re-running the same command also continues an interrupted run")
    p.add_argument("--report-only", action="store_true", help="only (re)write summary.md and plots of the run")
    return p


def config_from_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a resolved Config; bad arguments exit with code 2 and a clear message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    base = Config(dataset=given.get("dataset", "cifar10"), profile=given.get("profile", "paper"))
    try:
        _check_models(given)  # (the preset reads the model's family)
        values = {**dataclasses.asdict(base), **preset(base.profile, base.dataset, given.get("model")), **given}
        cfg = Config(**values)
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg, args
