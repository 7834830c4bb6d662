"""Training and evaluation: one epoch, evaluation, the distillation loss (paper Eq. 2).

Everything is seeded per (seed, epoch), so an epoch re-run after a resume sees the same batches
and augmentations as the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.args import check_flag, is_int
from ..engine.hooks import hooked_eval
from ..engine.nn import enforce_masks_, mask_grads_, prunable_layers, stored_weight
from . import data as D
from . import distributed as dist

__all__ = ["kd_loss", "make_optimizer", "steps_per_epoch", "train_epoch", "evaluate"]


def kd_loss(student_logits, teacher_logits, target, alpha: float, tau: float) -> torch.Tensor:
    """Eq. 2: (1 - alpha) * CE(student, y) + alpha * tau^2 * KL(softmax(t/tau) || softmax(s/tau)),
    both terms batch means. tau^2 keeps the soft-target gradients on the scale of the hard ones."""
    # (numbers.Real: numpy's float32 was "not a number"; tau <= 1e18, config's --tau limit: from ~2e19
    # on alpha * tau^2 overflows float32 and the loss was NaN)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau <= 1e18:
        raise ValueError(f"tau must be a number > 0 and finite, at most 1e18 (tau^2 scales the loss in "
                         f"float32), got {tau!r}")
    _check_logits(student_logits, teacher_logits, target)
    ce = F.cross_entropy(student_logits, target)
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * tau * tau * kl


def _check_logits(student_logits, teacher_logits, target) -> None:
    """[N, C] logits of both models and [N] labels: F.kl_div broadcasts, so a teacher's [1, C] row
    (or [N, 1]) was compared with every student row silently."""
    for arg, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, C] logits, got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the student's shape {tuple(student_logits.shape)} (one logit "
                         f"per class for each sample), got {tuple(teacher_logits.shape)}")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must be [N] = [{student_logits.shape[0]}] class indices, got shape "
                         f"{tuple(target.shape)}")


def make_optimizer(model: nn.Module, hp):
    """SGD with momentum and weight decay; LR x drop at the milestones (given in epochs, as in the
    paper's Table 4), stepped per epoch. A fresh one every round (the paper restarts it). `hp`: the
    run's schedule (config.Hyper)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_hyper(hp)
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.drop)
    return opt, sched


def _check_hyper(hp) -> None:
    """The schedule make_optimizer reads (config's checks, for a Hyper made by hand): milestones "80"
    never lowered the LR (MultiStepLR counted the characters), nor did a milestone 0; a NaN lr, decay
    or drop, a momentum >= 1 or a drop of 0 trained to NaN or to a standstill, silently."""
    missing = [k for k in ("lr", "momentum", "weight_decay", "milestones", "drop") if not hasattr(hp, k)]
    if missing:
        raise TypeError(f"hp must be a config.Hyper (lr, momentum, weight_decay, milestones, drop), got "
                        f"{type(hp).__name__} without {', '.join(missing)}")
    for k, ok, expected in (("lr", lambda v: 0 < v < math.inf, "> 0 and finite"),
                            ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
                            ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
                            ("drop", lambda v: 0 < v <= 1, "in (0, 1]")):
        v = getattr(hp, k)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(v):
            raise ValueError(f"hp.{k} must be a number {expected}, got {v!r}")
    ms = hp.milestones
    if not isinstance(ms, (tuple, list)) or not all(isinstance(m, numbers.Integral) and not isinstance(m, bool)
                                                     and m >= 1 for m in ms) or list(ms) != sorted(set(ms)):
        raise ValueError(f"hp.milestones must be increasing epochs >= 1 (a tuple of ints), got {ms!r}")


def _skips_last(n: int, batch_size: int) -> bool:
    """A final batch of one sample is skipped: BatchNorm cannot train on one value per channel."""
    return n > 1 and n % batch_size == 1


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps of one epoch over n samples (what train_epoch takes)."""
    for arg, v, lo in (("n", n, 0), ("batch_size", batch_size, 1)):  # (0: ZeroDivisionError; n < 0: -1 steps)
        if not is_int(v) or v < lo:
            raise ValueError(f"{arg} must be an int >= {lo}, got {v!r}")
    return n // batch_size if _skips_last(n, batch_size) else math.ceil(n / batch_size)


def _has_dropout(model) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _seed_dropout(model, s: int) -> None:
    """Seeds the global RNG the model's dropout draws from (the CPU's, and its CUDA device's)."""
    dev = next(model.parameters()).device
    torch.random.default_generator.manual_seed(s)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.manual_seed(s)


@contextlib.contextmanager
def _dropout_rng(model, seed: int, epoch: int, batch_size: int):
    """A model with dropout (--dropout) draws its masks from the global RNG of its device, which a
    resume restores for the CPU only, and which every DDP rank seeds alike: seeded here from (seed,
    epoch, rank) instead, inside fork_rng (the global state is left as it was), so a resumed epoch
    draws the uninterrupted one's masks on every device and the ranks draw their own rows'. Under 2
    rows a rank every rank runs each batch whole (dist.shard): all then draw rank 0's, one process's
    masks (each its own, DDP averaged the batch's gradient over N masks: one process's in no case)."""
    if not _has_dropout(model):
        yield
        return
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _seed_dropout(model, D.seeded(seed, 11, epoch, dist.rank() if batch_size >= 2 * dist.world() else 0)
                      .initial_seed())
        yield


def train_epoch(model, split, opt, batch_size: int, *, epoch: int, seed: int, masks: dict, teacher=None,
                alpha: float = 0.8, tau: float = 10.0, on_step=None, forward=None, amp=None, scaler=None,
                l1: float = 0.0, policy: str = "standard") -> dict:
    """One epoch of SGD on `split` (augmented, shuffled by (seed, epoch)). With a teacher, the loss
    is Eq. 2 (alpha, tau) on the same augmented batch, the teacher in eval mode without gradients. `masks`:
    dense masked layers (their pruned weights get no gradient and stay zero). `on_step(it)` is
    called after every optimizer step with the global iteration count (for rewind snapshots).
    `forward`: the module to run (the model in DistributedDataParallel under torchrun, whose rank
    takes its rows of every global batch: distributed.py); the returned loss and accuracy are over
    the global batches. `amp`: the autocast dtype of the forward pass and the loss (None: off; the
    parameters stay fp32); `scaler`: a GradScaler (fp16). `l1`: lambda of Appendix D's penalty
    lambda * sum |w| over the conv and linear weights (sparse layers: their stored values; a dense
    layer's pruned zeros add nothing, and |w|'s subgradient 0 at 0 leaves them at 0), added to the
    loss that is differentiated, not to the reported one. `policy`: data.iterate's augmentation."""
    _check_epoch_args(split, opt, batch_size, teacher, amp, l1)
    for arg, f in (("on_step", on_step), ("forward", forward)):  # (failed after the first batch had run)
        if f is not None and not callable(f):
            raise TypeError(f"{arg} must be callable or None, got {type(f).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if teacher is not None and (teacher is model or teacher is forward):  # (the epoch in the teacher's eval mode)
        raise ValueError("teacher is the model being trained: pass a frozen copy (copy.deepcopy(model).eval())")
    _check_forward(model, forward)
    forward = forward or model
    model.train()
    g = D.epoch_generator(seed, epoch)
    tot_loss = tot_correct = n = 0
    weights = [stored_weight(m) for _, m in prunable_layers(model)] if l1 else []
    # (a teacher left in train mode updated its BatchNorm statistics, normalised with the batch's, and
    # drew dropout masks from the global RNG; each module's mode is restored after the epoch)
    teacher_eval = hooked_eval(teacher, ()) if teacher is not None else contextlib.nullcontext()
    with _dropout_rng(model, seed, epoch, batch_size), teacher_eval:
        for xb, yb in D.iterate(split, batch_size, shuffle=True, augment=True, generator=g, policy=policy,
                                drop_last=_skips_last(len(split), batch_size)):
            rows, scale = dist.shard(yb.numel())
            counted = True  # (a batch every rank computes whole is counted by rank 0 alone in the sums below)
            if dist.world() > 1:
                counted = rows.stop - rows.start < yb.numel() or dist.is_main()
                if rows.stop - rows.start == yb.numel() and batch_size >= 2 * dist.world() and _has_dropout(model):
                    # (the final batch, whole on every rank after sharded ones: one mask for all, a stream
                    # of no rank's, < world; the ranks' streams differ here)
                    _seed_dropout(model, D.seeded(seed, 11, epoch, dist.world()).initial_seed())
                xb, yb = xb[rows], yb[rows]
            with torch.autocast(xb.device.type, dtype=amp, enabled=amp is not None):
                out = forward(xb)
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                    loss = kd_loss(out.float(), t_out.float(), yb, alpha, tau)
                else:
                    loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            total = loss * scale if scale != 1.0 else loss
            if weights:  # (every rank adds it whole: DDP averages the ranks' gradients)
                total = total + l1 * torch.stack([w.abs().sum() for w in weights]).sum()
            (scaler.scale(total) if scaler is not None else total).backward()
            mask_grads_(model, masks)
            if scaler is not None:  # (skips the step when a gradient overflowed; the masked zeros stay zero)
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            enforce_masks_(model, masks)
            if counted:
                b = yb.numel()
                tot_loss += float(loss.detach()) * b
                tot_correct += int((out.argmax(1) == yb).sum())
                n += b
            if on_step is not None:
                on_step()
    if dist.world() > 1:
        tot_loss, tot_correct, n = dist.all_sum(torch.tensor([tot_loss, tot_correct, n], dtype=torch.float64,
                                                             device=split.y.device)).tolist()
    return {"loss": tot_loss / max(n, 1), "acc": tot_correct / max(n, 1)}


def _check_forward(model, forward) -> None:
    """Under torchrun every rank trains on its rows of each batch (dist.shard): without the gradient
    average of a DistributedDataParallel around `model`, each rank stepped on its own rows' gradient
    alone and the ranks' weights drifted apart, silently (the study wraps with dist.wrap)."""
    if dist.world() == 1 or not any(p.requires_grad for p in model.parameters()):
        return
    if forward is None or forward is model:
        raise ValueError(f"forward must be the model in DistributedDataParallel under torchrun ({dist.world()} "
                         "ranks, each training on its rows of every batch): pass forward=distributed.wrap(model)")
    if isinstance(forward, nn.parallel.DistributedDataParallel) and forward.module is not model:
        raise ValueError("forward is a DistributedDataParallel around another module than model: pass "
                         "forward=distributed.wrap(model)")
    # (a wrapper built before a prune resized the values: its buckets keep the old sizes, and its
    # first step reduced no gradient, silently, before the next raised "Expected to have finished reduction")
    if getattr(forward, "built_sizes", None) not in (None, dist.sizes(model)):
        raise ValueError("forward was wrapped before the model's parameters changed size (pruning, or a state of "
                         "another nnz loaded): wrap the model again, forward=distributed.wrap(model)")


def _check_epoch_args(split, opt, batch_size, teacher, amp, l1) -> None:
    """batch_size 0 was a ZeroDivisionError, a negative or NaN l1 a silently wrong penalty (a NaN
    model), an empty split a loss and accuracy of 0.0, a non-Module teacher "'int' object is not callable"."""
    if not isinstance(split, D.Split):
        raise TypeError(f"split must be a data.Split, got {type(split).__name__}")
    if not len(split):
        raise ValueError("split holds no samples: an epoch needs at least one batch")
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"opt must be a torch.optim.Optimizer (make_optimizer), got {type(opt).__name__}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    _check_amp(amp)
    if isinstance(l1, bool) or not isinstance(l1, numbers.Real) or not 0 <= l1 < math.inf:
        raise ValueError(f"l1 must be a number >= 0 and finite (0: off), got {l1!r}")


def _check_amp(amp) -> None:
    if amp not in (None, torch.bfloat16, torch.float16):  # (a string was torch's TypeError naming no argument)
        raise ValueError(f"amp must be None (fp32), torch.bfloat16 or torch.float16, got {amp!r}")


@torch.no_grad()
def evaluate(model, split, batch_size: int = 512, amp=None, *, distributed: bool = False) -> dict:
    """Cross-entropy and accuracy on `split` (no augmentation), against the split's labels; `amp`:
    the autocast dtype (None: off). `distributed=True` (the study's, under torchrun): each rank
    evaluates its rows and the sums are all-reduced, so every rank must call it; False: this process
    evaluates the whole split alone (called by rank 0 alone, the all-reduce waited for the others forever)."""
    _check_amp(amp)
    check_flag(distributed, "distributed")
    shard = distributed and dist.world() > 1
    if len(split) == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    tot_loss = tot_correct = n = 0
    # (each module's mode restored, also when a batch fails: model.train(was) put a module the caller
    # keeps in eval, a frozen BatchNorm, back in train mode, and an exception left the model in eval)
    with hooked_eval(model, ()):
        for xb, yb in D.iterate(split, batch_size):
            if shard:  # this rank's rows of the batch; the sums are added over ranks below
                rows = dist.rows(yb.numel())
                xb, yb = xb[rows], yb[rows]
                if not yb.numel():
                    continue
            with torch.autocast(xb.device.type, dtype=amp, enabled=amp is not None):
                out = model(xb).float()
            tot_loss += float(F.cross_entropy(out, yb, reduction="sum"))
            tot_correct += int((out.argmax(1) == yb).sum())
            n += yb.numel()
    if shard:
        tot_loss, tot_correct, n = dist.all_sum(torch.tensor([tot_loss, tot_correct, n], dtype=torch.float64,
                                                             device=split.y.device)).tolist()
    return {"loss": tot_loss / n, "acc": tot_correct / n}
