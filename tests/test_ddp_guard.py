"""engine/ddp_guard.py: a user's DistributedDataParallel built before a prune or swap is refused at its next
forward, and the forward pre-hook that checks it runs only while such a DDP lives (2 gloo processes)."""
import copy
import gc

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.prune import global_prune

from conftest import spawn_gloo


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def _averaged(ddp, model, x, rank, world):
    """`ddp`'s gradients after its rank's rows of `x` against one process's over all of them (a copy of `model`)."""
    ref = copy.deepcopy(model)
    ddp(x.chunk(world)[rank]).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


def _hook_worker(rank, world):
    import torch.distributed as dist
    hooks = nn.modules.module._global_forward_pre_hooks
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    a, b = _net(), _net()
    masks = global_prune(a, {}, 0.3)
    sparsetrain.sparsify_(a, masks)
    masks = global_prune(a, masks, 0.5)
    assert not hooks  # (no DDP anywhere: every module call paid the hook for the rest of the process)
    da, db = nn.parallel.DistributedDataParallel(a), nn.parallel.DistributedDataParallel(b)
    masks = global_prune(a, masks, 0.6)
    assert hooks
    _averaged(db, b, x, rank, world)  # (b's DDP, first and fitting, removed the hook: a's then ran unchecked)
    with pytest.raises(ValueError, match="built before the model's trainable parameters changed size"):
        da(x.chunk(world)[rank])
    assert hooks
    del da
    gc.collect()
    b(x)
    assert not hooks  # (the stale DDP freed: unhooked at the next module call)
    _averaged(nn.parallel.DistributedDataParallel(a), a, x, rank, world)
    da = nn.parallel.DistributedDataParallel(a)
    global_prune(a, masks, 0.7)
    assert hooks
    dist.destroy_process_group()
    b(x)
    assert not hooks  # (the group destroyed: no DDP can run)
    del da, db
    gc.collect()  # (the group they hold released now, not in the exit handlers: conftest._gloo_rank)


def test_the_ddp_check_runs_only_while_a_ddp_built_before_a_prune_lives(tmp_path):
    """A prune under a process group installed a global module forward pre-hook, removed only by the first DDP
    forward that passed: with no DDP after the prune it stayed for the rest of the process (~1.3 µs added to
    every module call of every model, ~2.6x an nn.Identity's call), and another model's fitting DDP removed
    it, so a stale DDP running after it averaged no gradient, silently. The hook now runs while a DDP built
    before the change lives and the group exists; the stale one is refused, the others average as one process."""
    spawn_gloo(_hook_worker, tmp_path)


def _flags_worker(rank, world):
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    other = _net()
    masks = global_prune(other, {}, 0.3)
    sparsetrain.sparsify_(other, masks)
    c = _net()
    c[0].bias.requires_grad_(False)
    dc = nn.parallel.DistributedDataParallel(c)
    masks = global_prune(other, masks, 0.5)  # (another model's prune: c's DDP is checked at its next forward)
    c[0].bias.requires_grad_(True), c[2].bias.requires_grad_(False)  # (as many trainable tensors and bytes)
    with pytest.raises(ValueError, match=r"requires_grad was changed on the model's parameters \(3 -> 3 trainable "
                                         r"tensors: '0.bias' unfrozen, '2.bias' frozen\)"):
        dc(x.chunk(world)[rank])
    c[0].bias.requires_grad_(False), c[2].bias.requires_grad_(True)  # (as built: a freeze undone is no change)
    _averaged(dc, c, x, rank, world)


def test_a_ddp_is_checked_against_the_requires_grad_flags_it_was_built_with(tmp_path):
    """The check compared the count of trainable tensors and their bytes with those DDP logged: freezing one
    tensor and unfreezing another of the same size passed, and DDP then waited for the frozen one's gradient
    and never averaged the unfrozen one's. It compares each parameter's flag at construction now, naming those
    changed; the flags restored (a freeze undone) pass and average as one process."""
    spawn_gloo(_flags_worker, tmp_path)
