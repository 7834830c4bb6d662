"""Appendix D's regularizers (--l1, --dropout, --augment autoaugment; l2 is --weight-decay): the l1
step against a hand-written one, run names and phase keys unchanged at the defaults, and a tiny
study with all three, whose checkpoints load back with their dropout. The augmentation itself is
checked in test_data.py, the dropout layer in test_models.py."""
import copy
import dataclasses
import json

import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.experiment import data as D
from sparsetrain.experiment import study
from sparsetrain.experiment.checkpoint import load_model
from sparsetrain.experiment.config import Config, Hyper
from sparsetrain.experiment.reuse import phase_key
from sparsetrain.experiment.study import result_settings, run_dir_of
from sparsetrain.experiment.train import make_optimizer, train_epoch
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import random_mask, tiny_split


def test_l1_step_is_the_gradient_of_the_penalised_loss():
    """One full-batch SGD step with --l1: the loss's gradient plus lambda * sign(w) on every conv and
    linear weight (a sparse layer's stored values), not on biases; the reported loss is the data's."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(),
                          SparseLinear.from_dense(lin, random_mask((3, 8), 0.5, generator=torch.Generator().manual_seed(1))))
    ref = copy.deepcopy(model)
    hp = Hyper(epochs=1, batch_size=16, lr=0.1, milestones=(), weight_decay=0.0, rewind_iter=0, momentum=0.0, drop=0.1)
    opt, _ = make_optimizer(model, hp)
    out = train_epoch(model, tiny_split(16), opt, 16, epoch=0, seed=0, masks={}, l1=0.01)
    x, y = next(D.iterate(tiny_split(16), 16, shuffle=True, augment=True, generator=D.epoch_generator(0, 0)))
    data_loss = F.cross_entropy(ref(x), y)
    penalty = ref[1].weight.abs().sum() + ref[3].weight.values.abs().sum()
    (data_loss + 0.01 * penalty).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    assert abs(out["loss"] - float(data_loss.detach())) < 1e-6


def test_defaults_keep_run_names_and_phase_keys():
    """Runs named before the flags existed keep their directories and linked phases; any other value
    names another run and another teacher phase."""
    cfg = Config(dataset="mnist")
    assert not {"l1", "dropout", "augment"} & set(result_settings(cfg))
    # the names and keys runs had before the flags existed (computed at commit 497abeb)
    from sparsetrain.experiment.config import config_from_args
    for argv, name, key in ((["mnist", "--profile", "quick"], "mnist-eps0.2-quick-lenet300-a0ce6b7d", "3ba1f9f07850f85b"),
                            (["cifar10"], "cifar10-eps0.2-paper-resnet18-vgg_d5g5-7443e0a0", "b8d44f827664d169")):
        old, _ = config_from_args(argv)
        assert run_dir_of(old).endswith(name) and phase_key(old, "teacher", 0).startswith(key), argv
    for change in (dict(l1=1e-5), dict(dropout=0.5), dict(augment="autoaugment")):
        other = dataclasses.replace(cfg, **change)
        assert run_dir_of(other) != run_dir_of(cfg), change
        assert phase_key(other, "teacher", 0) != phase_key(cfg, "teacher", 0), change


def test_a_study_with_every_regularizer_runs_and_its_checkpoints_load(mnist_dir, study_args, capsys):
    args = study_args(mnist_dir, "--teachers", "dense", "--model", "vgg_d1g1", "--l1", "1e-4", "--dropout", "0.5",
                      "--augment", "autoaugment", "--wall", "0.6")
    assert study.main(args) == 0
    (rd,) = [p for p in (mnist_dir / "runs").iterdir() if p.is_dir()]
    cfg = json.loads((rd / "config.json").read_text())
    assert (cfg["l1"], cfg["dropout"], cfg["augment"]) == (1e-4, 0.5, "autoaugment")
    model, _, payload = load_model(str(rd / "seed0" / "teacher" / "ckpt" / "round_01.pt"))
    assert payload["arch"]["dropout"] == 0.5 and isinstance(model.dropout, nn.Dropout)
    for bad, what in ((["--l1", "-1"], "--l1 must be >= 0"), (["--dropout", "1"], "--dropout must be in [0, 1)"),
                      (["--augment", "cutmix"], "argument --augment: invalid choice")):
        capsys.readouterr()
        try:
            rc = study.main(study_args(mnist_dir, *bad))
        except SystemExit as e:
            rc = e.code
        assert rc == 2 and what in capsys.readouterr().err, bad


def test_dropout_masks_follow_seed_and_epoch_not_the_global_rng():
    """--dropout draws its masks from (seed, epoch, rank), inside fork_rng: a resume restores only the
    CPU generator (a GPU's dropout drew other masks after it) and DDP ranks seeded alike drew the same
    ones. Two epochs from different global RNG states train alike and leave the global RNG as it was."""
    def run(global_seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        hp = Hyper(epochs=1, batch_size=8, lr=0.1, milestones=(), weight_decay=0.0, rewind_iter=0, momentum=0.0,
                   drop=0.1)
        opt, _ = make_optimizer(model, hp)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        train_epoch(model, tiny_split(16), opt, 8, epoch=3, seed=0, masks={})
        assert torch.equal(torch.get_rng_state(), before)
        return model
    a, b = run(1), run(2)
    # the reference: the same epoch by hand, its dropout drawing from a global RNG seeded from
    # data.seeded(seed 0, stream 11, epoch 3, rank 0) (was: only that the two runs agreed, which a
    # dropout that dropped nothing passed too)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    torch.manual_seed(D.seeded(0, 11, 3, 0).initial_seed())
    for x, y in D.iterate(tiny_split(16), 8, shuffle=True, augment=True, generator=D.epoch_generator(0, 3)):
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.1 * p.grad
    for p, q, r in zip(a.parameters(), b.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r)
