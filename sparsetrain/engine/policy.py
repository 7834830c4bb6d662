"""When a layer runs on the sparse kernels: the engine policy of a pruned model.

"dense" keeps dense masked layers (the reference), "sparse" makes every prunable layer sparse. "auto" decides per
layer by measurement when it is given an example batch (as SparseProp's run_and_choose does): each dense layer at
least MEASURE_FROM sparse is timed once, a training step (forward, backward, the optimizer's step and, dense, the
masking) at its input shape in the model, as a dense masked layer and as a sparse one, and goes sparse where that is
faster. Timing is noisy, and two runs that decided differently would differ in the last bits of their results, so a
decision is made once per machine: cached per (layer geometry, input shape, nonzeros, dtype, device, threads, CPU
model, torch version, the C++ kernels' build and SIMD width; autocast dtype, GPU name and Triton's CPU interpreter
where they apply) in memory and in $SPARSETRAIN_CACHE_DIR/engine_auto.json (default ~/.cache/sparsetrain; delete it
to re-measure), measured under a file lock so that runs in parallel (a sweep's) all take the first decision made,
and under DDP taken on rank 0 and broadcast (`agree`); a checkpoint lists its sparse layers, so a resume reuses
them. Layers below SPARSE_MIN_WEIGHTS stay dense untimed (the op's fixed cost). Without an example, "auto" falls
back to the crossovers measured by bench/kernels.py on CPU (SPARSE_FROM) for layers that are not tiny
(SPARSE_MIN_WEIGHTS). A layer never goes back to dense: its CSR is its mask. Sparse convs followed by a BatchNorm
are fused with it (engine/fused.py).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
import warnings
from typing import Callable

import torch
from torch import nn

from .backend import current_backend
from .convert import sparsify_, unconvertible
from .fuse import fuse_
from .hooks import hooked_eval
from .args import MATERIALIZE, check_bool_mask, check_flag
from .nn import SPARSE_TYPES, SparseConv2d, check_masks, check_pattern, is_sparse, prunable_layers
from . import writer_lock
from .durable import fsync_dir, make_dirs
from .policy_cache import add_bounded, machine as _machine

__all__ = ["ENGINES", "SPARSE_FROM", "SPARSE_MIN_WEIGHTS", "MEASURE_FROM", "apply_engine", "sparse_is_faster"]

ENGINES = ("auto", "dense", "sparse")
LOCK_WAIT_S = 300.0  # (seconds a run waits for the decision cache's lock: _decision_lock)
# layer sparsity from which the sparse kernels win on CPU (bench/kernels.py crossovers, README), and
# the weight count below which a layer stays dense (a 512->10 classifier costs ~0.1 ms either way,
# and the op's fixed overhead loses to a tiny dense GEMM)
SPARSE_FROM = {"linear": 0.7, "conv": 0.8}
SPARSE_MIN_WEIGHTS = 16384
# below this sparsity a dense GEMM always won in bench/kernels.py: such layers are not timed
MEASURE_FROM = 0.5
_DECISIONS: dict[str, bool] = {}  # measured decisions (sparse_is_faster), loaded from the cache file
_UNWRITABLE: set[str] = set()  # cache files a write failed to, warned about once
_WAITED: dict[str, float] = {}  # lock file -> seconds waited for it in vain since it was last taken (_decision_lock)
LEFTOVER_AGE_S = 300.0  # (a cache read removes dead writers' temporary files this old: no write lasts as long)


def apply_engine(model: nn.Module, masks: dict, engine: str, fuse: bool = True, example: torch.Tensor | None = None,
                 agree: Callable[[dict], dict] | None = None) -> dict:
    """Convert layers per the engine policy (module docstring); with `fuse`, then fuse every sparse conv -> [ReLU] ->
    BatchNorm -> [ReLU] not fused yet (engine/fused.py; skipped for a model torch.fx cannot trace). `example` (a
    batch of the model's input) makes "auto" measure; `agree` maps this process's {layer: sparse?} decisions to the
    ones every process uses (DDP: rank 0's). Returns the masks still needed by dense layers. "dense" converts
    nothing, back either: layers that are sparse already stay so (densify_ makes them dense). Converted layers hold
    new Parameters (their values), as after sparsify_: build the optimizer after this call (the step of one built
    before it, over the dense weights the model no longer uses, is refused)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_flag(fuse, "fuse")
    if example is not None and not isinstance(example, torch.Tensor):  # (it crashed in the example pass)
        raise TypeError(f"example must be a torch.Tensor (a batch of the model's input) or None, got "
                        f"{type(example).__name__}")
    if agree is not None and not callable(agree):
        raise TypeError(f"agree must be a callable mapping {{layer: bool}} to {{layer: bool}}, got {type(agree).__name__}")
    if isinstance(example, torch.Tensor) and (example.is_meta or example.numel() == 0):  # (empty: the probe's
        # error named input_shape, which the caller never passed)
        raise ValueError(f"example is {'a meta tensor (a shape without values)' if example.is_meta else 'empty'}, "
                         f"shape {tuple(example.shape)}: pass a batch of the model's input")
    masks = check_masks(model, masks)
    to_sparse, to_measure = {}, {}
    # (auto: a layer sparsify_ refuses, a dilated or grouped conv, one inside a Transformer*Layer or
    # tied to another's weight, stays dense; "sparse" lets sparsify_ say why)
    refused = unconvertible(model) if engine == "auto" else set()
    for name, m in prunable_layers(model):
        if is_sparse(m) and name in masks:  # (a mask pruning it further was skipped, silently, before 2026-12-07)
            check_pattern(name, m.weight.mask(), masks)
        if is_sparse(m) or engine == "dense" or name in refused:
            continue
        if (engine == "auto" and m.weight.device.type == "cpu" and current_backend() != "triton"
                and m.weight.dtype not in (torch.float32, torch.float64)):
            continue  # (the C++ kernels compute in fp32/fp64: a bf16/fp16 model stays dense, where it
            # was converted and failed at its first forward; autocast over an fp32 model is the way)
        mk = masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
        if m.weight.is_meta or mk.is_meta:  # (no values to count, time or keep: as sparsify_ says)
            raise ValueError(f"layer {name!r}: " + (f"its weight is a meta tensor (a shape without values): {MATERIALIZE}"
                             if m.weight.is_meta else "its mask is a meta tensor: pass a mask holding its values"))
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        sp = 1.0 - int(mk.sum()) / mk.numel()
        if engine == "sparse":
            to_sparse[name] = mk
        elif example is not None:
            if sp >= MEASURE_FROM and mk.numel() >= SPARSE_MIN_WEIGHTS:
                to_measure[name] = mk
        elif sp >= SPARSE_FROM[kind] and mk.numel() >= SPARSE_MIN_WEIGHTS:
            to_sparse[name] = mk
    if to_measure:
        shapes = _input_shapes(model, example, set(to_measure))
        faster = {n: sparse_is_faster(model.get_submodule(n), mk, shapes[n][0], input_grad=shapes[n][1])
                  for n, mk in to_measure.items() if n in shapes}  # (a layer the forward never reached: dense)
        if agree is not None:
            faster = agree(faster)
            # (a value not True/False, such as the string "false", went sparse where truthy)
            bad = (next(((k, v) for k, v in faster.items() if not isinstance(v, bool)), None)
                   if isinstance(faster, dict) else type(faster).__name__)
            if bad is not None:
                raise TypeError(f"agree must return a dict {{layer name: bool}}, got "
                                + (f"{bad[0]!r}: {bad[1]!r}" if isinstance(bad, tuple) else bad))
            if not set(faster) <= set(to_measure):
                raise ValueError(f"agree returned decisions for layers that were not measured: "
                                 f"{sorted(set(faster) - set(to_measure))}")
        to_sparse.update({n: to_measure[n] for n, win in faster.items() if win})
    if to_sparse:
        sparsify_(model, to_sparse)
    if fuse and (to_sparse or any(type(m) is SparseConv2d for m in model.modules())):
        fuse_(model, strict=False)  # (a model fx cannot trace stays unfused: same results; the layers
        # fused in earlier rounds linked with today's, as restore_model's one call links them)
    return {n: mk for n, mk in masks.items() if n not in to_sparse and not is_sparse(model.get_submodule(n))}


def _input_shapes(model: nn.Module, example: torch.Tensor, names: set) -> dict[str, tuple[tuple, bool]]:
    """(input shape, whether training computes its gradient) of each named layer in one eval-mode
    forward of `example` with autograd whatever the caller's mode, as training runs it: a layer
    reading the batch itself (or parameter-free ops of it) computes no input gradient. The graph is
    dropped; an example made under inference_mode is cloned out of it (autograd refuses it)."""
    shapes, hooks = {}, []

    def record(name):
        def hook(_module, args, kwargs):  # (returns None: the args stay as they are)
            x = args[0] if args else kwargs.get("input")  # (a layer called as layer(input=x) too)
            if isinstance(x, torch.Tensor):
                shapes.setdefault(name, (tuple(x.shape), bool(x.requires_grad)))
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True))
    with hooked_eval(model, hooks), torch.inference_mode(False), torch.enable_grad():
        model(example.clone() if example.is_inference() else example)
    return shapes


def _trainer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], None]:
    """One training step of `layer` on x, as the study's loop trains it: gradients set to None, forward,
    backward, and a momentum SGD step (a sparse layer's over its nonzeros; a dense masked layer's over
    its whole weight, with its gradient masked before and its weight after: mask_grads_, enforce_masks_).
    Forward and backward alone left out the dense layer's part of this (2-3x its step on a 60%-sparse
    784 x 300 linear at batch 128), and timed an input gradient the first layer never computes."""
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = layer(x)
        if out.requires_grad:  # (a frozen layer on an input without gradient: training runs its forward alone)
            out.backward(torch.ones_like(out))
        if mask is not None and layer.weight.grad is not None:  # (none for a frozen weight)
            layer.weight.grad.masked_fill_(~mask, 0)
        opt.step()
        if mask is not None:
            with torch.no_grad():
                layer.weight.masked_fill_(~mask, 0)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
    return step


def _step_seconds(layer: nn.Module, x: torch.Tensor, step: Callable[[], None]) -> float:
    """Seconds of one call of `step` (`layer`'s training step on x: _trainer)."""
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _cache_path() -> str:
    # (a "~/..." that no shell expanded, from a .env file or Ray's env_vars, made a folder named "~" in the cwd)
    root = os.path.expanduser(os.environ.get("SPARSETRAIN_CACHE_DIR") or os.path.join("~", ".cache", "sparsetrain"))
    if root.startswith("~"):  # ("~nouser/x": expanduser leaves it, and a folder "~nouser" was made in the cwd)
        raise ValueError(f"SPARSETRAIN_CACHE_DIR must be a folder, got {root!r}: '~' names no home folder here")
    return os.path.join(root, "engine_auto.json")


def _load_decisions() -> None:
    # (a run whose decisions are all cached never saves one: its read removes what killed writers left too)
    _remove_leftovers(os.path.dirname(_cache_path()), LEFTOVER_AGE_S)
    try:
        with open(_cache_path()) as f:
            cached = json.load(f).items()
    except (OSError, ValueError, AttributeError, RecursionError):  # none yet, or unreadable: measure again
        return
    # an entry that is not true/false (edited or damaged: bool("false") was True) is measured again
    bad = [k for k, v in cached if not isinstance(v, bool)]
    if bad:
        warnings.warn(f"{_cache_path()}: ignoring {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} that are not "
                      f"true/false (e.g. {bad[0]!r}): measured again")
    _DECISIONS.update({k: v for k, v in cached if isinstance(v, bool)})


@contextlib.contextmanager
def _decision_lock():
    """An exclusive lock on the machine's decision cache (fcntl; none where it is missing): runs in
    parallel (a sweep's) measure a layer one at a time and all take the first decision made."""
    try:
        import fcntl
        path = _cache_path() + ".lock"
        make_dirs(os.path.dirname(path))  # (a new cache folder fsynced into its parent)
        f = open(path, "a")
    except (ImportError, OSError):  # (no fcntl, or a read-only home: decisions stay per process)
        yield
        return
    with f:
        # (polled against a deadline: a holder stopped (Ctrl-Z, a debugger) or hung blocked every other run at its
        # first layer for good; after LOCK_WAIT_S this process decides alone, told, and waits no more while it is stuck)
        waited = _WAITED.get(path, 0.0)  # (LOCK_WAIT_S in all while it stays held: each layer waited as long before)
        deadline, locked, lockable = time.monotonic() + max(0.0, LOCK_WAIT_S - waited), False, True
        while not locked:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError as e:
                # (a filesystem that cannot lock, ENOLCK: NFS without lockd: decided as without fcntl; a traceback before)
                lockable = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                if not lockable or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
        if not locked:  # (unlockable: as without fcntl; held LOCK_WAIT_S: told once, the next layers not waiting)
            if lockable and waited < LOCK_WAIT_S:
                warnings.warn(f"{path} stayed locked by another process for {LOCK_WAIT_S:g} s: the layers are "
                              "measured without it while it stays so (runs in parallel may decide differently)")
            _WAITED[path] = LOCK_WAIT_S
            yield
            return
        _WAITED.pop(path, None)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# the cache file's temporary files: `.engine_auto.<pid>.<random>`, locked by their writer (writer_lock);
# `.engine_auto.<random>` before 2026-12-06, never locked
_TMP = re.compile(r"\.engine_auto\.(?:([1-9][0-9]{0,6})\.)?[^.]+")


def _remove_leftovers(folder: str, min_age: float = 0.0) -> None:
    """Remove the cache's temporary files whose writer died (killed mid-write, nothing else removes them):
    whether it lives is its lock, as for the study's files (writer_lock.claim; the pid rule where the lock
    cannot tell, which keeps the older names: pid 0, this process group). None without fcntl (Windows, where
    os.kill is no liveness check). `min_age`: only files last written that many seconds ago or more (a read:
    an older sparsetrain's unlocked file may be one being written)."""
    if writer_lock.fcntl is None:
        return
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if (match := _TMP.fullmatch(name)) is None:
                continue
            try:
                young = min_age > 0 and time.time() - os.stat(os.path.join(folder, name)).st_mtime < min_age
            except OSError:  # (removed meanwhile: by its writer, or another reader)
                continue
            if not young:
                with writer_lock.claim(os.path.join(folder, name), int(match[1] or 0)) as alive:
                    if not alive:
                        with contextlib.suppress(OSError):
                            os.remove(os.path.join(folder, name))


def _save_decision(key: str, value: bool) -> None:
    """Merge one decision into the cache file (atomic replace, under _decision_lock; a dead writer's
    temporary files removed first)."""
    path, tmp, held = _cache_path(), None, None
    try:
        make_dirs(os.path.dirname(path))  # (a new cache folder fsynced into its parent)
        _remove_leftovers(os.path.dirname(path))
        try:
            with open(path) as f:
                merged = json.load(f)
        except (OSError, ValueError, RecursionError):  # (unreadable: written afresh)
            merged = {}
        if not isinstance(merged, dict):  # (valid JSON of another kind: as corrupt, written afresh)
            merged = {}
        add_bounded(merged, key, value)  # (the newest last, at most KEEP_PER_LAYER per layer: policy_cache)
        for attempt in range(10):  # (locked while it is written: the sign that its writer lives; anew where
            # a recovery took it between its creation and its lock)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".engine_auto.{os.getpid()}.")
            held = writer_lock.hold(fd, tmp)
            if held is not False or attempt == 9:
                break
            os.close(fd)
        held = None if held is False else held
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0)  # (in the order written: oldest first)
            f.flush()
            os.fsync(f.fileno())  # (its bytes on disk before its name: a crash left an empty cache file)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))  # (the rename durable: it lives in the folder's entries)
    except OSError as e:  # a read-only home: the decision stays in memory, told once per file
        if path not in _UNWRITABLE:
            _UNWRITABLE.add(path)
            warnings.warn(f"cannot write the engine's decision cache {path} ({e}): --engine auto's decisions stay "
                          "in this process (runs in parallel, or resumed, may decide differently); set "
                          "SPARSETRAIN_CACHE_DIR to a writable folder")
    finally:  # (a failed write, disk full: its .engine_auto.* temporary file stayed)
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        if held is not None:  # (released once tmp is renamed or removed)
            os.close(held)


def sparse_is_faster(layer: nn.Module, mask: torch.Tensor, input_shape: tuple, reps: int = 3,
                     input_grad: bool = True) -> bool:
    """Whether `layer` (nn.Conv2d / nn.Linear) with `mask` trains faster sparse than dense masked, timed at
    `input_shape` once per machine (module docstring: the cache): the best of `reps` training steps each (_trainer;
    `input_grad`: training computes the input's gradient), the two alternating after one warm-up each, so that a
    burst of load slows both alike (timed one after the other, one such burst cached the slower choice). Measured
    with autograd on whatever grad mode the caller is in (no_grad, inference_mode), on hook-free copies."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:  # (0 would cache "dense" untimed)
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    check_flag(input_grad, "input_grad")  # ("no" timed the input-gradient case, silently)
    if type(layer) not in SPARSE_TYPES:
        raise TypeError(f"layer must be a dense {' or '.join(t.__name__ for t in SPARSE_TYPES)}, got "
                        f"{type(layer).__name__}")
    if (not isinstance(input_shape, (tuple, list, torch.Size)) or not input_shape
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape)):
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    w = layer.weight
    if w.is_meta:  # (the probe failed in autocast's device lookup)
        raise ValueError(f"layer's weight is a meta tensor (a shape without values): {MATERIALIZE}")
    # (checked before the cache lookup: a mask of another shape, but as many nonzeros, took a decision silently)
    check_bool_mask(mask, w.shape, f"mask must be a bool tensor of the layer's weight shape {tuple(w.shape)}")
    linear = isinstance(layer, nn.Linear)
    if (input_shape[-1] != layer.in_features if linear
            else len(input_shape) not in (3, 4) or input_shape[-3] != layer.in_channels):
        raise ValueError("input_shape must be " + (f"[..., {layer.in_features}] (in_features)" if linear else
                         f"[N, {layer.in_channels}, H, W] or [{layer.in_channels}, H, W] (in_channels)")
                         + f" for this layer, got {tuple(input_shape)}")
    if not linear and not isinstance(layer.padding, str):  # (a map smaller than the kernel: torch's RuntimeError)
        span = [d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(h + 2 * p < k for h, p, k in zip(input_shape[-2:], layer.padding, span)):
            raise ValueError(f"input_shape {tuple(input_shape)} is smaller than this layer's kernel {tuple(span)} "
                             f"with its padding {tuple(layer.padding)}: each of H and W plus twice the padding must "
                             "be at least the kernel's")
    # (the timing runs under the caller's autocast, as training does: a bf16 dense GEMM is another speed)
    amp = (str(torch.get_autocast_dtype(w.device.type)) if torch.is_autocast_enabled(w.device.type) else None)
    gpu = torch.cuda.get_device_name(w.device) if w.is_cuda else None
    cpp = not w.is_cuda and current_backend() != "triton"  # (the C++ kernels time it, not Triton's)
    key = repr((type(layer).__name__, tuple(w.shape), getattr(layer, "stride", None), getattr(layer, "padding", None),
                layer.bias is not None, tuple(input_shape), int(mask.sum()), str(w.dtype), str(w.device),
                torch.get_num_threads(), _machine(cpp)) + ((amp,) if amp else ()) + ((gpu,) if gpu else ())
               + (("triton",) if not w.is_cuda and not cpp else ())  # (its interpreter)
               + (() if input_grad else ("no input gradient",))
               + (() if w.requires_grad else ("frozen",)))  # (no weight gradient nor step: another cost)
    if key in _DECISIONS:
        return _DECISIONS[key]
    with _decision_lock():
        _load_decisions()  # (another process may have decided it meanwhile: its decision is the machine's)
        if key not in _DECISIONS:
            # (the run's random streams do not see the probe; it needs autograd whatever the caller's mode)
            with (torch.inference_mode(False), torch.enable_grad(),
                  torch.random.fork_rng(devices=[w.device] if w.is_cuda else [])):
                sparse = SPARSE_TYPES[type(layer)].from_dense(layer, mask)
                dense = sparse.to_dense()  # (a new dense masked layer: none of the user's hooks, which the
                # probe's random input must not reach)
                x = torch.randn(input_shape, dtype=w.dtype, device=w.device, requires_grad=bool(input_grad))
                steps = {dense: _trainer(dense, x, mask.to(w.device, torch.bool)), sparse: _trainer(sparse, x, None)}
                best = {m: float("inf") for m in steps}
                for i in range(reps + 1):  # (i = 0: warm-up, untimed: caches, buffers, the optimizer's state)
                    for m, step in steps.items():
                        t = _step_seconds(m, x, step)
                        best[m] = min(best[m], t) if i else best[m]
            _DECISIONS[key] = best[sparse] < best[dense]
            _save_decision(key, _DECISIONS[key])
    return _DECISIONS[key]
