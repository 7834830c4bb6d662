"""The auto policy's decision cache (policy._save_decision): the machine its decisions were timed on, and the
bound on its file. A decision's key names a layer's nonzeros among its geometry, input shape and machine, and
a layer is timed again at every pruning round it stays dense past MEASURE_FROM (about 28 rounds from 50% to
99.9% at rate 0.2), so each run whose nonzeros differ (global pruning: a layer's share differs per seed or
rate) added that many entries for good. Each layer (its key without the nonzeros) keeps its KEEP_PER_LAYER
newest decisions; an older one is measured again if asked for (a rerun of that old run's exact nonzeros may
then decide otherwise)."""
from __future__ import annotations

import ast
import functools
import os
import platform

import torch

from .extension import _C

__all__ = ["KEEP_PER_LAYER", "add_bounded", "machine"]

KEEP_PER_LAYER = 256  # (decisions per layer: about 9 runs of 28 measured rounds, a sweep's seeds and rates)
_NNZ = 6  # (the nonzeros' place in policy.sparse_is_faster's key tuple)


def _layer(key: str):
    """`key` without its nonzeros (the layer, input and machine it was timed on); the key itself where it
    is no such tuple (an older or edited entry: its own layer, never dropped for another's)."""
    try:
        parts = ast.literal_eval(key)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key
    if not isinstance(parts, tuple) or len(parts) <= _NNZ or not isinstance(parts[_NNZ], int):
        return key
    return parts[:_NNZ] + parts[_NNZ + 1:]


def add_bounded(merged: dict, key: str, value: bool, keep: int | None = None) -> dict:
    """`merged` (the cache file's entries, oldest first) with `key` set to `value` as the newest, less
    the oldest entries of key's layer past `keep` (None: KEEP_PER_LAYER); in place, returned."""
    keep = KEEP_PER_LAYER if keep is None else keep
    merged.pop(key, None)
    merged[key] = value
    layer = _layer(key)
    if layer == key:
        return merged
    prefix = repr(layer[:_NNZ])[:-1] + ", "  # (the text before the nonzeros: parse only keys that start so)
    same = [k for k in merged if k.startswith(prefix) and _layer(k) == layer]  # (oldest first: as written)
    for k in same[:max(0, len(same) - keep)]:
        del merged[k]
    return merged


@functools.lru_cache(maxsize=2)
def machine(cpp: bool = True) -> str:
    """The CPU (name, family and model: "AMD EPYC" alone names several generations), torch's version
    and, with `cpp` (a layer on the C++ engine, not Triton's), the C++ kernels timed: their build (the
    extension file's mtime and size: a rebuilt kernel is another speed) and SIMD width
    (SPARSETRAIN_VEC_BYTES narrows it: 1.4x slower at 16 bytes on AVX2)."""
    cpu = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("model name", "cpu family", "model"):
                    cpu.setdefault(k.strip(), v.strip())
                if len(cpu) == 3:
                    break
    except OSError:
        pass
    name = " ".join(cpu[k] for k in ("model name", "cpu family", "model") if k in cpu) or platform.machine()
    if not cpp:
        return f"{name}|torch {torch.__version__}"
    st = os.stat(_C.__file__)
    return f"{name}|torch {torch.__version__}|kernels {st.st_mtime_ns}:{st.st_size} simd {_C.simd_bytes()}"
