"""Sparse weight containers.

`CSR` stores a pruned weight viewed as a matrix whose rows are output units (linear) or output
channels (conv; columns = in_channels * kh * kw). Only the surviving weights are stored and
trained: `values` is an `nn.Parameter` of shape [nnz]. Stored: values + col (int32) + crow (int64):
8 bytes per nonzero, 2% of the dense fp32 weight at 99% sparsity. The transposed index (CSC:
`ccol_indices`, `row_indices_t`, `perm`; 12 more bytes per nonzero), which every op schema carries
for the backends that gather by input column, is built here once per sparsity pattern (at
construction and when a state_dict resizes the pattern), never per call; it is a non-persistent
buffer: it moves with `.to(device)` and is not part of the state_dict.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .args import check_weight
from .index import check_index, index_state, seal_index, seal_moved, still_unset, transpose_index
from .optim_state import mark_stale, shrink_state, watch_resized, watch_state
from .pattern import _pattern

__all__ = ["CSR", "transpose_index"]


def _check_mask(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    check_weight(weight, mask)
    if weight.dim() < 2:
        raise ValueError(f"weight must be at least 2-D ([out, ...]), got shape {tuple(weight.shape)}")
    if mask is None:
        return weight != 0
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    return mask.to(weight.device)


class WeightLike:
    """What code written for a dense layer reads of its weight (`layer.weight.dtype`, `.device`,
    `.requires_grad`) and the freezing idiom `layer.weight.requires_grad = False`: the values
    Parameter's (without the setter, that assignment left a plain attribute and the layer trained on)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def requires_grad(self) -> bool:
        return self.values.requires_grad

    @requires_grad.setter
    def requires_grad(self, flag: bool) -> None:
        self.values.requires_grad_(flag)

    def _apply(self, fn, recurse=True):
        # model.type(torch.float64) casts every tensor, the index buffers too (then refused by every op): an
        # integer tensor keeps its dtype and takes only fn's device (a round trip through fp16 would round it)
        def keep_index(t):
            out = fn(t)
            return out if t.is_floating_point() or out.dtype == t.dtype else t.to(out.device)
        if self._swapped_checked():  # (a pattern assigned by hand: transposed and sealed before the move, as a move keeps it;
            with own_mode(self.values):  # after it, to_empty()'s garbage was transposed: torch's error from inside)
                self._build_index()
        before = index_state(self)
        out = super()._apply(keep_index, recurse)
        self._index_of = (self.crow_indices, self.col_indices, self.ccol_indices)  # (.to(): the moved tensors)
        seal_moved(self, before)  # (to_empty(): UNSET, refused by name until a load; the kernels' checks said less)
        return out

    def _swapped(self) -> bool:
        """crow/col were swapped since the transposed index was built (assigned, left by functional_call), not ccol."""
        crow, col, ccol = self._index_of
        return (crow is not self.crow_indices or col is not self.col_indices) and ccol is self.ccol_indices

    def _swapped_checked(self) -> bool:
        """_swapped(), where a swapped-in pattern is checked as the constructor checks its arguments (a column
        repeated in a row: the products summed both entries while to_dense kept one, silently; one out of range:
        torch's resize warning from the transposition before the op's error)."""
        if not self._swapped():
            return False
        if not torch.compiler.is_compiling():
            try:
                _pattern(self.crow_indices, self.col_indices, self.values, self.shape, getattr(self, "block_size", 0))
            except (TypeError, ValueError) as e:
                raise type(e)(f"the {type(self).__name__} weight's pattern swapped in (a torch.func.functional_call "
                              f"state, an assigned crow_indices or col_indices): {e}") from None
        return True

    def __delattr__(self, name):
        # register_parametrization(csr, "values", p) deletes them, then fails storing p under "values" (a method
        # of its ModuleDict): the CSR was left without values (KeyError in every forward). Refused here, as
        # early as our side sees it (after a right_inverse, which torch applies to the tensor first).
        if name == "values" and name in self._parameters:  # (prune.remove deletes its plain product: fine)
            raise TypeError(f"a {type(self).__name__}'s values cannot be removed or parametrized (torch.nn.utils."
                            "parametrize cannot store a parametrization named 'values'; one with a right_inverse "
                            "has set them to right_inverse(values) already): densify_ the layer and parametrize "
                            "the dense weight, or parametrize the layer's bias")
        super().__delattr__(name)

    # (the subclass's _build_index() registers ccol_indices, row_indices_t, perm of crow/col and records
    # self._index_of = (crow_indices, col_indices, ccol_indices): the pattern they transpose)
    def unhooked(self) -> None:
        """TypeError where the weight has forward pre-hooks: torch.nn.utils.prune, weight_norm or spectral_norm on its
        values recompute them in one, which never runs (not called): stale after a step, silently, before 2026-12-08."""
        if self._forward_pre_hooks:
            raise TypeError(f"this {type(self).__name__} weight has forward pre-hooks (torch.nn.utils.prune, weight_norm "
                            "or spectral_norm on its values?), which never run: the weight is not called, so they "
                            "would leave its values stale; prune with sparsetrain.prune (global_prune), or remove them "
                            "(prune.remove) first")

    def transposed(self) -> tuple:
        """(ccol_indices, row_indices_t, perm) of the pattern now in crow/col: built anew where those alone
        were swapped in (torch.func.functional_call with another state_dict gave the old pattern's dx
        silently; torch.export swaps all of them)."""
        self.unhooked()
        if self._swapped_checked():
            with own_mode(self.values):  # (not inference tensors: a training forward saves them)
                self._build_index()
        check_index(self)  # (an EMA of the buffers wrote into them: refused by name)
        return self.ccol_indices, self.row_indices_t, self.perm

    def __setstate__(self, state):
        # torch.load(whole model) and copy.deepcopy build no CSR/BSR through __init__: register the optimizer
        # state check there too (in a fresh process a mismatched state's step gave torch's bare size error)
        super().__setstate__(state)
        if "_index_of" not in self.__dict__:  # (pickled before 2026-12-06: AttributeError in the forward)
            with own_mode(self.values):
                self._build_index()
        watch_state()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The logical shape beside the module's version in the state_dict's metadata (torch.save keeps
        # it): the saved pattern fits any weight of the same [rows, cols] view, so without it a (3, 1)
        # kernel's state loaded into a (1, 3) kernel's layer, or a linear's into a conv's (_resize_pattern).
        check_index(self, saving=True)  # (an index an EMA rewrote is not saved as if it were the pattern)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        meta = getattr(destination, "_metadata", None)
        if meta is not None and prefix[:-1] in meta:
            meta[prefix[:-1]]["shape"] = list(self.shape)


class CSR(WeightLike, nn.Module):
    """A CSR weight of logical shape `shape` (e.g. [out, in] or [out, in, kh, kw]).

    Buffers: crow_indices (int64 [rows+1]), col_indices (int32 [nnz]) and the transposed index
    (ccol_indices int64 [cols+1], row_indices_t int32 [nnz], perm int64 [nnz]; not saved).
    Parameter: values ([nnz]). `from_dense(w, mask)` and `to_dense()` round-trip exactly.
    """

    def __init__(self, crow_indices, col_indices, values, shape, *, validate: bool = True):
        super().__init__()
        self.shape, crow, col = _pattern(crow_indices, col_indices, values, shape, validate=validate)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        v = values.detach().contiguous().clone()
        # (a Parameter keeps its requires_grad; a plain tensor's values train, as nn.Parameter(tensor): they were
        # copied frozen, so the layer's weights silently never trained)
        self.values = nn.Parameter(v, requires_grad=values.requires_grad or not isinstance(values, nn.Parameter))
        self._build_index()
        watch_state()  # (optimizer state that does not fit: refused by name)

    # ------------------------------------------------------------------ construction / export
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "CSR":
        """The entries of `weight` (float, >= 2-D) where `mask` (bool, its shape; None: weight != 0) is True."""
        mask = _check_mask(weight, mask)
        rows, cols = weight.shape[0], math.prod(weight.shape[1:])
        m2 = mask.reshape(rows, cols)
        w2 = weight.detach().reshape(rows, cols)
        crow = torch.zeros(rows + 1, dtype=torch.int64, device=weight.device)
        torch.cumsum(m2.sum(1), 0, out=crow[1:])
        idx = m2.nonzero()  # row-major order: rows ascending, columns ascending
        col = idx[:, 1].to(torch.int32)
        values = w2[idx[:, 0], idx[:, 1]]
        # (a Parameter's requires_grad carries over, a frozen layer stays frozen; a plain tensor's
        # values are trainable, as nn.Parameter(tensor))
        trainable = weight.requires_grad if isinstance(weight, nn.Parameter) else True
        out = cls(crow, col, values, weight.shape, validate=False)
        out.values.requires_grad_(trainable)
        return out

    def to_dense(self) -> torch.Tensor:
        """Dense weight of `self.shape` (zeros at pruned positions); differentiable in values."""
        self._swapped_checked()
        check_index(self)  # (an EMA of the buffers: densify_ gave a pattern not its own, silently)
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        out = self.values.new_zeros(rows * cols)
        flat = self.row_indices().long() * cols + self.col_indices.long()
        return out.index_put((flat,), self.values).reshape(self.shape)

    def mask(self) -> torch.Tensor:
        """Bool mask of `self.shape`: True at the stored entries."""
        self._swapped_checked()
        check_index(self)  # (to_empty() without a load: masks_of, model_sparsity drew garbage or failed inside)
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        m = torch.zeros(rows * cols, dtype=torch.bool, device=self.values.device)
        m[self.row_indices().long() * cols + self.col_indices.long()] = True
        return m.reshape(self.shape)

    def row_indices(self) -> torch.Tensor:
        """The row of every stored entry (int64 [nnz], CSR order)."""
        rows = self.crow_indices.numel() - 1
        return torch.repeat_interleave(torch.arange(rows, device=self.crow_indices.device), self.crow_indices.diff(),
                                       output_size=self.col_indices.numel())  # (known: meta and fake tensors too)

    @torch.no_grad()
    def shrink_(self, keep: torch.Tensor) -> None:
        """Keep only the stored entries where `keep` (bool [nnz], in CSR order) is True: pruning in
        place. `values` stays the same Parameter, resized, so an optimizer holding it trains on; its
        gradient and the per-element state of the optimizers that stepped it (momentum, Adam's
        moments) shrink alike, the surviving weights keeping theirs, as in a dense masked layer."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (self.nnz,):
            raise ValueError(f"keep must be a bool tensor of shape [nnz] = [{self.nnz}], got "
                             f"{tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__}"
                             f"{' ' + str(keep.dtype) if isinstance(keep, torch.Tensor) else ''}")
        check_index(self)  # (to_empty() without a load: the garbage index failed inside, an IndexError)
        keep = keep.to(self.values.device)
        if bool(keep.all()):
            return
        with own_mode(self.values):
            self._shrink(keep)

    @torch.no_grad()  # (inference_mode(False) turns grad mode on)
    def _shrink(self, keep: torch.Tensor) -> None:
        kept = torch.zeros(self.nnz + 1, dtype=torch.int64, device=keep.device)  # kept[e]: kept entries before e
        torch.cumsum(keep, 0, out=kept[1:])
        self.crow_indices = kept[self.crow_indices]
        self.col_indices = self.col_indices[keep]
        v, old = self.values, self.values.shape
        grad = v.grad
        resize_values_(v, v.data[keep])
        if grad is not None:
            v.grad = grad[keep]
        shrink_state(v, keep, old)
        self._build_index()

    # ------------------------------------------------------------------ transposed index
    def _build_index(self) -> None:
        ccol, row_t, perm = transpose_index(self.crow_indices, self.col_indices, math.prod(self.shape[1:]))
        self.register_buffer("ccol_indices", ccol, persistent=False)
        self.register_buffer("row_indices_t", row_t, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self._index_of = (self.crow_indices, self.col_indices, ccol)  # (the pattern it transposes: transposed())
        seal_index(self)

    def csc(self):
        """(ccol_indices int64 [cols+1], row_indices_t int32 [nnz], perm int64 [nnz]): values[perm[j]]
        is the j-th entry in column-major order. Built once per sparsity pattern."""
        return self.transposed()

    def index(self) -> tuple:
        """The pattern as the op schemas take it: (crow, col, values, ccol, row_t, perm); the transposed
        index of the pattern now in crow/col (WeightLike.transposed)."""
        return (self.crow_indices, self.col_indices, self.values, *self.transposed())

    # ------------------------------------------------------------------ properties
    @property
    def nnz(self) -> int:
        """Stored (surviving) entries."""
        return self.values.numel()

    @property
    def numel_dense(self) -> int:
        """Entries of the dense weight: prod(shape)."""
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight's entries pruned: 1 - nnz / numel_dense (0 for an empty shape)."""
        n = self.numel_dense
        return 1.0 - self.nnz / n if n else 0.0

    def nbytes(self) -> int:
        """Bytes of the stored sparse weight: values + CSR indices (not the cached transpose)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.crow_indices, self.col_indices))

    def check_finite(self) -> dict:
        """Report (not reject) non-finite values: {'nan': count, 'inf': count}."""
        v = self.values.detach()
        return {"nan": int(torch.isnan(v).sum()), "inf": int(torch.isinf(v).sum())}

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, sparsity={self.sparsity:.4f}"

    # ------------------------------------------------------------------ state_dict: the pattern
    # changes size when pruned, so loading resizes the buffers (and the values parameter when the
    # saved nnz differs) to the saved pattern, checked first; dtype and device stay the layer's.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with own_mode(self.values):
            if not _resize_pattern(self, state_dict, prefix, local_metadata, error_msgs, "CSR"):
                return
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if not still_unset(self, state_dict, prefix):
                self._build_index()


def own_mode(values: torch.Tensor):
    """Inference mode as `values` was made: a trainable layer pruned or loaded under inference_mode keeps
    trainable tensors (a dense layer's copy_ does: they became inference tensors, which the next
    backward refused), a layer built under inference_mode keeps inference ones (copy_ into them needs it)."""
    return torch.inference_mode(values.is_inference())


def resize_values_(v: nn.Parameter, new: torch.Tensor) -> None:
    """`v` (a values Parameter) takes `new`'s data, of another nnz, in place (an optimizer holding it
    trains on); its gradient is dropped. Autograd's cached gradient accumulator of `v` is dropped too:
    `.data =` keeps it unless the dtype or device changes, and a graph still alive (the last step's
    `loss`) holds it, so the next backward accumulated the new nnz's gradient through a node of the
    old shape ("returned an invalid gradient"). A graph that saved `v` and was not backpropagated yet
    fails as autograd says for any in-place change (the version bump), not in the kernels' size check."""
    v.grad = None
    if v.is_inference():  # (a layer built under inference_mode: no autograd state to reset or version to bump)
        v.data = new
        return
    other = torch.float32 if new.dtype == torch.float64 else torch.float64
    v.data = new.new_empty(0, dtype=other)  # (a dtype change: set_data resets the accumulator)
    v.data = new
    torch.autograd.graph.increment_version(v)


def _resize_pattern(module: nn.Module, state_dict, prefix, local_metadata, error_msgs, kind: str) -> bool:
    """Before nn.Module loads a CSR/BSR `module`'s state: a saved pattern (all of crow_indices,
    col_indices and values, checked against the module's shape, and against the saved logical
    shape where the state_dict's metadata has it) resizes the index buffers and, for another nnz,
    the values Parameter in place (an optimizer holding it trains on). False, with the error
    recorded, when it does not fit (the module is left as it was, as a dense layer's size mismatch
    leaves it)."""
    where = prefix[:-1] or "the root"
    saved = (local_metadata or {}).get("shape")
    if saved is not None and tuple(saved) != tuple(module.shape):
        error_msgs.append(f"size mismatch for the {kind} at {where}: copying a weight of shape {tuple(saved)} from "
                          f"checkpoint, the shape in current model is {tuple(module.shape)}")
        return False
    keys = [prefix + n for n in ("crow_indices", "col_indices", "values")]
    if 0 < sum(k in state_dict for k in keys) < 3:  # (a part of a pattern would corrupt the layer)
        error_msgs.append(f"the {kind} at {where} needs all of {keys}, got only {[k for k in keys if k in state_dict]}")
        return False
    if all(k in state_dict for k in keys):
        crow, col, values = (state_dict[k] for k in keys)
        v, bs = module.values, getattr(module, "block_size", 0)
        held = (f"a BSR of {values.shape[1]}x{values.shape[2]} blocks" if values.dim() == 3 else "a CSR"
                if values.dim() == 1 else None) if isinstance(values, torch.Tensor) else None
        if held is not None and tuple(values.shape[1:]) != ((bs, bs) if bs else ()):  # (the index checks said less)
            error_msgs.append(f"the {kind} at {where}: the checkpoint holds {held} there, the layer "
                              f"{f'a BSR of {bs}x{bs} blocks' if bs else 'a CSR'}")
            return False
        try:
            _pattern(crow, *(t.to(crow.device) if isinstance(t, torch.Tensor) and isinstance(crow, torch.Tensor) else t
                             for t in (col, values)), module.shape, bs)  # (list: TypeError)
        except (TypeError, ValueError) as e:
            error_msgs.append(f"the {kind} pattern at {where} does not fit its shape {module.shape}: {e}")
            return False
        if not v.is_meta and any(t.is_meta for t in (crow, col, values)):  # (resized, then garbage: not loadable)
            error_msgs.append(f"the {kind} at {where}: the checkpoint's pattern is on the meta device (shapes without "
                              f"values), the layer on {v.device}: nothing to load")
            return False
        # (the index dtypes and the contiguous layout the kernels take, also for
        # load_state_dict(assign=True), which would put the saved tensors in the module as they are;
        # load_state_dict loads from its own copy of the dict)
        state_dict[keys[0]] = crow.to(torch.int64).contiguous()
        state_dict[keys[1]] = col.to(torch.int32).contiguous()
        state_dict[keys[2]] = values.contiguous()
        resized = values.shape != v.shape
        moved = not resized and not v.is_meta and not all(  # (a meta layer filled by assign=True: nothing to keep)
            new.shape == old.shape and torch.equal(new.to(old.device, old.dtype), old)
            for new, old in ((crow, module.crow_indices), (col, module.col_indices)))
        if resized:  # (first: the index buffers are replaced only once the values took their size)
            old = v.shape
            resize_values_(v, v.new_empty(values.shape))
            watch_resized(v, old)
            mark_stale(v)  # (its state of the old positions, should a later load bring back their nnz)
        elif moved:  # another pattern of the same nnz: the gradient and state of its old positions
            v.grad = None
            mark_stale(v)
        module.crow_indices = torch.empty(crow.shape, dtype=torch.int64, device=module.crow_indices.device)
        module.col_indices = torch.empty(col.shape, dtype=torch.int32, device=module.col_indices.device)
    return True


def _fill_dense(dense: nn.Module, weight, bias: torch.Tensor | None, training: bool) -> nn.Module:
    """`dense` (a fresh nn.Linear / nn.Conv2d) given a sparse layer's weight (a CSR or BSR: zeros where
    pruned), bias, requires_grad flags and training mode: what the layers' to_dense() return."""
    with torch.no_grad():
        dense.weight.copy_(weight.to_dense())
        if bias is not None:
            dense.bias.copy_(bias)
    dense.weight.requires_grad_(weight.values.requires_grad)
    if bias is not None:
        dense.bias.requires_grad_(bias.requires_grad)
    return dense.train(training)
