"""The training step (train.py) against a hand-written one in plain PyTorch, and what it does with
the models and arguments it is given."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.experiment import data as D
from sparsetrain.experiment.train import train_epoch
from sparsetrain.testing import tiny_split


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
