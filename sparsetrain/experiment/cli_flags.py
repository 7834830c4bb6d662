"""The generated CLI's argparse pieces (config.build_parser): a parser whose errors are one line, and
one Config field's flag, its help ending in the default a run gets."""
from __future__ import annotations

import argparse

__all__ = ["Parser", "add_flag"]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <what> (see --help)` and exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_flag(p, flag: str, t, default, help_: str, choices=None, preset: str = "") -> None:
    """Add Config field `flag` (type `t`) to parser `p`, its help ending in what a run gets without it."""
    shown = " " + (" ".join(map(str, default)) or "none" if t is tuple else str(default))
    if default == "":  # (an empty path or name, whose help says what empty means: "(default )" said nothing)
        shown = " empty"
    if preset == "always":  # (no dataclass default is what a run gets)
        help_ = help_.replace(" (default: Table 4", " (Table 4")
        shown = ": set by --profile for the dataset and model; --print-config shows a run's"
    elif preset:
        shown = f"{shown}, unless --profile sets it for the dataset: --print-config shows a run's"
    if t is bool:
        p.add_argument(flag, action="store_true", default=None, help=help_)
    elif t is tuple:
        elem = type(default[0]) if default else str
        p.add_argument(flag, nargs="+", type=elem, default=None, choices=choices, help=f"{help_} (default{shown})")
    else:
        p.add_argument(flag, type=t, default=None, choices=choices, help=f"{help_} (default{shown})")
