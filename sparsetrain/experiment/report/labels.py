"""Phase labels of a test-accuracy curve: light / critical / sweet / collapsed."""
from __future__ import annotations

import math

from ..metrics import fin, get

__all__ = ["LABEL_RULE", "label_rounds"]


LABEL_RULE = """\
Each round is labelled on its test-accuracy curve a_0, a_1, ... in round order (= growing sparsity; a_0 = the
dense model; tol = 1 accuracy point and fall = 5 points by default; the per-round tables label the mean
curve over seeds). A collapse is a real fall: more than `fall` below the level the curve held.
1. The dip: p = the round of the largest recovery, maximising a_p - min{a_j : j < p, a_j < a_0 - tol} (the
   earliest on ties), and m = the (last) round of lowest accuracy before p. It counts as a sparse double
   descent when that recovery exceeds tol (the minimum is below a_0 - tol by construction).
2. With a dip:  light = rounds 0..d-1, where d-1 is the last round before m with a >= a_0 - tol;
   critical = d..m (down into the dip and its minimum); sweet = m+1..p (the recovery up to the post-dip
   maximum a_p) and the rounds after p while they stay within fall of it (a_k >= a_p - fall);
   collapsed = from the first round after p with a_k < a_p - fall on.
3. Without a dip (e.g. a monotone or slowly declining curve): light up to the last round with
   a >= a_0 - fall, collapsed after it.
Taking the largest recovery (not the first drop) keeps seed noise of about tol in the light phase from
being read as the dip. Rounds with a NaN accuracy take the previous finite round's label (the next one's
at the start); a curve whose a_0 is NaN has none: every round is n/a (each label is relative to the dense
model's accuracy, which a later round's cannot stand for)."""


def label_rounds(rows, tol=0.01, fall=0.05) -> list[str]:
    acc = [get(r, "test_acc") for r in rows]
    if acc and not fin(acc[0]):  # (no dense reference: the first finite round's a_0 mislabelled the curve)
        return ["n/a"] * len(acc)
    idx = [i for i, a in enumerate(acc) if fin(a)]  # the rule runs on the finite points, in order
    a = [acc[i] for i in idx]
    n, lab = len(a), ["light"] * len(a)
    p, rise, lo = None, tol, math.inf
    for k in range(1, n):  # largest recovery from a minimum below the dense level - tol
        if a[k - 1] < a[0] - tol:
            lo = min(lo, a[k - 1])
        if a[k] - lo > rise:
            p, rise = k, a[k] - lo
    if p is None:  # no dip: light, then collapsed once below a_0 - fall for good
        last = max(k for k in range(n) if a[k] >= a[0] - fall) if n else 0
        lab[last + 1:] = ["collapsed"] * (n - last - 1)
    else:
        m = max(k for k in range(p) if a[k] == min(a[:p]))
        d = max(k for k in range(m) if a[k] >= a[0] - tol) + 1  # round 0 always qualifies
        lab[d:m + 1] = ["critical"] * (m + 1 - d)
        state = "sweet"
        for k in range(m + 1, n):
            if k > p and a[k] < a[p] - fall:
                state = "collapsed"
            lab[k] = state
    out: list = [None] * len(rows)
    for i, l in zip(idx, lab):
        out[i] = l
    nxt = lab[0] if lab else "light"
    for i in range(len(out)):  # NaN rounds: previous finite label (next one at the start)
        out[i] = nxt = out[i] or nxt
    return out


label_rounds.__doc__ = "Label each round light / critical / sweet / collapsed.\n\n" + LABEL_RULE
