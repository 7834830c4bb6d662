"""The paper's multi-run grids as data: recipe -> profile -> the experiment flags it fixes and the
ones it sweeps (every list is an axis of the grid; `seeds` too: one run per seed; `variants`: dicts
laid over the rest one at a time, for a grid that is no product).

`paper`: the paper's grid (GPU-days). `quick`: a CPU-sized version on Fashion-MNIST that shows the
same comparison (the quick study's LeNet-300-100 schedule, README "What the quick study shows").
Flags given on the sweep's command line replace a recipe's value or axis of the same name.
"""
from __future__ import annotations

__all__ = ["RECIPES", "recipe", "variant_keys"]

_PAPER_SEEDS = [0, 1, 2]
_REGULARIZERS = [{}, {"l1": 1e-5}, {"l1": 1e-4}, {"teacher_weight_decay": 1e-3}, {"dropout": 0.5},
                 {"augment": "autoaugment"}]

RECIPES = {
    # Table 1 (CIFAR-10, eps 20%): vanilla / early stop / distilled from the dense and the pruned teacher
    "paper-table1": {
        "about": "Table 1: vanilla, early stop and distilled students, 3 seeds",
        "paper": {"dataset": ["cifar10"], "eps": [0.2], "seeds": _PAPER_SEEDS, "teachers": ("dense", "best")},
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.2], "seeds": [0, 1, 2],
                  "teachers": ("dense", "best")},
    },
    # Fig. 1/2/5, Tables 6-11 (per dataset and eps)
    "paper-eps": {
        "about": "Figs. 1/2/5, Tables 6-11: the noise sweep, teacher and distilled students",
        "paper": {"dataset": ["cifar10", "cifar100"], "eps": [0.1, 0.2, 0.5], "seeds": _PAPER_SEEDS,
                  "teachers": ("dense", "best")},
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.1, 0.2, 0.5], "seeds": [0],
                  "teachers": ("dense",)},
    },
    # Table 12 (App. F): the best-validation model's phase against eps, vanilla ResNet-18 on CIFAR-10
    # (teacher runs only; those at eps 10/20/50% are paper-eps's, shared under one --out)
    "paper-table12": {
        "about": "Table 12: the best model's phase vs eps 10-50%, vanilla runs",
        "paper": {"dataset": ["cifar10"], "eps": [0.1, 0.125, 0.15, 0.175, 0.2, 0.5], "seeds": _PAPER_SEEDS,
                  "phases": ("teacher",)},
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.1, 0.125, 0.15, 0.175, 0.2, 0.5],
                  "seeds": [0], "phases": ("teacher",)},
    },
    # Fig. 3: ResNet-18 on CIFAR-100, eps 10%, retrained with no perturbation / rewind / re-init
    "paper-perturb": {
        "about": "Fig. 3: perturbation after pruning (none, rewind, re-init), vanilla runs",
        "paper": {"dataset": ["cifar100"], "eps": [0.1], "model": ["resnet18"], "perturb": ["none", "rewind", "reinit"],
                  "seeds": _PAPER_SEEDS, "phases": ("teacher",)},
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.2],
                  "perturb": ["none", "rewind", "reinit"], "seeds": [0], "phases": ("teacher",)},
    },
    # Fig. 6 (App. D): other regularizers against the vanilla run, ResNet-18 on CIFAR-100 eps 50%, one
    # change at a time ("variants"): l1 1e-5 / 1e-4, l2 (weight decay) 1e-3 (its 1e-4 is Table 4's own,
    # the baseline), dropout 0.5 before the classifier, AutoAugment + Cutout
    "paper-regularizers": {
        "about": "Fig. 6: l1, l2, dropout and AutoAugment + Cutout vs the vanilla run",
        "paper": {"dataset": ["cifar100"], "eps": [0.5], "model": ["resnet18"], "seeds": _PAPER_SEEDS,
                  "phases": ("teacher",), "variants": _REGULARIZERS},
        # the LeNet-300-100 teacher run on 2,000 images, 8 epochs per round (AutoAugment runs per image)
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.5], "subset": [2000],
                  "teacher_epochs": [8], "teacher_milestones": (4, 6), "seeds": [0], "phases": ("teacher",),
                  "variants": _REGULARIZERS},
    },
    # Table 5: alpha x tau on CIFAR-10 (VGG-like student of the ResNet-18 teacher), 3 noise rates
    "paper-alpha-tau": {
        "about": "Table 5: distillation weight alpha x temperature tau",
        "paper": {"dataset": ["cifar10"], "eps": [0.1, 0.2, 0.5], "alpha": [0.5, 0.7, 0.8, 0.9], "tau": [10, 20],
                  "seeds": [0], "teachers": ("best",)},
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.2], "alpha": [0.5, 0.8],
                  "tau": [10, 20], "seeds": [0], "teachers": ("dense",)},
    },
    # Fig. 4: VGG-like student depth delta (gamma 5) and width gamma (delta 1), CIFAR-10 eps 50%
    "paper-depth-width": {
        "about": "Fig. 4: student depth delta and width gamma, vanilla and distilled",
        "paper": {"dataset": ["cifar10"], "eps": [0.5], "model": ["resnet18"],
                  "student": [f"vgg_d{d}g5" for d in range(1, 6)] + [f"vgg_d1g{g}" for g in range(6, 10)],
                  "seeds": [0], "teachers": ("best",)},
        # a LeNet-300-100 teacher, VGG-like students of growing depth and width on 28x28 images
        "quick": {"dataset": ["fashion-mnist"], "profile": ["quick"], "eps": [0.2], "model": ["lenet300"],
                  "student": ["vgg_d1g2", "vgg_d2g2", "vgg_d1g4"], "subset": [2000], "student_epochs": [8],
                  "student_milestones": (4, 6), "seeds": [0], "teachers": ("dense",)},
    },
}


def variant_keys(settings: dict) -> set[str]:
    """The settings a grid's `variants` change (plan.expand lays each variant over the rest)."""
    return {k for variant in settings.get("variants") or [] for k in variant}


def recipe(name: str, profile: str) -> dict:
    """The settings of a recipe's profile: {field: list (an axis) or tuple (one tuple value)}."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    if profile not in ("paper", "quick"):
        raise ValueError(f"--profile must be paper or quick, got {profile!r}")
    return dict(RECIPES[name][profile])
