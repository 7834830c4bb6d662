"""The experiment's one config dataclass, its named presets and the CLI generated from it.

Resolution order: dataclass defaults < preset (profile x dataset x model) < explicit flags.
`paper` = the paper's Table 4 for the chosen model and dataset; `quick` = a CPU budget that shows
the same teacher -> vanilla student -> distilled student study in minutes (see SCIENCE.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields

from .data import DATASETS

PROFILES = ("paper", "quick")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    dataset: str = _f("cifar10", f"dataset: {', '.join(DATASETS)}", positional=True)
    eps: float = _f(0.2, "label-noise fraction in [0, 1) applied to the training (and validation) split")
    noise: str = _f("symmetric", "noise kind: symmetric (a different class, the paper's) or uniform (any class)")
    profile: str = _f("paper", "preset: paper (Table 4 hyper-parameters) or quick (CPU budget, minutes)")
    model: str = _f("resnet18", "teacher / vanilla model: resnet18, resnet50, vgg_like (vgg_d5g5...), lenet300")
    student: str = _f("", "student model for the distillation study (empty: same as --model)")
    teachers: tuple = _f(("best",), "teachers to distill from: best (best-validation round of the teacher "
                         "run), dense (its round 0) or a checkpoint PATH; several run several studies")
    alpha: float = _f(0.8, "distillation weight alpha in [0, 1] (Eq. 2)")
    tau: float = _f(10.0, "distillation temperature tau > 0 (Eq. 2)")
    rate: float = _f(0.2, "fraction of the remaining weights pruned per round, in (0, 1)")
    wall: float = _f(0.999, "stop after the first round whose sparsity reaches this (0, 1)")
    scope: str = _f("global", "magnitude threshold: global (one over all layers) or layer (per layer); "
                    "for unstructured and block pruning")
    structure: str = _f("unstructured", "what a round prunes: unstructured (weights), filter (l1 filter "
                        "pruning per layer that physically removes channels, Appendix G; sequential models "
                        "only) or block (whole --block x --block tiles by norm); both train dense layers, whatever --engine")
    block: int = _f(32, "tile side for --structure block: 16, 32 or 64 (the BSR block sizes)")
    perturb: str = _f("none", "after pruning: none (keep weights), rewind (to iteration --rewind-iter), reinit")
    rewind_iter: int = _f(1000, "iteration of the dense training that rewind returns to")
    engine: str = _f("auto", "auto (sparse kernels per layer once sparse enough), dense (masked), sparse")
    early_stop: str = _f("none", "none (run to the wall) or entropy (Algorithm 2, stops the runs)")
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


# ---------------------------------------------------------------------------- presets
def _table4(model: str, dataset: str) -> dict:
    """The paper's Table 4 (per model family and dataset)."""
    if dataset == "imagefolder":
        return dict(epochs=90, batch_size=1024, lr=0.1, milestones=(30, 60), weight_decay=1e-4, rewind_iter=0)
    if dataset == "flowers102":
        return dict(epochs=160, batch_size=64, lr=0.001, milestones=(80, 120), weight_decay=1e-5, rewind_iter=0)
    vgg = model.startswith("vgg")
    return dict(epochs=160, batch_size=128, lr=0.001 if vgg else 0.1, milestones=(80, 120), weight_decay=1e-4,
                rewind_iter=0 if vgg else 1000)


def preset(profile: str, dataset: str) -> dict:
    mnist_like = dataset in ("mnist", "fashion-mnist")
    if profile == "paper":
        p = dict(model="lenet300" if mnist_like else "resnet18")
        if dataset in ("cifar10", "cifar100", "cifar100n"):
            p["student"] = "vgg_d5g5"  # the paper's Fig. 5 / Table 1 student, ResNet-18 teacher
        p.update(_table4(p["model"], dataset))
        if mnist_like:  # not in the paper: the SCIENCE.md schedule at full size
            p.update(epochs=30, milestones=(15, 22), lr=0.1, wall=0.995)
        return p
    # quick: SCIENCE.md's measured CPU study (LeNet-300-100, 10k images, 30 epochs x 24 rounds)
    if mnist_like:
        return dict(model="lenet300", student="", subset=10000, epochs=30, milestones=(15, 22), lr=0.1,
                    batch_size=128, wall=0.995, rewind_iter=0)
    return dict(model="vgg_d1g5", student="", subset=5000, epochs=10, milestones=(5, 8), lr=0.01,
                batch_size=128, wall=0.99, rewind_iter=0)


# ---------------------------------------------------------------------------- validation
def validate(cfg: Config) -> None:
    """Raises ValueError naming the argument and what was expected."""
    from .models import build_model  # noqa: F401  (import check only)
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; known: {', '.join(DATASETS)}")
    if cfg.profile not in PROFILES:
        raise ValueError(f"--profile must be one of {PROFILES}, got {cfg.profile!r}")
    if not 0.0 <= cfg.eps < 1.0:
        raise ValueError(f"--eps must be in [0, 1), got {cfg.eps}")
    if not 0.0 < cfg.rate < 1.0:
        raise ValueError(f"--rate must be in (0, 1), got {cfg.rate}")
    if not 0.0 < cfg.wall < 1.0:
        raise ValueError(f"--wall must be in (0, 1) and above the dense model's sparsity (0), got {cfg.wall}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {cfg.alpha}")
    if not cfg.tau > 0:
        raise ValueError(f"--tau must be > 0, got {cfg.tau}")
    choices = {"noise": ("symmetric", "uniform"), "scope": ("global", "layer"),
               "perturb": ("none", "rewind", "reinit"), "engine": ("auto", "dense", "sparse"),
               "early_stop": ("none", "entropy"), "structure": ("unstructured", "filter", "block")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"--{k.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, k)!r}")
    for k in ("epochs", "batch_size"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(cfg, k)}")
    if isinstance(cfg.block, bool) or cfg.block not in (16, 32, 64):
        raise ValueError(f"--block must be one of (16, 32, 64), got {cfg.block}")
    if cfg.structure == "filter" and any(n.lower().startswith("resnet") for n in (cfg.model, cfg.resolved_student())):
        raise ValueError("--structure filter supports sequential models (vgg_like, lenet300); residual "
                         f"connections tie channel counts (got --model {cfg.model} / student {cfg.resolved_student()})")
    if not cfg.seeds:
        raise ValueError("--seeds needs at least one seed")
    if not cfg.teachers:
        raise ValueError("--teachers needs at least one of best, dense, PATH")
    from .models import MODEL_NAMES, _VGG_SHORT
    for k in ("model", "student"):
        name = getattr(cfg, k)
        if name and name not in MODEL_NAMES and not _VGG_SHORT.match(name):
            raise ValueError(f"--{k} {name!r} is not a known model; known: {', '.join(MODEL_NAMES)} "
                             f"or vgg_d<delta>g<gamma>")


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sparsetrain.experiment",
        description="DSD2 study: iterative magnitude pruning of a teacher, of a vanilla student, and of a "
                    "student distilled from the teacher; entropy, early stop and FLOPs per round.")
    for f in fields(Config):
        name, help_ = f.name, f.metadata["help"]
        t = typing.get_type_hints(Config)[name]
        if f.metadata.get("positional"):
            p.add_argument(name, help=help_)
        elif t is bool:
            p.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=None, help=help_)
        elif t is tuple:
            elem = type(f.default[0]) if f.default else str
            p.add_argument(f"--{name.replace('_', '-')}", nargs="+", type=elem, default=None,
                           help=f"{help_} (default {' '.join(map(str, f.default))})")
        else:
            p.add_argument(f"--{name.replace('_', '-')}", type=t, default=None, help=f"{help_} (default {f.default})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory (re-running the same command does too)")
    p.add_argument("--report-only", action="store_true", help="only (re)write summary.md and plots")
    return p


def config_from_args(argv=None) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a resolved Config; bad arguments exit with code 2 and a clear message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    base = Config(dataset=given.get("dataset", "cifar10"), profile=given.get("profile", "paper"))
    if base.profile not in PROFILES:
        parser.error(f"--profile must be one of {PROFILES}, got {base.profile!r}")
    values = {**dataclasses.asdict(base), **preset(base.profile, base.dataset), **given}
    if "model" in given and "student" not in given:
        values["student"] = ""  # an explicit --model is also the student unless --student says otherwise
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if "model" in given and "epochs" not in given and base.profile == "paper":
        values.update({k: v for k, v in _table4(values["model"], base.dataset).items() if k not in given})
    cfg = Config(**values)
    try:
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg, args
