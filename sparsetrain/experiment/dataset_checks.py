"""Checks that the files loaded can be the named dataset's: train and test not swapped, no file
loaded twice (a batch copied over another), CIFAR-N labels of the right dataset. Each refuses only
what no real copy can be (the tests' tiny files of other sizes pass), with a DataError naming the files."""
from __future__ import annotations

import numbers
import re

import numpy as np

from .dataset_errors import DataError, warn_caller

__all__ = ["SIZES", "check_not_swapped", "check_distinct", "check_batch_label", "check_human_labels",
           "check_label_shape", "check_idx_labels", "official_idx", "check_pairs", "check_label_entries",
           "check_not_coarse"]

SIZES = {"mnist": (60000, 10000), "fashion-mnist": (60000, 10000),  # (training, test) images
         "cifar10": (50000, 10000), "cifar100": (50000, 10000)}


def check_pairs(name: str, x, y, split: str, files) -> None:
    """Images and labels (tensors or arrays) must agree in count: a mismatch would train on wrong pairs."""
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{name}: the {split} images ({x.shape[0]}) and labels ({y.shape[0]}) differ in count "
                        f"({', '.join(map(str, files))}): mismatched files")


def check_not_swapped(name: str, n_train: int, n_test: int, train_files, test_files) -> None:
    """The training files holding the dataset's test-set size and the test files its training-set size:
    swapped (both are loaded as given, so the run would train on the test set)."""
    n_tr, n_te = SIZES[name]
    if (n_train, n_test) == (n_te, n_tr):
        raise DataError(f"{name}: the training files ({', '.join(map(str, train_files))}) hold {n_train} images and "
                        f"the test files ({', '.join(map(str, test_files))}) {n_test}, where {name} has {n_tr} "
                        f"training and {n_te} test images: train and test files swapped")


def check_distinct(name: str, named_images) -> None:
    """[(file, uint8 array of images)]: two files holding the same (non-empty) images are one file
    copied over the other or given twice (train = test: the test accuracy measured on training images)."""
    seen = {}
    for f, x in named_images:
        x = np.ascontiguousarray(x)
        if not x.size:
            continue
        key = (x.shape, x.reshape(len(x), -1)[0].tobytes())  # (the first image: compared in full only when equal)
        for g, y in seen.get(key, []):
            if np.array_equal(x, y):
                raise DataError(f"{name}: {g} and {f} hold the same images: one file copied over the other "
                                "(or given twice); restore the original files")
        seen.setdefault(key, []).append((f, x))


# the official files' images per class (training, test): Fashion-MNIST's are balanced, MNIST's not (a hint
# only: a rebalanced MNIST of 6000 / 1000 per class has Fashion-MNIST's; the official files' md5s tell them apart)
IDX_COUNTS = {"mnist": ((5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
                        (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)),
              "fashion-mnist": ((6000,) * 10, (1000,) * 10)}
IDX_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # (torchvision's, whose resources list the md5s)


def official_idx(name: str, path) -> bool:
    """Whether the IDX label file at `path` is `name`'s official one: its .gz (or, for a file torchvision
    extracted, the .gz beside it holding the same bytes) has the md5 torchvision's `resources` list."""
    import gzip
    import hashlib
    from pathlib import Path

    import torchvision.datasets
    path = Path(path)
    stem = path.name.split("-labels")[0]  # train, t10k
    md5s = {m for f, m in getattr(getattr(torchvision.datasets, IDX_CLASSES[name]), "resources", ())
            if f.startswith(f"{stem}-labels")}
    gz = path if path.name.endswith(".gz") else Path(f"{path}.gz")
    try:
        packed = gz.read_bytes()
        if hashlib.md5(packed).hexdigest() not in md5s:
            return False
        return gz == path or gzip.decompress(packed) == path.read_bytes()
    except (OSError, EOFError, ValueError):  # (no .gz beside it, or a damaged one: not known as official)
        return False


def check_idx_labels(name: str, y_train, y_test, train_file, test_file) -> None:
    """MNIST's or Fashion-MNIST's label files (int arrays): the other dataset's official files (by md5) are a
    DataError, that dataset's files placed under the folder of this one; files of its class counts whose md5
    is unknown (an uncompressed copy, a rebalanced MNIST) load as `name`, with a warning saying so."""
    other, alike = "fashion-mnist" if name == "mnist" else "mnist", []
    for y, f, counts in ((y_train, train_file, IDX_COUNTS[other][0]), (y_test, test_file, IDX_COUNTS[other][1])):
        if official_idx(other, f):
            raise DataError(f"{name}: {f} holds {other}'s labels (it is {other}'s official file, by torchvision's "
                            f"md5): {other}'s files, which have {name}'s names, in {name}'s place; move them into "
                            f"DATA_DIR/{other}/")
        if len(y) == sum(counts) and tuple(np.bincount(y, minlength=10).tolist()) == counts:
            alike.append(f"{f} ({', '.join(map(str, counts))})")
    if alike:
        warn_caller(f"{name}: the images per class of {' and '.join(alike)} are exactly those of {other}'s official "
                    f"files; loaded as {name}, as asked (they are not {other}'s official files by md5, or have no "
                    f".gz to tell); if they are {other}'s, move them into DATA_DIR/{other}/")


_BATCH_LABEL = re.compile(r"(training|testing) batch (\d+) of (\d+)")


def check_batch_label(path, d: dict, expected: str) -> None:
    """A CIFAR batch's own 'batch_label' (the official files': "training batch 2 of 5", "testing batch 1
    of 1") must be the one of the file name it is read under: another is a batch renamed or swapped
    (test_batch as a training batch). Batches without such a label (other writers) are not checked."""
    label = d.get("batch_label")
    label = label.decode("latin1") if isinstance(label, bytes) else label
    if isinstance(label, str) and _BATCH_LABEL.fullmatch(label.strip()) and label.strip() != expected:
        raise DataError(f"{path}: its batch_label is {label.strip()!r}, where {path.name} is {expected!r}: "
                        "batches renamed or swapped (train and test?); restore the original files")


def check_human_labels(path, labels, y_clean) -> None:
    """CIFAR-100 human labels (int arrays) all in 0..9 while at least 10 of the images they label are of
    classes 10..99: not one of those kept its class, which no CIFAR-100 annotation does (CIFAR-100N's
    labels agree with the originals for ~60% of the images): a 10-class file (CIFAR-10N's) given instead."""
    above = int((y_clean >= 10).sum())
    if labels.size and int(labels.max()) < 10 and above >= 10:
        raise DataError(f"--label-file {path}: every label lies in 0..9, where {above} of the CIFAR-100 training "
                        "images are of classes 10..99 and none kept its class: a 10-class file (CIFAR-10N's?), "
                        "not CIFAR-100's human labels (CIFAR-100_human.pt)")


def check_label_shape(path, labels, n: int):
    """CIFAR-N labels as [N] (one per training image in file order), or a [N, 1] / [1, N] column or row;
    any other table ([2, 25000], [25000, 2]) flattened would pair labels with other images (its row
    order unknown). Returns them flattened."""
    shape = np.shape(labels)
    if sum(d != 1 for d in shape) > 1:
        raise DataError(f"--label-file {path} must hold one label per training image, shape [{n}] (or a [{n}, 1] "
                        f"column), got shape {list(shape)}: flattened, its labels would pair with other images")
    return np.reshape(labels, -1)


def check_label_entries(path, key: str, labels) -> None:
    """A CIFAR batch's labels (`key`: 'labels' / 'fine_labels'; a list, tuple or 1-D array) or a CIFAR-N file's
    ('noisy_label') must be ints, numpy's included: a bool (np.asarray([True, 3]) is int64: True loaded as label
    1), a float (3.0) or any other object is a DataError naming the file, the key and the first such entry (index,
    value). Other shapes: the reader's check."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or not labels.size or labels.dtype.kind in "iu":
            return
        entries = labels if labels.dtype == object else labels[:1]  # (a bool, float or str array: every entry)
    elif isinstance(labels, (list, tuple)):  # (a [N, 1] column of lists, which a CIFAR-N file may be: its entries)
        nested = labels and isinstance(labels[0], (list, tuple))
        entries = [v for row in labels for v in (row if isinstance(row, (list, tuple)) else [row])] if nested else labels
    else:
        return
    bad = next((i for i, v in enumerate(entries) if type(v) is not int and (  # (int: the official files', fast)
        isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral))), None)
    if bad is not None:
        v = entries[bad]
        raise DataError(f"{path}: '{key}' must hold integer labels, got entry {bad}: {v!r} ({type(v).__name__})")


def check_not_coarse(path, fine, coarse, min_images: int = 100) -> None:
    """A CIFAR-100 batch's 'fine_labels' (an int array) equal element-wise to its 'coarse_labels' (any, or None
    where absent): the 20 superclasses written under the fine key by a broken converter, which loaded as a
    20-class-in-100 dataset. Official files differ (coarse_labels[i] is fine_labels[i]'s superclass); a file of
    at most `min_images` images may agree by chance (all its labels 0), so is not refused."""
    if coarse is None:
        return
    try:
        coarse = np.asarray(coarse)
    except (ValueError, TypeError):  # (a ragged list: not labels to compare)
        return
    if len(fine) > min_images and coarse.shape == fine.shape and np.array_equal(fine, coarse):
        raise DataError(f"{path}: its 'fine_labels' equal its 'coarse_labels' for all {len(fine)} images (all in "
                        f"{int(fine.min())}..{int(fine.max())}): the 20 superclasses written under the fine key (a broken "
                        "converter); restore the original file")
