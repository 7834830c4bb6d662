"""The experiment's named presets, as data: the paper's Table 4 per (dataset group, model family),
the quick profile's CPU budget, and what each profile studies per dataset group (config.py resolves
them: dataclass defaults < preset < explicit flags)."""
from __future__ import annotations

from .datasets import HUMAN_NOISE
from .models import resolve_name

__all__ = ["PROFILES", "GROUP", "TABLE4", "QUICK", "STUDY", "family", "schedule", "preset"]

PROFILES = ("paper", "quick")


# ---------------------------------------------------------------------------- presets (data)
# Which dataset group a dataset's hyper-parameters come from.
GROUP = {"cifar10": "cifar", "cifar100": "cifar", "cifar100n": "cifar", "mnist": "mnist",
         "fashion-mnist": "mnist", "flowers102": "flowers", "imagefolder": "imagenet"}
# The paper's Table 4 per (dataset group, model family); "*" = any family. The MNIST-like row is
# not in the paper: the quick study's schedule (README, "What the quick study shows") at full size,
# but rewind 1000 (CIFAR's ResNet row; quick's is 0).
TABLE4 = {
    ("cifar", "*"): dict(epochs=160, batch_size=128, lr=0.1, milestones=(80, 120), weight_decay=1e-4, rewind_iter=1000),
    ("cifar", "vgg"): dict(epochs=160, batch_size=128, lr=0.001, milestones=(80, 120), weight_decay=1e-4,
                           rewind_iter=0),
    ("flowers", "*"): dict(epochs=160, batch_size=64, lr=0.001, milestones=(80, 120), weight_decay=1e-5, rewind_iter=0),
    # Appendix I.2: VGG-like on Flowers-102 "exactly the same strategy as for CIFAR-10"
    ("flowers", "vgg"): dict(epochs=160, batch_size=128, lr=0.001, milestones=(80, 120), weight_decay=1e-4,
                             rewind_iter=0),
    ("imagenet", "*"): dict(epochs=90, batch_size=1024, lr=0.1, milestones=(30, 60), weight_decay=1e-4, rewind_iter=0),
    ("mnist", "*"): dict(epochs=30, batch_size=128, lr=0.1, milestones=(15, 22), weight_decay=1e-4, rewind_iter=1000),
}
# The quick profile's schedule: a CPU budget, the same for every model (LeNet-300-100 on MNIST-like
# data: the README's quick study; a small VGG-like elsewhere).
QUICK = {
    "mnist": dict(epochs=30, batch_size=128, lr=0.1, milestones=(15, 22), weight_decay=1e-4, rewind_iter=0),
    "*": dict(epochs=10, batch_size=128, lr=0.01, milestones=(5, 8), weight_decay=1e-4, rewind_iter=0),
}
# What each profile studies per dataset group: the teacher and student models and the study's size.
# paper: Fig. 5 / Table 1 (ResNet-18 teacher, VGG-like(5, 5) student, both teachers, 3 seeds).
STUDY = {
    ("paper", "cifar"): dict(model="resnet18", student="vgg_d5g5", seeds=(0, 1, 2)),
    ("paper", "mnist"): dict(model="lenet300", student="", seeds=(0, 1, 2), wall=0.996),
    # Appendix I: no injected noise; Flowers-102 (I.2) ResNet-18 -> VGG-like(4, 5); ImageNet (I.3, Table
    # 14) ResNet-50 -> ResNet-18 at sparsities 0 / 0.5 / 0.75 / 0.875 (rate 0.5, three rounds)
    ("paper", "flowers"): dict(model="resnet18", student="vgg_d4g5", eps=0.0, seeds=(0, 1, 2)),
    ("paper", "imagenet"): dict(model="resnet50", student="resnet18", eps=0.0, rate=0.5, wall=0.9),
    ("paper", "*"): dict(model="resnet18", student="", seeds=(0, 1, 2)),
    # rate 0.2 to the wall 0.996: rounds 0..24, the last at 99.53% (the quick study's sweet phase)
    ("quick", "mnist"): dict(model="lenet300", student="", subset=10000, wall=0.996),
    ("quick", "*"): dict(model="vgg_d1g5", student="", subset=5000, wall=0.99),
}
# Appendix I's datasets keep their protocol, no injected noise, on the quick budget too (it drew 20%)
for _group in ("flowers", "imagenet"):
    STUDY[("quick", _group)] = {**STUDY[("quick", "*")], "eps": 0.0}


def family(model: str) -> str:
    """Model family for Table 4: resnet, vgg, lenet."""
    return resolve_name(model)[0].rstrip("0123456789").removesuffix("_like")


def _check(profile, dataset) -> None:
    """(An unknown profile read as quick's budget, silently; an unknown dataset was a KeyError.)"""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if dataset not in GROUP:
        raise ValueError(f"dataset must be one of {', '.join(GROUP)}, got {dataset!r}")


def _row(table: dict, first: str, second: str) -> dict:
    return dict(table.get((first, second), table.get((first, "*"), {})))


def schedule(profile: str, dataset: str, model: str) -> dict:
    """A role's schedule under a profile: Table 4 for its model (paper) or the quick budget."""
    _check(profile, dataset)
    group = GROUP[dataset]
    if profile == "paper":
        return _row(TABLE4, group, family(model))
    return dict(QUICK.get(group, QUICK["*"]))


def preset(profile: str, dataset: str, model: str | None = None, student: str | None = None) -> dict:
    """The profile's settings for a dataset: its study (models, seeds, size; an explicit `model`
    replaces the models and is its own student unless `student` is given) and each role's schedule."""
    _check(profile, dataset)
    p = _row(STUDY, profile, GROUP[dataset])
    if dataset in HUMAN_NOISE:
        p["eps"] = 0.0  # the human labels are the noise
    if model:
        p.update(model=model, student="")
    if student is not None:  # ('' too: the teacher's model, on its own schedule below)
        p["student"] = student
    roles = {"teacher": p["model"], "student": p["student"] or p["model"]}
    for role, m in roles.items():
        p.update({f"{role}_{k}": v for k, v in schedule(profile, dataset, m).items()})
    return p
