"""Atomic, self-describing checkpoints of (possibly sparse) models.

A model checkpoint stores its architecture (build_model arguments), which layers run on the sparse
engine, the bool masks of the dense layers with pruned weights, and the state_dict (where a sparse
layer's pattern is its CSR/BSR index). Loading rebuilds the model, converts the same layers to
sparse (empty: loading the state gives them their pattern), and loads the weights with
weights_only=True. A
filter-pruned model (sparsetrain.prune.filter) also stores its kept channels ("channels"), and
loading removes the others from the rebuilt model before loading the weights.
"""
from __future__ import annotations

import errno
import os
import zipfile
import zlib

import torch

from ..engine.convert import sparsify_
from ..engine.fuse import fuse_
from ..engine.nn import is_sparse, masks_of, prunable_layers
from ..engine.placeholders import HandOff
from ..prune import keep_channels_
from .dataset_errors import load_error
from .files import CorruptFile, ReadFailed, atomic_write, verify
from .models import build_model, resolve_name

# v2 (2026-12-05): "masks" holds only the dense layers' pruned masks (a sparse layer's pattern is its
# state's index); v1 held every layer's. This code reads both; an older one refuses v2 by name.
FORMAT, _READS = "sparsetrain-ckpt-v2", ("sparsetrain-ckpt-v1", "sparsetrain-ckpt-v2")


def atomic_save(obj, path: str) -> None:
    """torch.save through atomic_write (a kill never leaves a torn file), with its checksum."""
    atomic_write(path, lambda f: _save(obj, f), binary=True, checksum=True)


def _save(obj, f) -> None:
    """torch.save, whose zip writer turns a failed write (disk full) into "RuntimeError: [enforce fail
    at inline_container.cc] unexpected pos": raised as the OSError behind it (atomic_write's WriteFailed),
    and a Ctrl-C or SIGTERM landing in one of its writes as that KeyboardInterrupt (a stop, not a failed write)."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, (OSError, KeyboardInterrupt)):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        if cause is None and "inline_container" not in str(e):
            raise  # (not a write: a bug)
        raise cause or OSError(errno.EIO, f"the write failed ({str(e).splitlines()[0]})") from e


def safe_load(path: str) -> dict:
    """torch.load(weights_only=True) with a clear error for a missing, corrupt (against the checksum
    recorded at write time, when there is one, else the zip's CRC-32s) or foreign file; ReadFailed for one
    that cannot be read (no permission, an I/O error: not corrupt)."""
    missing = lambda: FileNotFoundError(f"checkpoint not found: {path}")  # noqa: E731
    if not os.path.exists(path):
        raise missing()
    try:
        if not verify(path):  # no record (a --teachers PATH, a file from elsewhere): the zip's own CRC-32s
            _check_crcs(path)
    except CorruptFile:
        if not os.path.exists(path):  # (deleted since the check above: verify's "corrupt: missing")
            raise missing() from None
        raise
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / non-torch files
        if isinstance(e, FileNotFoundError) or not os.path.exists(path):  # (deleted since the checks: not corrupt)
            raise missing() from None
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, FileNotFoundError):
            # (EACCES, EIO on a file without a record: not a corrupt file, maybe intact: one line naming it, as verify's)
            raise ReadFailed(e.errno, e.strerror or str(e), path) from e
        # (load_error: not torch's advice to retry with weights_only=False, unsafe for a file from elsewhere)
        raise CorruptFile(f"checkpoint {path} is corrupt or not a torch file ({load_error(e)})") from None
    if not isinstance(obj, dict) or obj.get("format") not in _READS:
        raise ValueError(f"checkpoint {path} is not a sparsetrain checkpoint (expected format {FORMAT!r})")
    return obj


def _check_crcs(path: str) -> None:
    """CorruptFile for a zip entry whose bytes fail its CRC-32: torch.load does not check them, so a byte
    flipped in a tensor loaded as a silently different weight. A file that is no zip is torch.load's to refuse."""
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return
    try:
        with z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
        if isinstance(e, OSError) and e.errno is not None:  # (EIO, EACCES: the read failed, not a CRC: maybe intact)
            raise ReadFailed(e.errno, e.strerror or str(e), path) from e
        bad = f"? ({type(e).__name__}: {e})"
    if bad is not None:
        raise CorruptFile(f"checkpoint {path} is corrupt: its entry {bad} fails the zip's CRC-32 check (the file has no "
                          ".sha256 record to compare with); restore it from a good copy")


def check_arch(arch) -> None:
    """`arch` must be build_model's arguments (a model of the study's registry): load_model
    rebuilds the model from them, so a model of one's own saved with anything else would save
    and then not load."""
    ok = isinstance(arch, dict) and "name" in arch and "num_classes" in arch
    try:
        ok = ok and bool(resolve_name(arch["name"]))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("arch must be build_model's arguments for a model of the study's registry (name, "
                         "num_classes[, in_channels, image_size]), e.g. dict(name='lenet300', num_classes=10, "
                         f"in_channels=1, image_size=28); got {arch!r}")


def model_payload(model, masks: dict, arch: dict) -> dict:
    """Everything needed to rebuild `model`: arch (build_model kwargs), sparse layers, and the masks
    of the dense layers that have pruned weights (a sparse layer's pattern is its state's CSR/BSR
    index; a full-size bool mask per layer made a 99%-sparse checkpoint ~22% of the dense file)."""
    check_arch(arch)
    sparse = [n for n, m in prunable_layers(model) if is_sparse(m)]
    kept = {n: mk for n, mk in masks_of(model, masks).items() if n not in sparse and not bool(mk.all())}
    payload = {"format": FORMAT, "arch": dict(arch), "masks": kept, "sparse_layers": sparse,
               "fused": any(isinstance(m, HandOff) for m in model.modules()), "state": model.state_dict()}
    if getattr(model, "kept_channels", None):  # filter-pruned: which original channels survive
        payload["channels"] = dict(model.kept_channels)
    return payload


def restore_model(payload: dict, source: str = "checkpoint"):
    """(model, dense_masks) from model_payload()'s dict (`source`: the file it came from, for errors)."""
    for key in ("arch", "masks", "sparse_layers", "state"):
        if key not in payload:
            raise ValueError(f"checkpoint lacks {key!r}: not a model checkpoint")
    try:
        model = build_model(**payload["arch"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint's arch {payload['arch']!r} builds no model: {e}") from None
    if payload.get("channels"):
        keep_channels_(model, payload["channels"])
    masks = payload["masks"]
    if not isinstance(masks, dict) or not all(isinstance(mk, torch.Tensor) and mk.dtype == torch.bool
                                              for mk in masks.values()):  # (sparsify_'s TypeError named no file)
        raise ValueError(f"{source}: its masks are not bool tensors by layer name: the file is damaged or not a "
                         "sparsetrain checkpoint")
    sparse = set(payload["sparse_layers"])
    layers = dict(prunable_layers(model))
    if not sparse <= set(layers):
        raise ValueError(f"checkpoint's sparse layers {sorted(sparse - set(layers))} are not layers of "
                         f"{payload['arch']!r}")
    # a sparse layer built empty takes its saved pattern from the state (load_state_dict resizes it);
    # checkpoints before 2026-12-05 hold its mask too
    sparsify_(model, {n: masks[n] if n in masks else torch.zeros_like(layers[n].weight, dtype=torch.bool)
                      for n in sparse})
    try:
        model.load_state_dict(payload["state"])
    except RuntimeError as e:  # (a damaged file without its record: a CSR index out of range, a wrong shape)
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:300]
        raise CorruptFile(f"{source}: its weights do not load into its model ({why}): the file is damaged or "
                          "not a sparsetrain checkpoint") from None
    if sparse and payload.get("fused", True):  # (as saved: an unfused model's float sums differ in order)
        fuse_(model, strict=False)  # sparse conv -> BN -> ReLU as one layer (same state_dict)
    dense_masks = {n: mk for n, mk in masks_of(model, {n: mk for n, mk in masks.items() if n not in sparse}).items()
                   if n not in sparse}  # (every dense layer's; all-True where none was stored)
    return model, dense_masks


def save_model(path: str, model, masks: dict, arch: dict, **meta) -> None:
    atomic_save({**model_payload(model, masks, arch), **meta}, path)


def load_model(path: str):
    """(model, dense_masks, payload) from a file written by save_model."""
    payload = safe_load(path)
    model, masks = restore_model(payload, path)
    return model, masks, payload
