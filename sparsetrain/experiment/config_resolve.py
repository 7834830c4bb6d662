"""A Config resolved as the command resolves its flags: dataclass defaults < the profile's preset for the dataset
(its models, each role's Table 4 row or the quick budget) < a both-roles setting (epochs, lr, ...) < a role's own
(teacher_lr, ...). `Config(...)` alone is the dataclass: its defaults are the paper profile's CIFAR settings
whatever its `profile` and `dataset` say; `config_for` is the command's resolution in Python,
and `config_to_argv` a Config's command line."""
from __future__ import annotations

import typing
from dataclasses import fields

from .config import ROLE_KEYS, Config, resolve
from .config_types import check_types

__all__ = ["config_for", "config_to_argv"]


def config_for(dataset: str, profile: str = "paper", **settings) -> Config:
    """The Config `python -m sparsetrain.experiment DATASET --profile PROFILE --key value ...` runs, for
    `run_study`: `config_for("fashion-mnist", profile="quick", epochs=4, milestones=(2,))`. `settings` are
    Config's fields or a both-roles key (epochs, batch_size, lr, milestones, weight_decay, rewind_iter; a role's
    own, teacher_lr=..., wins for that role). TypeError for an unknown setting or a value of another type,
    ValueError for a bad value, each naming its flag."""
    given = {k: v for k, v in settings.items() if k not in ROLE_KEYS}
    check_types(Config(dataset=dataset, profile=profile, **given))  # (an unknown name: the dataclass's TypeError)
    given.update(dataset=dataset, profile=profile)
    return resolve(given, {k: v for k, v in settings.items() if k in ROLE_KEYS})


def config_to_argv(cfg: Config) -> list[str]:
    """Every field of `cfg` as explicit flags: `config_from_args(config_to_argv(cfg))` gives back `cfg`
    whatever the presets say (how a sweep hands a resolved run to the experiment command)."""
    argv = [cfg.dataset]
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        v, flag = getattr(cfg, f.name), f"--{f.name.replace('_', '-')}"
        if f.metadata.get("positional"):
            continue
        if hints[f.name] is bool:
            argv += [flag] if v else []
        elif f.name.endswith("_milestones") and any(m >= cfg.hyper(f.name[:-len("_milestones")]).epochs for m in v):
            continue  # (a preset's milestones kept past --epochs, as the run's command had them: given, refused)
        elif hints[f.name] is tuple:
            argv += [flag, *map(str, v)] if v else []  # (an empty tuple: the default, which is empty)
        else:
            argv += [flag, str(v)]
    return argv
