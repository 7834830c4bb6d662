"""Data parallelism inside one run: `torchrun --nproc-per-node N -m sparsetrain.experiment ...`.

Every rank loads the same data and builds the same model from the same seed; each global batch
(`--batch-size`, drawn with every augmentation from the same seeded CPU generator as a single
process) is cut into N contiguous row slices, one per rank, and the local loss is scaled by
n_local * N / n_global, so DistributedDataParallel's gradient average is exactly the gradient of
the global batch mean for a model without BatchNorm (with it, each rank normalises with its own
rows' batch statistics, as DDP does without SyncBatchNorm: close to one process, not equal; a final
batch under 2N rows is computed whole on every rank, so no rank trains BatchNorm on one sample).
Gradients are averaged by DDP (gloo on CPUs, NCCL on GPUs); buffers are synced from rank 0 when a
round's DDP is built, not on every step (`forward_sync_buffers=False`: the CSR index buffers never
change within a round), and BatchNorm
running statistics are averaged over the ranks after every epoch. Evaluation and the entropy pass
(ReLU counts of Eq. 1) are sharded and summed over ranks, so they equal the single-process values.
Pruning runs on every rank on identical weights; the masks are checked to agree. DDP and the
optimizer are rebuilt after every round (the parameters change size). Rank 0 alone writes files.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["launch_var", "launch_main", "rank_device", "setup", "world", "rank", "is_main", "barrier", "all_sum",
           "rows", "shard", "wrap", "sizes",
           "sync_bn_stats_",
           "check_masks_agree", "same_everywhere", "teardown"]


def launch_var(name: str, default: int) -> int:
    """torchrun's integer variable `name` (WORLD_SIZE, RANK, LOCAL_WORLD_SIZE, LOCAL_RANK), `default` where unset;
    ValueError naming it when it is no whole number (int()'s traceback before)."""
    v = os.environ.get(name, "")
    if not v.strip():
        return default
    if not v.strip().isdecimal():  # (isdigit() passed "²", which int() refuses: its message, naming no variable)
        raise ValueError(f"{name}={v!r} is not a whole number: start the processes with torchrun, which sets it, "
                         f"or unset it")
    return int(v)


def launch_main() -> bool:
    """Whether this process is rank 0 by torchrun's variables, before the group exists: a single process
    (WORLD_SIZE unset or 1) is, whatever a RANK left over from a parent job says; ValueError naming a
    WORLD_SIZE or RANK that is no whole number."""
    return launch_var("WORLD_SIZE", 1) <= 1 or launch_var("RANK", 0) == 0


def rank_device(dev: torch.device) -> torch.device:
    """`dev`, or under torchrun on GPUs this rank's own, cuda:LOCAL_RANK (made current); ValueError when
    the node has fewer GPUs than processes (checked on every rank: set_device's "invalid device
    ordinal" was one rank's traceback)."""
    if dev.type != "cuda" or launch_var("WORLD_SIZE", 1) <= 1:
        return dev
    local, gpus = launch_var("LOCAL_RANK", 0), torch.cuda.device_count()
    per_node = max(launch_var("LOCAL_WORLD_SIZE", 1), local + 1)  # (a launcher without LOCAL_WORLD_SIZE)
    if per_node > gpus:
        raise ValueError(f"torchrun started {per_node} processes on this node, which has {gpus} CUDA device(s): one "
                         f"GPU per rank; use --nproc-per-node {gpus} or fewer, or --device cpu")
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    return dev


def setup(device: torch.device) -> None:
    """Join the torchrun group (env:// rendezvous) when launched with WORLD_SIZE > 1; ValueError when
    the rendezvous' variables are missing (WORLD_SIZE set by hand or left over from a parent job)."""
    n = launch_var("WORLD_SIZE", 1)
    if n > 1 and not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:  # (init_process_group raised its ValueError for the first one, a traceback)
            raise ValueError(f"WORLD_SIZE={n} but {', '.join(missing)} not set: start the processes with torchrun "
                             "(which sets them all), or unset WORLD_SIZE to run one process")
        init_group("nccl" if device.type == "cuda" else "gloo")


def init_group(backend: str, **kwargs) -> None:
    """dist.init_process_group(backend, **kwargs) with the modules DDP imports on its first construction
    imported before it, so that teardown can end the group's threads."""
    # torch.distributed.nn.functional's collectives default to group=group.WORLD, evaluated when
    # the module is first imported; DDP's first construction imports it, so after this init its
    # defaults would hold the default group for good: teardown could not free it and its gloo
    # threads ran on into the C++ exit handlers (PyTorch 2.14). Imported now, the defaults are None.
    import torch.distributed.nn.functional  # noqa: F401
    # DDP's first construction also imports torch._dynamo (torch's lazy __getattr__), and that
    # import leaves its callers' frames, DDP's __init__ with the wrapper among them, in cyclic
    # garbage: the dense round's wrapper and its gradient buckets then lived on until the cycle
    # collector ran. Imported first, every round's wrapper is freed when the round returns.
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend, **kwargs)


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (the tensor itself when alone)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def rows(n: int) -> slice:
    """This rank's disjoint, contiguous share of n rows (possibly empty): evaluation and entropy."""
    w, r = world(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def shard(n: int) -> tuple[slice, float]:
    """This rank's rows of a global batch of n, and the factor n_local * world / n that makes the
    DDP-averaged gradient of the local mean loss the gradient of the global mean."""
    w = world()
    if w == 1 or n < 2 * w:  # (whole on every rank: a one-row share would fail BatchNorm on a 1x1 map)
        return slice(0, n), 1.0
    r = rank()
    lo, hi = n * r // w, n * (r + 1) // w
    return slice(lo, hi), (hi - lo) * w / n


def wrap(model: nn.Module) -> nn.Module:
    """The model in DistributedDataParallel for training, else itself. Buffers are synced from rank
    0 when it is built (every rank holds the same ones then) but not on every forward."""
    if world() == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    p = next(model.parameters())
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[p.device.index] if p.is_cuda else None,
                                              forward_sync_buffers=False)
    ddp.built_sizes = sizes(model)  # (its gradient buckets' sizes: train.py refuses it once they change)
    return ddp


def sizes(model: nn.Module) -> list[int]:
    """The element counts of model's trainable parameters (a prune resizes sparse layers' values)."""
    return [p.numel() for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def sync_bn_stats_(model: nn.Module) -> None:
    """Average BatchNorm running means and variances over the ranks (each saw its own rows)."""
    if world() == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for t in (m.running_mean, m.running_var):
                all_sum(t).div_(world())


@torch.no_grad()
def averaged_state(model: nn.Module) -> dict:
    """A copy of model.state_dict() with the BatchNorm running statistics averaged over the ranks, as
    sync_bn_stats_ leaves them at an epoch's end (a mid-epoch snapshot: the --perturb rewind one)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n, m in model.named_modules():
        if world() > 1 and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in ("running_mean", "running_var"):
                all_sum(state[f"{n}.{b}" if n else b]).div_(world())
    return state


def check_masks_agree(model: nn.Module, masks: dict) -> None:
    """Pruning ran on every rank on identical weights: its masks must agree, compared by a hash of
    each layer's kept positions (a count alone passes per-layer rules, which keep a fixed count)."""
    if world() == 1:
        return
    from ..engine.nn import masks_of
    p = 2 ** 31 - 1  # per layer: kept count and sum of h(position) = (position * a mod p)^2 mod p (int64)
    keys = []
    for m in masks_of(model, masks).values():
        x = m.flatten().nonzero().flatten() % p * 48271 % p
        keys += [int(x.numel()), int((x * x % p).sum())]
    counts = torch.tensor(keys, dtype=torch.int64, device=next(model.parameters()).device)
    lo, hi = counts.clone(), counts.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("the ranks' pruning masks differ: the ranks' weights diverged")


def from_main(obj):
    """Rank 0's `obj` (any picklable object) on every rank: one decision for all."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_everywhere(obj) -> bool:
    """Whether every rank holds an equal `obj` (picklable), the same answer on every rank."""
    if world() == 1:
        return True
    got = [None] * world()
    dist.all_gather_object(got, obj)
    return all(o == got[0] for o in got)


def on_main(fn, expected: tuple) -> None:
    """fn() on rank 0 (the one that writes); an `expected` error there is raised on every rank (under
    torchrun the others would otherwise die on their next collective, with a traceback)."""
    failed = None
    if is_main():
        try:
            fn()
        except expected as e:
            failed = e
    failed = from_main(failed)  # (a collective: also the ranks' barrier)
    if failed is not None:
        raise failed


def teardown() -> None:
    """Leave the group with its threads joined: destroy_process_group() drops the registry's
    references only, and a group something else still held (setup: the default arguments and the
    first DDP wrapper; the collection below: any other reference cycle) kept its gloo threads running
    into the C++ exit handlers, which at times aborted a rank after its work was done ("terminate called
    without an active exception", exit -6; torchrun then failed the run: 3 of ~150 resumed 2-process
    runs here)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # (an object in a reference cycle may hold the group)
        dist.destroy_process_group()
