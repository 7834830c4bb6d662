"""The Config fields' types: what a Config built in Python (`Config(...)`, `dataclasses.replace`) must
hold, as the CLI's parsing guarantees. `normalize` turns the spellings that mean the same value into
the CLI's (an int or numpy number where a float goes, a numpy int, a list for a tuple, a path object
for a str), so they name the same run (its name hashes the settings' JSON, where 1 and 1.0 differ);
`check_types` refuses the rest with a TypeError naming the flag. Hyper: a role's schedule.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
import typing
from dataclasses import dataclass

__all__ = ["Hyper", "normalize", "check_types"]


@dataclass(frozen=True)
class Hyper:
    """One role's training schedule (a Table 4 row): what make_optimizer and the loop read."""
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple
    weight_decay: float
    rewind_iter: int
    momentum: float
    drop: float


_WHAT = {int: "a whole number (int)", float: "a number", str: "a str", bool: "True or False"}
_MANY = {int: "whole numbers (ints)", str: "strs"}


def _spec(cfg) -> dict:
    """{field: (its type, a tuple field's element type: its default's, str for an empty one)}."""
    hints = typing.get_type_hints(type(cfg))
    return {f.name: (hints[f.name], type(f.default[0]) if hints[f.name] is tuple and f.default else str)
            for f in dataclasses.fields(cfg)}


def _as(t, v):
    """`v` as the CLI would hold it for type `t` where that is the same value, else `v` unchanged."""
    if isinstance(v, bool):  # (True is no number here)
        return v
    if t is float and isinstance(v, numbers.Real):
        if getattr(getattr(v, "dtype", None), "itemsize", 8) < 8:  # (numpy float32/16: float(np.float32(0.1)) is
            return float(str(v)) + 0.0  # 0.10000000149011612, another run; its shortest repr is the 0.1 meant)
        return float(v) + 0.0  # (-0.0 as 0.0, as the CLI)
    if t is int and isinstance(v, numbers.Integral):
        return int(v)
    if t is str and isinstance(v, os.PathLike):
        return os.fspath(v)
    if t is bool and type(v).__name__ == "bool_":  # (numpy's)
        return bool(v)
    return v


def normalize(cfg) -> None:
    """In place: each field as the CLI would hold the same value (the module's docstring)."""
    for name, (t, elem) in _spec(cfg).items():
        v = getattr(cfg, name)
        if t is tuple and isinstance(v, (list, tuple)):
            setattr(cfg, name, tuple(_as(elem, x) for x in v))
        elif t is not tuple:
            setattr(cfg, name, _as(t, v))
    if isinstance(getattr(cfg, "out", None), str):  # (--out=~/runs, which no shell expands: a folder named ~ here)
        cfg.out = os.path.expanduser(cfg.out)  # (as --data-dir's; out names no run: the hash leaves it out)
    for name in ("reuse", "teachers"):  # (paths too: --reuse=~/runs/x; best and dense have no leading ~)
        v = getattr(cfg, name, None)
        if isinstance(v, tuple):
            setattr(cfg, name, tuple(os.path.expanduser(x) if isinstance(x, str) else x for x in v))


def check_types(cfg, key: bool = False) -> None:
    """TypeError naming the flag of the first field whose value is not of its type, once normalized
    (`key`: naming the field as config.json's key instead)."""
    normalize(cfg)
    for name, (t, elem) in _spec(cfg).items():
        v, flag = getattr(cfg, name), (name if key else f"--{name.replace('_', '-')}")
        if t is tuple and not (isinstance(v, tuple) and all(type(x) is elem for x in v)):
            raise TypeError(f"{flag} must be a tuple of {_MANY[elem]}, got {v!r}")
        if t is not tuple and type(v) is not t:
            raise TypeError(f"{flag} must be {_WHAT[t]}, got {type(v).__name__} {v!r}")
