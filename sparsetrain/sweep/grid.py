"""A sweep's grid: its points (the product of the list-valued settings, or of each variant's) and each point and
seed resolved by the experiment's own parser into a Config (paths absolute), or its one-line error."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import os

from ..experiment.config import Config, config_from_args
from ..experiment.study import UsageError, check_teachers

__all__ = ["expand", "grid_points"]

_DEFAULT = Config()


def expand(settings: dict) -> list[dict]:
    """Cartesian product of the list-valued settings (axes); tuples and scalars are one value.
    "variants": a list of dicts, each laid over the settings in turn (a grid that is no product: a
    baseline and one change at a time), the points of all of them in order."""
    out = []
    for variant in settings.get("variants") or [{}]:
        s = {**{k: v for k, v in settings.items() if k != "variants"}, **variant}
        axes = {k: v for k, v in s.items() if isinstance(v, list)}
        fixed = {k: v for k, v in s.items() if not isinstance(v, list)}
        out += [{**fixed, **dict(zip(axes, combo))} for combo in itertools.product(*axes.values())]
    return out


def _argv(point: dict) -> list[str]:
    """A grid point as experiment flags (the dataset positional first)."""
    argv = [str(point["dataset"])]
    for k, v in point.items():
        if k == "dataset":
            continue
        flag = f"--{k.replace('_', '-')}"
        if isinstance(v, bool):
            argv += [flag] if v else []
        elif isinstance(v, (tuple, list)):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def _resolve(point: dict) -> tuple[Config | None, str]:
    """The experiment parser's Config for a point, or (None, its one-line error)."""
    err = io.StringIO()
    # the runs' machines may have GPUs this one lacks: whether --device and --amp can run is checked there, their
    # spelling here (devices.check_spelling)
    try:
        with contextlib.redirect_stderr(err):
            return config_from_args(_argv(point), here=False)[0], ""
    except SystemExit:
        return None, err.getvalue().strip() or "invalid settings"


def _absolute(cfg: Config) -> Config:
    """Paths made absolute: the runs execute in Ray workers, whose working directory may differ (a leading ~
    expanded first, as the experiment does: --data-dir=~/data was the folder ./~/data)."""
    teachers = tuple(t if t in ("dense", "best") else os.path.abspath(t) for t in cfg.teachers)
    path = lambda p: os.path.abspath(os.path.expanduser(p))  # noqa: E731
    return dataclasses.replace(cfg, data_dir=path(cfg.data_dir), out=os.path.abspath(cfg.out),
                               teachers=teachers, label_file=path(cfg.label_file) if cfg.label_file else "")


def _teachers_error(cfg: Config) -> str:
    """The experiment's own refusal of the point's --teachers paths (missing, unreadable, two of one
    file name), or ""."""
    try:
        check_teachers(cfg)
        return ""
    except UsageError as e:
        return f"error: {e}"


def grid_points(settings: dict, runs_root: str, threads: int):
    """Each grid point and seed as (point, seed, its Config (paths absolute), "") or (point, seed, None, the
    experiment's one-line error)."""
    checked: dict[tuple, str] = {}  # --teachers -> its error: each checkpoint is read once per plan
    for point in expand(settings):
        if "seeds" in point:
            seeds = point.pop("seeds")
        else:  # the point's profile decides, as the experiment's own command would (paper: 0 1 2)
            resolved, _ = _resolve({**point, "out": runs_root, "threads": threads})
            seeds = resolved.seeds if resolved is not None else _DEFAULT.seeds
        for seed in (seeds if isinstance(seeds, (list, tuple)) else [seeds]):
            p = {**point, "seeds": (seed,)}
            cfg, err = _resolve({**p, "out": runs_root, "threads": threads})
            if cfg is not None:  # (a missing or unreadable --teachers PATH failed only after its teacher run)
                cfg = _absolute(cfg)
                if cfg.teachers not in checked:
                    checked[cfg.teachers] = _teachers_error(cfg)
                err = checked[cfg.teachers]
                cfg = None if err else cfg
            yield p, seed, cfg, err
