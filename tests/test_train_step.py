"""The training step (train.py) against a hand-written one in plain PyTorch, and what it does with
the models and arguments it is given."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.experiment import data as D
from sparsetrain.experiment.train import train_epoch
from sparsetrain.testing import tiny_split, zero_pruned_


def _net(dropout=0.0):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(64, 3))


def test_a_teacher_in_train_mode_is_run_in_eval_mode_and_left_as_it_was():
    """Eq. 2's teacher runs in eval mode (its running statistics, dropout off): a teacher handed over in
    train mode updated its BatchNorm statistics every batch and normalised with the batch's. The
    student's epoch equals a plain-PyTorch one against the eval-mode teacher; the teacher's modes
    (a module left in eval inside included) are as they were after."""
    torch.manual_seed(0)
    student, teacher = _net(), _net(dropout=0.5)
    teacher.train()
    teacher[4].eval()  # (a module's own mode, kept)
    teacher[1].running_mean.uniform_(-1, 1)
    stats = copy.deepcopy(teacher.state_dict())
    ref = copy.deepcopy(student)
    split = tiny_split(16)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    train_epoch(student, split, opt, 8, epoch=0, seed=0, masks={}, teacher=teacher, alpha=0.5, tau=2.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert [m.training for m in teacher.modules()] == [True, True, True, True, True, False, True]
    with pytest.raises(ValueError, match="teacher is the model being trained: pass a frozen copy"):
        train_epoch(teacher, split, opt, 8, epoch=0, seed=0, masks={}, teacher=teacher)  # (its eval mode)
    ev = copy.deepcopy(teacher).eval()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in D.iterate(split, 8, shuffle=True, augment=True, generator=D.epoch_generator(0, 0)):
        s = ref(xb)
        with torch.no_grad():
            p_t = F.softmax(ev(xb) / 2.0, 1)
        kl = (p_t * (p_t.log() - F.log_softmax(s / 2.0, 1))).sum(1).mean()
        ref_opt.zero_grad()
        (0.5 * F.cross_entropy(s, yb) + 0.5 * 4.0 * kl).backward()
        ref_opt.step()
    for (k, a), b in zip(student.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_evaluate_is_in_eval_mode_and_restores_each_modules_mode():
    """evaluate: BatchNorm on its running statistics (unchanged), dropout off: the dense reference in
    eval mode. After it every module has the mode it had: model.train(was) put a BatchNorm the caller
    keeps frozen (in eval) back in train mode, and an exception in a batch left the model in eval."""
    from sparsetrain.experiment.train import evaluate
    torch.manual_seed(0)
    model = _net(dropout=0.5)
    model[1].running_mean.uniform_(-1, 1)
    model[1].eval()
    stats = copy.deepcopy(model.state_dict())
    split = tiny_split(20)
    got = evaluate(model, split, batch_size=8)
    x, y = next(D.iterate(split, 20))
    with torch.no_grad():
        out = copy.deepcopy(model).eval()(x)
    assert got["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert got["acc"] == int((out.argmax(1) == y).sum()) / 20
    assert all(torch.equal(v, stats[k]) for k, v in model.state_dict().items())
    modes = [True, True, False, True, True, True, True]
    assert [m.training for m in model.modules()] == modes
    bad = D.Split(split.x[:, :, :3], split.y, split.y, split.index, split.noisy, split.mean, split.std)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # (3x4 images: the classifier's 64 inputs do not fit)
        evaluate(model, bad)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("change,error,message", [
    (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (dict(batch_size=True), ValueError, "batch_size must be an int >= 1, got True"),
    (dict(l1=-0.01), ValueError, "l1 must be a number >= 0 and finite"),
    (dict(l1=float("nan")), ValueError, "l1 must be a number >= 0 and finite"),
    (dict(l1="0.01"), ValueError, "l1 must be a number >= 0 and finite"),
    (dict(split=tiny_split(0)), ValueError, "split holds no samples"),
    (dict(split=[1, 2]), TypeError, "split must be a data.Split"),
    (dict(opt=None), TypeError, "opt must be a torch.optim.Optimizer"),
    (dict(teacher=3), TypeError, "teacher must be an nn.Module or None, got int"),
    (dict(amp="bf16"), ValueError, "amp must be None"),
    # (these failed after the first batch had run: BatchNorm's statistics, or the first step, changed)
    (dict(on_step=3), TypeError, "on_step must be callable or None, got int"),
    (dict(scaler=1.0), TypeError, "scaler must be a torch.amp.GradScaler or None, got float"),
])
def test_train_epoch_refuses_bad_arguments_before_touching_the_model(change, error, message):
    """batch_size 0 was a ZeroDivisionError; l1 < 0 trained on a negative penalty (growing weights) and
    NaN made every weight NaN, silently; an empty split reported loss and accuracy 0.0; a teacher that
    is no module, an opt of None or an amp string failed deep inside with a message naming no argument.
    Each is now an error naming it, and the model is left as it was."""
    from sparsetrain.experiment.train import evaluate
    torch.manual_seed(0)
    model = _net()
    before = copy.deepcopy(model.state_dict())
    args = dict(split=tiny_split(16), opt=torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8)
    args.update(change)
    with pytest.raises(error, match=message):
        train_epoch(model, args.pop("split"), args.pop("opt"), args.pop("batch_size"), epoch=0, seed=0, masks={},
                    **args)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if "amp" in change:
        with pytest.raises(ValueError, match="amp must be None"):
            evaluate(model, tiny_split(16), amp=change["amp"])
    # (the l1 that is accepted: the loss's gradient plus l1 * sign(w) is test_regularizers.py's)
    assert train_epoch(model, tiny_split(16), torch.optim.SGD(model.parameters(), lr=0.1), 8, epoch=0, seed=0,
                       masks={}, l1=0)["loss"] > 0


def _hyper(**change):
    from sparsetrain.experiment.config import Hyper
    hp = dict(epochs=4, batch_size=8, lr=0.1, milestones=(1, 3), weight_decay=1e-2, rewind_iter=0, momentum=0.9,
              drop=0.5)
    return Hyper(**{**hp, **change})


@pytest.mark.parametrize("change,message", [
    (dict(milestones="3"), "hp.milestones must be increasing epochs >= 1"),
    (dict(milestones=(0, 2)), "hp.milestones must be increasing epochs >= 1"),
    (dict(milestones=(3, 1)), "hp.milestones must be increasing epochs >= 1"),
    (dict(milestones=(1.5,)), "hp.milestones must be increasing epochs >= 1"),
    (dict(lr=float("nan")), r"hp.lr must be a number > 0 and finite, got nan"),
    (dict(lr=0.0), r"hp.lr must be a number > 0"),
    (dict(momentum=1.5), r"hp.momentum must be a number in \[0, 1\)"),
    (dict(weight_decay=float("nan")), "hp.weight_decay must be a number >= 0 and finite"),
    (dict(drop=0.0), r"hp.drop must be a number in \(0, 1\]"),
    (dict(drop=float("nan")), r"hp.drop must be a number in \(0, 1\]"),
])
def test_make_optimizer_refuses_a_schedule_config_would_refuse(change, message):
    """make_optimizer with a Hyper made by hand: milestones "3" (MultiStepLR counted the characters)
    or a milestone 0 never lowered the LR, a NaN lr / decay / drop, a momentum >= 1 or a drop of 0
    trained to NaN or stood still, silently; now a ValueError naming the field. A model or hp of the
    wrong kind is a TypeError, not an AttributeError."""
    from sparsetrain.experiment.train import make_optimizer
    with pytest.raises(ValueError, match=message):
        make_optimizer(_net(), _hyper(**change))
    with pytest.raises(TypeError, match="hp must be a config.Hyper"):
        make_optimizer(_net(), dict(lr=0.1))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        make_optimizer(None, _hyper())


def test_sgd_epochs_equal_a_hand_written_masked_step_and_schedule():
    """Four epochs of make_optimizer + train_epoch (+ the scheduler stepped per epoch, as the loop does)
    on a dense masked model with a KD teacher, 21 samples in batches of 8, equal plain PyTorch: Eq. 2
    with tau^2, gradients zero at pruned weights, SGD with momentum 0.9 (no Nesterov, no dampening)
    and weight decay on every parameter (BatchNorm's too; a pruned weight's decay is 0: it stays 0),
    the LR x drop from each milestone epoch on (0.1, 0.05, 0.05, 0.025)."""
    from sparsetrain.experiment.train import make_optimizer
    from sparsetrain.testing import random_mask
    torch.manual_seed(0)
    model, teacher = _net(), _net().eval()
    masks = {"0": random_mask((4, 1, 3, 3), 0.5, generator=torch.Generator().manual_seed(1)),
             "5": random_mask((3, 64), 0.7, generator=torch.Generator().manual_seed(2))}
    zero_pruned_(model, masks)
    ref = copy.deepcopy(model)
    split = tiny_split(21)
    split.pad = 1  # (shifts and flips: the epoch's generator draws them)
    hp = _hyper()
    opt, sched = make_optimizer(model, hp)
    lrs = []
    for ep in range(hp.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        train_epoch(model, split, opt, 8, epoch=ep, seed=3, masks=masks, teacher=teacher, alpha=0.8, tau=4.0)
        sched.step()
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])
    grad_mask = {"0.weight": masks["0"], "5.weight": masks["5"]}
    bufs = {}
    for ep in range(hp.epochs):
        lr = hp.lr * hp.drop ** sum(ep >= m for m in hp.milestones)
        for xb, yb in D.iterate(split, 8, shuffle=True, augment=True, generator=D.epoch_generator(3, ep)):
            s = ref(xb)
            with torch.no_grad():
                p_t = F.softmax(teacher(xb) / 4.0, 1)
            kl = (p_t * (p_t.log() - F.log_softmax(s / 4.0, 1))).sum(1).mean()
            ref.zero_grad()
            (0.2 * F.cross_entropy(s, yb) + 0.8 * 16.0 * kl).backward()
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    d = p.grad * grad_mask[n] if n in grad_mask else p.grad
                    d = d + hp.weight_decay * p
                    bufs[n] = hp.momentum * bufs[n] + d if n in bufs else d
                    p -= lr * bufs[n]
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert not model[5].weight[~masks["5"]].any()


def test_kd_loss_takes_numpy_numbers_and_refuses_a_tau_whose_square_overflows():
    """alpha and tau from numpy (np.float32(0.8)) were refused as "must be a number"; any finite tau
    passed, and from ~2e19 on alpha * tau^2 overflowed float32: the loss was NaN, silently. The limit
    is now --tau's, 1e18."""
    import numpy as np

    from sparsetrain.experiment.train import kd_loss
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(kd_loss(s, t, y, np.float32(0.75), np.float32(2.0)), kd_loss(s, t, y, 0.75, 2.0))
    assert torch.isfinite(kd_loss(s, t, y, 0.8, 1e18))
    for tau in (1e19, 1e20):
        with pytest.raises(ValueError, match="tau must be a number > 0 and finite, at most 1e18"):
            kd_loss(s, t, y, 0.8, tau)
