"""The sweep's figures: test accuracy vs sparsity overlaid across groups (mean ± std bands over
seeds, entropy on a second axis): Figs. 1/2/5 by eps, Fig. 3 by perturbation, Fig. 4 by the
student's depth/width (any differing setting can colour the lines)."""
from __future__ import annotations

import math
import os
import re

from ..experiment.files import atomic_write, remove_file
from ..experiment.report.plots import acc_band, as_typed, fewer_seeds, hollow_curve, mean_curve, sparsity_axis
from ..experiment.report.tables import ordered_phases, same_note, vanilla_phase
from .aggregate import _num, group_label, seed_counts

__all__ = ["plot_overlay", "write_figures"]

_STYLE = {"vanilla": "-", "distill-dense": "--", "distill-best": ":"}
_MAX_PANELS = 12


def _natural(v) -> tuple:
    """A sort key: numbers by value, text with its digits as numbers (vgg_d1g9 < vgg_d2g5)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ((0, v, ""),)
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(v)) if t)


def _colours(n: int) -> list:
    """n distinct colours: matplotlib's ten (C0-C9), then tab20's lighter shades of them; past 20, n steps of turbo."""
    from matplotlib import colormaps
    if n > 20:
        return [colormaps["turbo"](i / (n - 1)) for i in range(n)]
    return [f"C{i}" for i in range(min(n, 10))] + [colormaps["tab20"](2 * i + 1) for i in range(n - 10)]


def _phases(g) -> list[str]:
    """The student curves of a group: vanilla (or the teacher run when it is the vanilla student; a
    sweep's kept teacher run: its teacher curve) and every distilled student."""
    van = vanilla_phase(g) or ("teacher" if g.get("teacher_run") and "teacher" in g["curves"] else None)
    return ([van] if van else []) + [p for p in ordered_phases(g) if p.startswith("distill-")]


def plot_overlay(groups, by: str | None, keys: list[str], path: str) -> str | None:
    """One panel per combination of the differing settings other than `by`; in each, one colour per
    value of `by`, one line style per phase (vanilla solid, distilled from the dense teacher dashed,
    from the pruned one dotted); entropy thin on the right axis."""
    from matplotlib.figure import Figure
    groups = [g for g in groups if _phases(g)]  # (a setting without a curve to draw: no empty panel)
    rest = [k for k in keys if k != by]
    panels: dict[str, list] = {}
    for g in groups:
        panels.setdefault(group_label(g, rest) if rest else "", []).append(g)
    if not panels or not any(g["curves"] for g in groups):
        return None
    items = list(panels.items())[:_MAX_PANELS]
    cols = min(3, len(items))
    rows_n = math.ceil(len(items) / cols)
    fig = Figure(figsize=(6.2 * cols, 4.4 * rows_n))
    # one colour per value, in the values' order ("10.0" came before "2.0" as text, and an 11th value took C0 again)
    values = {str(v): v for v in (g["config"].get(by) for g in groups)} if by else {}
    colour = dict(zip(sorted(values, key=lambda k: _natural(values[k])), _colours(len(values))))
    for i, (title, gs) in enumerate(items):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        ax2 = ax.twinx()
        for g in gs:
            color = colour[str(g["config"].get(by))] if by else None
            for ph in _phases(g):
                rounds, per, x, acc, ent = mean_curve(g["curves"][ph])
                name = "vanilla" if ph == vanilla_phase(g) else ph
                # (the value as the tables print it: tau=10, not the config's 10.0)
                label = f"{by}={_num(g['config'].get(by))} {name}" if by else f"{group_label(g, keys)} {name}"
                label += same_note(g, ph)  # (a distill-best that is distill-dense says so)
                # (hollow: a mean over fewer seeds than the setting started, or past a seed's NaN accuracy)
                few = fewer_seeds(per, rounds, seed_counts(g, ph)["seeds_started"], "test_acc")
                line = hollow_curve(ax, x, acc[:, 0], few, color, label,
                                    style=_STYLE.get(name, "-.") + "o", ms=2.5, hollow_ms=4)
                ax.fill_between(x, *acc_band(acc), color=line.get_color(), alpha=.15, lw=0)
                ax2.plot(x, ent, _STYLE.get(name, "-."), color=line.get_color(), lw=.7, alpha=.5)
        sparsity_axis(ax)
        ax.set_ylabel("test accuracy [%] (mean ± std)")
        ax2.set_ylabel("ReLU-state entropy [bits] (thin)")
        as_typed(ax.set_title(title or f"{gs[0]['config'].get('dataset')}", fontsize=9))  # (user text: as typed)
        ax.grid(alpha=.3)
        legend = ax.legend(fontsize=6.5, loc="best")  # (lower left hid the round-0 points of falling curves)
        as_typed(*legend.get_texts())
    if len(panels) > _MAX_PANELS:  # (said on the figure: the dropped panels were silently missing)
        fig.suptitle(f"the first {_MAX_PANELS} of {len(panels)} panels: the others' numbers are in table1.csv",
                     fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    return path


def write_figures(groups, keys, out_dir) -> list[str]:
    """accuracy_vs_sparsity.png (coloured by eps when it differs, else by the first differing
    setting) and by_<setting>.png for every other differing setting."""
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # a setting that no longer differs, or nothing left to draw, leaves no
        if f == "accuracy_vs_sparsity.png" or f.startswith("by_") and f.endswith(".png"):  # stale overlay behind
            remove_file(os.path.join(out_dir, f))
    main = "eps" if "eps" in keys else (keys[0] if keys else None)
    paths = [plot_overlay(groups, main, keys, os.path.join(out_dir, "accuracy_vs_sparsity.png"))]
    paths += [plot_overlay(groups, k, keys, os.path.join(out_dir, f"by_{k}.png")) for k in keys if k != main]
    return [p for p in paths if p]

