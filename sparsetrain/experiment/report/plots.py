"""Plots of a run: accuracy vs sparsity (entropy on a second axis) and cumulative PFLOPs."""
from __future__ import annotations

import os
import textwrap

import numpy as np

from ..files import atomic_write, remove_file
from ..early_stop import algorithm2_stop
from .labels import label_rounds
from ..metrics import best_index, fin, get
from .tables import (mean, ordered_phases, per_round, phase_title, shown_text, started_seeds, stats, stops_unknown,
                     vanilla_phase)

__all__ = ["plot_run", "mean_curve", "acc_band", "sparsity_axis", "fewer_seeds", "hollow_curve", "as_typed"]


# matplotlib leaves a label starting with `_` out of the legend (its "no legend" mark): such user text (a dataset
# `_tmp`) is a line's label behind this zero-width prefix, which as_typed takes off the legend's entry
_NOT_HIDDEN = "\u200b"
_TICKS = [0, .5, .8, .9, .95, .98, .99, .995, .998, .999, .9995, .9998, .9999]
_SHADE = {"critical": ("tab:red", .08), "sweet": ("tab:green", .08), "collapsed": ("0.5", .12)}


def _x(s):
    """x = -log10(1 - sparsity): spreads 90 / 99 / 99.9 % evenly (one decade of remaining weights each)."""
    return -np.log10(np.clip(1 - np.asarray(s, float), 1e-6, None))


def mean_curve(seed_rows: dict):
    """A phase's curve over seeds, per round: (rounds, {round: rows}, x = _x(mean sparsity), test
    accuracy [%] as an array of (mean, std), mean entropy)."""
    rounds, by = per_round(seed_rows)
    x = _x([mean(by[k], "sparsity") for k in rounds])
    acc = np.array([stats([100 * get(r, "test_acc") for r in by[k]])[:2] for k in rounds]).reshape(-1, 2)
    return rounds, by, x, acc, np.array([mean(by[k], "entropy_mean") for k in rounds])


def acc_band(acc):
    """The mean ± std band of mean_curve's accuracy [%], clipped to [0, 100]: no accuracy lies outside
    (an unclipped band took the y axis above 100% or below 0)."""
    return np.clip(acc[:, 0] - acc[:, 1], 0, 100), np.clip(acc[:, 0] + acc[:, 1], 0, 100)


def best_round(seed_rows: dict):
    """The round most seeds pick as their best-validation one (the earliest on a tie; None: no seed has a
    validation score): a star on a round only some seeds reached, chosen by their mean, marked no
    seed's best."""
    picks = [rows[i]["round"] for rows in seed_rows.values() if rows and (i := best_index(rows)) is not None]
    return min(set(picks), key=lambda k: (-picks.count(k), k)) if picks else None


def fewer_seeds(by, rounds, seeds: int = 0, key: str | None = None):
    """The rounds only some seeds reached (their mean is over fewer seeds: drawn hollow), as a mask; `seeds`:
    how many the run was started for (a seed whose phase recorded no round is missing from every mean);
    `key`: also the rounds where a seed's value of it is NaN, a torn cell (the mean is the others')."""
    n = np.array([len(by[k]) if key is None else sum(fin(get(r, key)) for r in by[k]) for k in rounds])
    return n < max(max(len(by[k]) for k in rounds), seeds)


def _started(run, ph) -> int:
    """How many seeds `ph`'s means are out of (tables.started_seeds)."""
    return len(started_seeds(run["curves"][ph], run["config"]))


def hollow_curve(ax, x, y, few, color, label, style="-o", ms=3, hollow_ms=5):
    """A mean curve, its fewer-seed rounds hollow (and said in its legend entry); returns the line
    (its colour: matplotlib's next one when `color` is None). A `label` starting with `_` gets a legend entry too."""
    label += " (hollow: fewer seeds)" if few.any() else ""
    line, = ax.plot(x, y, style, ms=ms, color=color, label=_NOT_HIDDEN + label if label.startswith("_") else label)
    if few.any():
        ax.plot(np.asarray(x)[few], np.asarray(y)[few], "o", ms=hollow_ms, mfc="white", mec=line.get_color(), ls="none")
    return line


def as_typed(*texts):
    """Show each matplotlib Text (a legend's entries and title, an axes' title) as typed: user text (a run,
    phase or setting name) is not read as mathtext (`$x^$` raised ValueError at draw time, no figure; `$x$`
    rendered as math), a name that is not UTF-8 as tables.shown_text writes it (a surrogate escape raised TypeError
    in the font code: no figure), a legend entry starting with `_` without hollow_curve's zero-width prefix (the
    entry was left out before 2026-12-07). Returns the first."""
    for t in texts:
        t.set_parse_math(False)
        text = t.get_text()
        t.set_text(shown_text(text[1:] if text.startswith(_NOT_HIDDEN + "_") else text))
    return texts[0] if texts else None


def _legend(ax, **kw):
    """ax.legend with each entry wrapped to lines of at most 60 characters: one line of a twin note
    (tables.same_note, the quick study's distill-best) made the legend wider than the axes, over the y label;
    its entries and title shown as typed (as_typed)."""
    handles, labels = ax.get_legend_handles_labels()
    legend = ax.legend(handles, [textwrap.fill(label, 60) for label in labels], **kw)
    as_typed(*legend.get_texts(), legend.get_title())
    return legend


def sparsity_axis(ax) -> None:
    """The x axis of accuracy-vs-sparsity plots on the _x scale: ticks at 0, 50, 80, 90, 95, 98, 99, ...%
    (1-2-5 steps of the remaining weights, whatever the rate: a round's own sparsity may fall between)."""
    lo, hi = ax.get_xlim()
    ticks = [s for s in _TICKS if lo - 1e-9 <= _x(s) <= hi + 1e-9]
    ax.set_xticks([float(_x(s)) for s in ticks], [f"{100 * s:g}" for s in ticks])
    ax.set_xlabel("sparsity [%] (log scale of remaining weights)")


def plot_run(run, out_dir) -> list[str]:
    """(a) accuracy_vs_sparsity.png: test accuracy (mean ± std band over seeds) vs sparsity per phase,
    entropy on a second axis (dashed), the vanilla student's phase labels shaded; (b) cum_pflops.png:
    cumulative training PFLOPs vs round (dotted: distillation incl. the teacher's cost; x: Alg. 2 stops)."""
    from matplotlib.figure import Figure  # object API: no pyplot, no global backend change (Agg canvas)
    from matplotlib.ticker import MaxNLocator
    curves, phases = run["curves"], ordered_phases(run)
    if not phases:  # (no metrics: an earlier report's plots would show what the summary no longer has)
        for name in ("accuracy_vs_sparsity.png", "cum_pflops.png"):
            remove_file(os.path.join(out_dir, name))  # (a read-only run directory: one line naming the file)
        return []
    os.makedirs(out_dir, exist_ok=True)
    t_e, t_a = run["config"].get("t_e", 0.8), run["config"].get("t_a", 0.8)
    color = {p: f"C{i}" for i, p in enumerate(phases)}
    paths = []

    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    van = vanilla_phase(run)
    for ph in phases:
        rounds, by, x, acc, ent = mean_curve(curves[ph])
        few = fewer_seeds(by, rounds, _started(run, ph), "test_acc")
        hollow_curve(ax, x, acc[:, 0], few, color[ph], phase_title(run, ph))
        ax.fill_between(x, *acc_band(acc), color=color[ph], alpha=.2, lw=0)
        ax2.plot(x, ent, "--", color=color[ph], alpha=.7)
        b = best_round(curves[ph])
        if b is not None:  # star: the best-validation round of most seeds
            i = rounds.index(b)
            ax.plot(x[i], acc[i, 0], "*", ms=13, color=color[ph], mec="k", mew=.6)
        if ph == van and len(x) > 1:
            labs = label_rounds([{"test_acc": a} for a in acc[:, 0] / 100])
            edges = np.concatenate([[x[0]], (x[1:] + x[:-1]) / 2, [x[-1]]])
            for i, lab in enumerate(labs):
                if lab in _SHADE:
                    ax.axvspan(edges[i], edges[i + 1], color=_SHADE[lab][0], alpha=_SHADE[lab][1], lw=0)
    sparsity_axis(ax)
    ax.set_ylabel("test accuracy [%] (mean ± std over seeds; ★ most seeds' best validation)")
    ax2.set_ylabel("mean ReLU-state entropy [bits] (dashed)")
    ax.grid(alpha=.3)
    _legend(ax, loc="best", fontsize=8,
              title=f"shaded ({phase_title(run, van) if van else '—'}): red critical, green sweet, grey collapsed",
              title_fontsize=7)
    cfg = run["config"]
    as_typed(ax.set_title(f"{cfg.get('dataset', '?')}  ε={cfg.get('eps', '?')}  model={cfg.get('model', '?')}  "
                          f"student={cfg.get('student', '?')}", fontsize=10))
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_sparsity.png"))
    atomic_write(paths[-1], lambda f: fig.savefig(f, format="png", dpi=120), binary=True)

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    for ph in phases:
        rounds, by = per_round(curves[ph])
        cum = np.array([mean(by[k], "cum_flops") for k in rounds]) / 1e15
        few = fewer_seeds(by, rounds, _started(run, ph))
        stops = ph != "teacher" or ph == van  # (the teacher never stops)
        unknown = stops_unknown(curves[ph]) if stops else 0  # (no × or +: said, as Table 1's n/a)
        hollow_curve(ax, rounds, cum, few, color[ph], phase_title(run, ph) + (
            f" (stops n/a in {unknown}/{_started(run, ph)} seeds: round 0's entropy NaN)" if unknown else ""))
        if ph.startswith("distill-"):  # + teacher cost + cumulative KD inference, per seed then mean
            extra = {}  # (a NaN round: that seed's sum unknown from there on, left out of the mean, as in Table 1)
            for rows in curves[ph].values():
                c = get(rows[0], "teacher_cost", 0.0) + np.cumsum([get(r, "teacher_flops", 0.0) for r in rows])
                for r, v in zip(rows, c):
                    extra.setdefault(r["round"], []).append(v)
            tot = cum + np.array([stats(extra[k])[0] for k in rounds]) / 1e15
            hollow_curve(ax, rounds, tot, few, color[ph], f"{ph} incl. teacher", style=":")
        for rows in curves[ph].values() if stops else ():
            for rule, marker in (("entropy", "x"), ("entropy-peak", "+")):
                s = algorithm2_stop(rows, t_e, t_a, rule, run["config"].get("stop_falls", 1))
                if s is not None and s in rounds:
                    ax.plot(s, cum[rounds.index(s)], marker, ms=9, mew=2, color=color[ph])
    ax.set_xlabel("round (× = Algorithm 2's stop of a seed, + = the peak rule's)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (rounds are whole: no tick at round 0.5)
    ax.set_ylabel("cumulative training PFLOPs, exact count (mean over seeds)")
    ax.grid(alpha=.3)
    _legend(ax, fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "cum_pflops.png"))
    atomic_write(paths[-1], lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    return paths
