"""Every expected user error of `python -m sparsetrain.experiment` is one line naming the argument or
the file, exit code 2, no traceback; each case runs in its own process, as a user would run it.

The data cases write tiny, broken copies of the real formats (IDX, CIFAR pickles, CIFAR-N labels).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsetrain.testing import write_cifar, write_mnist

import cli_forks

STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _mnist(root, gz=False):
    d = root / "data" / "mnist"
    write_mnist(d, gz=gz, n_train=40, n_test=10)
    return d


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])


# each case: (argv after the dataset, a setup(root) writing files, text the error line must contain)
def _truncated_images(root):
    _truncate(_mnist(root) / STEMS[0], -100)


def _truncated_labels(root):
    _truncate(_mnist(root) / STEMS[1], -3)


def _ten_byte_images(root):
    (_mnist(root) / STEMS[0]).write_bytes(b"\0\0\x08\x03\0\0\0\x28\0\0")


def _truncated_gz(root):
    p = _mnist(root, gz=True) / (STEMS[0] + ".gz")
    _truncate(p, len(p.read_bytes()) // 2)


def _damaged_gz(root):  # (its deflate stream, not its CRC: zlib.error, not BadGzipFile)
    p = _mnist(root, gz=True) / (STEMS[0] + ".gz")
    b = bytearray(p.read_bytes())
    for i in range(40, len(b) - 20, 50):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _bad_magic(root):
    p = _mnist(root) / STEMS[2]
    p.write_bytes(b"PK\3\4" + p.read_bytes()[4:])


def _swapped_labels(root):  # train images (40) with the test labels (10)
    d = _mnist(root)
    shutil.copy(d / STEMS[3], d / STEMS[1])


def _cifar100(root):
    write_cifar(root / "data", c10=False, n_per_batch=20, n_test=5)


def _garbage_label_file(root):
    _cifar100(root)
    (root / "labels.pt").write_bytes(b"certainly not a torch file")


def _short_label_file(root):
    _cifar100(root)
    np.save(root / "labels.npy", np.zeros(7, dtype=np.int64))


def _out_is_a_file(root):
    _mnist(root)
    (root / "outfile").write_text("x")


def _corrupt_config(root):
    _mnist(root)
    rd = _run_dir(root)
    rd.mkdir(parents=True)
    (rd / "config.json").write_text("{ not json")


def _truncated_state(root):
    import dataclasses
    from sparsetrain.experiment.config import config_from_args
    from sparsetrain.experiment.study import load_splits
    _mnist(root)
    # the run's settings and data fingerprint (a state without either is refused first), without where it computed
    # (this process's thread count would make the run's resume print a note: two lines)
    config = config_from_args(_argv(root))[0]
    cfg, fingerprint = dataclasses.asdict(config), load_splits(config, config.seeds[0]).fingerprint
    pd = _run_dir(root) / "seed0" / "teacher"
    pd.mkdir(parents=True)
    (_run_dir(root) / "config.json").write_text(json.dumps({**cfg, "student": cfg["model"],
                                                            "data_fingerprint": fingerprint}))
    torch.save({"format": "sparsetrain-ckpt-v1"}, pd / "state.pt")
    _truncate(pd / "state.pt", 40)


def _different_config(root):
    import dataclasses
    from sparsetrain.experiment.config import config_from_args
    _mnist(root)
    rd = _run_dir(root)
    rd.mkdir(parents=True)
    cfg = dataclasses.asdict(config_from_args(_argv(root))[0])  # (what --print-config prints)
    (rd / "config.json").write_text(json.dumps({**cfg, "student": cfg["model"], "alpha": 0.5}))


_HELD = []  # lock files held by this process while the cases run


@pytest.fixture(scope="module", autouse=True)
def _release_held():  # (closed after the module: left to exit, each was a ResourceWarning at the end of make test)
    yield
    while _HELD:
        _HELD.pop().close()


def _run_in_use(root):  # another process (this one) is running the same run
    import fcntl
    _mnist(root)
    rd = _run_dir(root)
    rd.mkdir(parents=True)
    f = open(rd / ".lock", "w")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    f.write(str(os.getpid()))
    f.flush()
    _HELD.append(f)


def _run_dir(root):  # (the run_dir --print-config prints)
    from pathlib import Path
    from sparsetrain.experiment.config import config_from_args
    from sparsetrain.experiment.study import run_dir_of
    return Path(run_dir_of(config_from_args(_argv(root))[0]))


BASE = ["--profile", "quick", "--subset", "0", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--no-download"]


def _argv(root, *argv, dataset="mnist"):
    return [dataset, "--data-dir", str(root / "data"), "--out", str(root / "runs"), *BASE, *argv]


def _cli(root, *argv, dataset="mnist"):
    args = [sys.executable, "-m", "sparsetrain.experiment", *_argv(root, *argv, dataset=dataset)]
    return subprocess.run(args, capture_output=True, text=True, cwd=root, timeout=120)


CASES = [
    # data files
    ("truncated-images", "mnist", [], _truncated_images, "train-images-idx3-ubyte: the header describes"),
    ("truncated-labels", "mnist", [], _truncated_labels, "train-labels-idx1-ubyte: the header describes"),
    ("10-byte-images", "mnist", [], _ten_byte_images, "train-images-idx3-ubyte"),
    ("truncated-gz", "mnist", [], _truncated_gz, "train-images-idx3-ubyte.gz: cannot be read"),
    ("damaged-gz", "mnist", [], _damaged_gz, "train-images-idx3-ubyte.gz: cannot be read"),
    ("bad-magic", "mnist", [], _bad_magic, "t10k-images-idx3-ubyte is not an IDX file"),
    ("images-labels-count", "mnist", [], _swapped_labels, "the train images (40) and labels (10) differ"),
    ("cifar100n-eps", "cifar100n", ["--eps", "0.2"], _cifar100, "--eps must be 0 for cifar100n"),
    ("cifar100n-garbage-labels", "cifar100n", ["--label-file", "labels.pt"], _garbage_label_file,
     "--label-file labels.pt: not a torch.save file of labels (UnpicklingError: Unsupported global"),
    ("cifar100n-short-labels", "cifar100n", ["--label-file", "labels.npy"], _short_label_file,
     "--label-file labels.npy must hold 20 labels"),
    # the run directory
    ("out-read-only", "mnist", ["--out", "/proc/sparsetrain-runs"], _mnist, "--out /proc/sparsetrain-runs: cannot write"),
    ("out-is-a-file", "mnist", ["--out", "outfile"], _out_is_a_file, "--out outfile is a file"),
    ("corrupt-config", "mnist", [], _corrupt_config, "config.json is corrupt"),
    ("truncated-state", "mnist", [], _truncated_state, "delete it and its .sha256 record to restart this phase"),
    ("different-config", "mnist", [], _different_config, "holds a run with different settings (alpha); choose "
     "another --out, or move it aside (its trained phases are kept there)"),
    ("run-in-use", "mnist", [], _run_in_use, f"is in use by another process (pid {os.getpid()})"),
    ("report-only-missing", "mnist", ["--report-only"], _mnist, "--report-only: no run to report"),
    ("resume-missing", "mnist", ["--resume"], _mnist, "--resume: no run to resume"),
    ("teachers-missing-path", "mnist", ["--teachers", "nope.pt"], _mnist, "--teachers nope.pt: no such file"),
    # arguments
    ("lr", "mnist", ["--lr", "-1"], None, "--lr must be > 0"),
    ("student-lr", "mnist", ["--student-lr", "0"], None, "--student-lr must be > 0"),
    ("subset", "mnist", ["--subset", "-5"], None, "--subset must be >= 0"),
    ("val-fraction", "mnist", ["--val-fraction", "1.5"], None, "--val-fraction must be in (0, 1)"),
    ("batch-above-split", "mnist", ["--batch-size", "100"], _mnist,
     "--teacher-batch-size 100 is larger than the 36 training images"),
    ("one-training-image", "mnist", ["--subset", "2", "--val-fraction", "0.5"], _mnist,
     "1 training image(s) after the validation split: the study needs at least 2"),
    ("threads", "mnist", ["--threads", "-1"], None, "--threads must be in [0, 4096]"),
    ("out-empty", "mnist", ["--out", ""], None, "--out must be a folder path (the runs' root), not empty"),
    ("data-dir-empty", "mnist", ["--data-dir", ""], _mnist, "--data-dir must be a folder path, not empty"),
    ("resume-and-report", "mnist", ["--resume", "--report-only"], None,
     "argument --report-only: not allowed with argument --resume"),
    ("report-and-print", "mnist", ["--report-only", "--print-config"], None,
     "argument --print-config: not allowed with argument --report-only"),
    ("seeds", "mnist", ["--seeds", "-1"], None, "--seeds must be one or more distinct seeds in [0, 2^32)"),
    ("model", "mnist", ["--model", "vgg_d0g0"], None, "--model: model 'vgg_d0g0': VGG-like needs delta >= 1"),
    ("dataset", "mnist", ["--early-stop", "sometimes"], None, "argument --early-stop: invalid choice"),
    ("device", "mnist", ["--device", "tpu"], None, "--device must be auto, cpu, cuda or cuda:N"),
]


if not torch.cuda.is_available():  # the machine has no GPU: asking for one is a user error
    CASES.append(("device-cuda", "mnist", ["--device", "cuda"], None, "--device cuda: no CUDA device is available"))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case's files written, then each case's process, two at a time, forked from one that
    imported torch, torchvision and the study once (tests/cli_forks.py: the interpreter and imports were ~3 s of
    each ~4 s process; torchvision, which the run directory's version record imports, ~1.3 s of each child
    that got that far); the Ctrl-C and cifar100n-defaults tests below start fresh processes."""
    roots = {}
    for name, _, _, setup, _ in CASES:
        roots[name] = tmp_path_factory.mktemp(name)
        if setup is not None:
            setup(roots[name])
    results = cli_forks.run("sparsetrain.experiment", [(roots[name], _argv(roots[name], *argv, dataset=dataset))
                                                       for name, dataset, argv, _, _ in CASES],
                            preload=["sparsetrain.experiment.study", "torchvision"])
    return {c[0]: (roots[c[0]], out) for c, out in zip(CASES, results)}


@pytest.mark.parametrize("name,message", [(c[0], c[4]) for c in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(outcomes, name, message):
    root, out = outcomes[name]
    err = out.stderr.strip()
    assert out.returncode == (75 if name == "run-in-use" else 2), (out.returncode, err[-2000:])  # (75: a sweep waits)
    assert "Traceback" not in out.stderr
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    if name == "teachers-missing-path":  # refused before any training
        assert not any(root.glob("runs/*/seed0/teacher/ckpt/*.pt"))
    if name in ("teachers-missing-path", "truncated-images", "batch-above-split", "one-training-image"):
        # refused before anything ran (the last three once the data is read): no config.json is left
        # behind for --resume or --report-only to take for a run
        assert not any(root.glob("runs/*/config.json"))
    if name in ("corrupt-config", "truncated-state", "different-config", "run-in-use"):  # (a run directory with files)
        assert _run_dir(root).is_dir()
    else:  # refused before anything was written: no empty run directory (its .lock alone) is left behind,
        # nor the --out folder it made (before 2026-12-06 an empty runs/ was left)
        assert not (root / "runs").exists(), list(root.glob("runs/*/*"))


def test_cifar100n_defaults_to_no_added_noise(tmp_path):
    out = _cli(tmp_path, "--print-config", dataset="cifar100n")
    assert out.returncode == 0 and json.loads(out.stdout)["config"]["eps"] == 0.0


def test_gz_idx_reads_and_changed_data_refused(tmp_path):
    """A finished run re-run on other data (another --data-dir) refuses instead of reusing results."""
    write_mnist(tmp_path / "data" / "mnist", gz=True, n_train=40, n_test=10)
    argv = ["--wall", "0.3", "--batch-size", "16", "--teachers", "dense"]
    other = tmp_path / "other"
    write_mnist(other / "data" / "mnist", gz=False, n_train=40, n_test=10, seed=1)
    again = _argv(tmp_path, *argv, "--data-dir", str(other / "data"))  # (the last --data-dir counts)
    first, same, changed = cli_forks.run("sparsetrain.experiment", [(tmp_path, _argv(tmp_path, *argv))] * 2
                                         + [(tmp_path, again)], preload=["sparsetrain.experiment.study", "torchvision"], jobs=1)
    assert first.returncode == 0 and same.returncode == 0, (first.stderr, same.stderr)  # same data: found finished
    assert changed.returncode == 2 and "was trained on other data" in changed.stderr, changed.stderr
    assert "Traceback" not in changed.stderr
    assert os.path.isdir(tmp_path / "runs")


# Ctrl-C while `python -m` still imports torch (the first seconds): SIGINT arrives while the module
# that loads it is imported, inside a weakref callback (where an import lock's callback runs; Python
# ignores what such a callback raises, and the run went on: 1 of ~25 early Ctrl-Cs), or as a
# KeyboardInterrupt raised by the import itself
_INTERRUPT_IMPORT = """
import builtins, os, runpy, signal, sys, time, weakref
real, how = builtins.__import__, sys.argv.pop(1)
class Lock:
    pass
def imp(name, globals=None, locals=None, fromlist=(), level=0):
    if level and name in ("study", "cli"):
        if how == "raise":
            raise KeyboardInterrupt
        lock = Lock()
        ref = weakref.ref(lock, lambda r: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
        del lock
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = imp
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("how", ["signal", "raise"])
@pytest.mark.parametrize("module, argv, what", [("sparsetrain.experiment", ["mnist", "--profile", "quick"], "run"),
                                                ("sparsetrain.sweep", ["grid", "--dry-run"], "sweep")])
def test_ctrl_c_while_loading_is_one_line(tmp_path, module, argv, what, how):
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IMPORT, how, module, *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"interrupted before the {what} started: nothing was written"]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module, argv", [("sparsetrain.experiment", ["mnist", "--profile", "quick", "--print-config"]),
                                          ("sparsetrain.sweep", ["grid", "--dataset", "mnist", "--dry-run"])])
def test_a_process_started_with_sigint_ignored_keeps_ignoring_it_while_loading(tmp_path, module, argv):
    """A shell's background job starts with SIGINT ignored (the terminal's Ctrl-C reaches its process group): it died
    of a SIGINT while loading, its handler installed over SIG_IGN, and ignored one once training (before 2026-12-07).
    The SIGINT of _INTERRUPT_IMPORT's import is ignored now: the command runs to its end."""
    proc = subprocess.run([sys.executable, "-c", _INTERRUPT_IMPORT, "signal", module, *argv, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" not in proc.stderr and proc.stdout.strip(), (proc.stdout, proc.stderr)


def test_print_config_into_a_closed_pipe_is_quiet(tmp_path):
    """`--print-config | head -1`: the reader leaves before the JSON is written; no BrokenPipeError
    traceback (the command did what was asked), exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "sparsetrain.experiment", *_argv(tmp_path), "--print-config"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


@pytest.mark.parametrize("argv, noted", [
    (["--block", "16"], ["--block 16 has no effect: it is the tile side of --structure block, and this run prunes "
                         "unstructured; it still names the run"]),
    (["--structure", "block", "--block", "16"], []),
    (["--rewind-iter", "5"], ["--rewind-iter 5 has no effect: only --perturb rewind reads it, and this run's is none"]),
    (["--student-rewind-iter", "5", "--perturb", "reinit"], ["--student-rewind-iter 5 has no effect"]),
    (["--perturb", "rewind", "--rewind-iter", "5"], []),
    (["--eps", "0", "--noise", "uniform", "--clean-val"], ["--noise uniform has no effect", "--clean-val has no effect"]),
    (["--eps", "0.1", "--noise", "uniform", "--clean-val"], []),
    (["--alpha", "0", "--tau", "4"], ["--tau 4.0 has no effect: it is the temperature of Eq. 2's distillation term"]),
    (["--alpha", "0", "--tau", "10"], []),  # (the default: nothing given away from it)
    (["--model", "vgg_like", "--structure", "filter", "--scope", "layer", "--engine", "sparse"],
     ["--scope layer has no effect", "--engine sparse has no effect: --structure filter trains dense masked layers"]),
    # --epochs alone keeps the preset's milestones (quick: 15 22); those at or past the epochs were silent
    (["--epochs", "4"], ["the teacher and student runs' milestone(s) 15 22 (--profile's) at or past their 4 epochs "
                         "never lower the LR; give --milestones (or --teacher-/--student-milestones) below the epochs"]),
    (["--teacher-epochs", "20"], ["the teacher run's milestone(s) 22 (--profile's) at or past their 20 epochs never"]),
    (["--epochs", "4", "--milestones", "2"], []),
    (["--epochs", "30"], []),
])
def test_settings_the_run_ignores_are_noted(tmp_path, argv, noted):
    """A flag the configuration never reads (given away from its preset) gets one stderr note and the
    run goes on (the sweep refuses such an axis: twin points); those it reads get none."""
    from sparsetrain.experiment.config import config_from_args, notes
    lines = notes(*config_from_args(_argv(tmp_path, *argv)))
    assert len(lines) == len(noted) and all(line.startswith(n) for line, n in zip(lines, noted)), lines


def test_the_wall_note_of_a_block_run_allows_a_smaller_first_round(tmp_path):
    """The note "--wall at or below --rate: only the dense round 0 trains" compared against the nominal first
    round; a block round prunes floor(rate * tiles) of tiles of several sizes, and the wall takes its actual
    sparsity (rule.next_sparsity): LeNet-300-100 at --block 32 --rate 0.2 whose partial edge tiles are the weakest
    prunes under 19%, so under --wall 0.19 round 1 trains, which the note denied. A block run's note says so;
    an unstructured one's is as before."""
    from sparsetrain.experiment.config import config_from_args, notes
    from sparsetrain.experiment.models import build_model
    from sparsetrain.prune import make_rule
    from sparsetrain.engine.nn import weight_count
    torch.manual_seed(0)
    model = build_model("lenet300", num_classes=10, in_channels=1, image_size=28)
    with torch.no_grad():  # (the partial 32-tiles at the right and bottom edges the smallest: few weights each)
        for layer in (model.fc1, model.fc2, model.fc3):
            rows, cols = layer.weight.shape
            layer.weight[rows - rows % 32:] *= 0.01
            layer.weight[:, cols - cols % 32:] *= 0.01
    first = make_rule("block", block=32).next_sparsity(model, {}, 0.2, 0.0, weight_count(model))
    assert first < 0.19  # (round 1 trains: the wall is above it)
    wall = ["--model", "lenet300", "--student", "lenet300", "--rate", "0.2", "--wall", "0.19"]
    said = "--wall 0.19 is at or below the first pruned round's sparsity (--rate 0.2): only the dense round 0 trains"
    assert notes(*config_from_args(_argv(tmp_path, *wall))) == [said]
    assert notes(*config_from_args(_argv(tmp_path, *wall, "--structure", "block", "--block", "32"))) == \
        [said + ", unless a block round prunes less"]


def test_ignored_setting_note_reaches_stderr(tmp_path):
    out = _cli(tmp_path, "--block", "64", "--print-config")
    assert out.returncode == 0 and json.loads(out.stdout)["config"]["block"] == 64
    assert out.stderr.startswith("note: --block 64 has no effect") and len(out.stderr.splitlines()) == 1


@pytest.mark.parametrize("change, error, message", [
    ({"rate": "0.2"}, TypeError, "--rate must be a number, got str '0.2'"),
    ({"seeds": 3}, TypeError, "--seeds must be a tuple of whole numbers (ints), got 3"),
    ({"teachers": "best"}, TypeError, "--teachers must be a tuple of strs, got 'best'"),  # (4 distinct letters)
    ({"teacher_milestones": [80.0]}, TypeError, "--teacher-milestones must be a tuple of whole numbers (ints)"),
    ({"student_epochs": 2.5}, TypeError, "--student-epochs must be a whole number (int), got float 2.5"),
    ({"clean_val": "no"}, TypeError, "--clean-val must be True or False, got str 'no'"),
    ({"out": None}, TypeError, "--out must be a str, got NoneType None"),
    ({"rate": 1.5}, ValueError, "--rate must be in (0, 1), got 1.5"),
    ({"seeds": (0, 0)}, ValueError, "--seeds must be one or more distinct seeds"),
])
def test_a_config_built_in_python_is_checked_as_the_cli(tmp_path, change, error, message):
    """Config(...) / dataclasses.replace with a wrong-typed or out-of-range field: validate and
    run_study refuse it naming the flag, as the CLI (run_study did not validate: rate 1.5 ran, and
    teachers='best' distilled from the paths 'b', 'e', 's', 't'), before anything is written."""
    import dataclasses
    from sparsetrain.experiment.config import Config, validate
    from sparsetrain.experiment.study import run_study
    cfg = dataclasses.replace(Config(dataset="mnist", data_dir=str(tmp_path / "data"), out=str(tmp_path / "runs"),
                                     no_download=True, device="cpu", threads=1), **change)
    for call in (validate, run_study):
        with pytest.raises(error) as e:
            call(cfg)
        assert message in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "runs")


def test_config_for_resolves_the_profile_as_the_cli_does(tmp_path):
    """`Config(dataset="fashion-mnist", profile="quick")` is the dataclass: the paper profile's CIFAR defaults (a
    ResNet-18 for 160 epochs in a run named `...-quick-resnet18-...`), so a study built in Python had no way to get
    the command's presets. `config_for` resolves them as the command does, both-roles keys included."""
    from sparsetrain.experiment import config_for
    from sparsetrain.experiment.config import config_from_args
    from sparsetrain.experiment.study import run_dir_of
    out = str(tmp_path)
    cli = config_from_args(["fashion-mnist", "--profile", "quick", "--out", out])[0]
    assert config_for("fashion-mnist", profile="quick", out=out) == cli and cli.model == "lenet300"
    assert run_dir_of(config_for("fashion-mnist", profile="quick", out=out)) == run_dir_of(cli)
    cli = config_from_args(["mnist", "--profile", "quick", "--epochs", "4", "--milestones", "2", "--teacher-lr",
                            "0.05", "--student", "vgg_like", "--out", out])[0]
    assert config_for("mnist", profile="quick", epochs=4, milestones=(2,), teacher_lr=0.05, student="vgg_like",
                      out=out) == cli
    assert config_for("cifar10") == config_from_args(["cifar10"])[0]
    for kw, error, message in [({"epochs": 0}, ValueError, "--epochs must be in [1, 1000]"),
                               ({"milestones": (9,), "epochs": 4}, ValueError, "--milestones must be epochs in [1, 4)"),
                               ({"epochz": 3}, TypeError, "unexpected keyword argument 'epochz'"),
                               ({"rate": "0.2"}, TypeError, "--rate must be"),
                               ({"profile": "quik"}, ValueError, "quik")]:
        with pytest.raises(error) as e:
            config_for("mnist", **{"profile": "quick", **kw})
        assert message in str(e.value), (kw, str(e.value))


def test_one_value_spelt_in_python_names_one_run(tmp_path):
    """1 and 1.0, a list and a tuple, numpy numbers, a Path: the value the CLI parses, so the same
    run directory (the name hashes the settings' JSON: 4 and 4.0 named two runs, a numpy seed none)."""
    import pathlib
    from sparsetrain.experiment.config import Config, config_from_args
    from sparsetrain.experiment.study import run_dir_of
    cli = config_from_args(["mnist", "--tau", "4", "--lr", "1", "--milestones", "5", "8", "--seeds", "3",
                            "--out", str(tmp_path)])[0]
    spelt = Config(**{**{k: getattr(cli, k) for k in cli.__dataclass_fields__}, "tau": 4, "teacher_lr": np.int64(1),
                      "student_lr": np.float32(1), "teacher_milestones": [5, 8], "student_milestones": [np.int64(5), 8],
                      "seeds": [np.int64(3)], "out": pathlib.Path(tmp_path)})
    assert spelt == cli and run_dir_of(spelt) == run_dir_of(cli)
    assert type(spelt.tau) is float and type(spelt.seeds[0]) is int and type(spelt.out) is str


def test_a_numpy_float32_names_the_run_of_the_float_it_spells(tmp_path):
    """np.float32(0.1) is 0.10000000149011612 as a float: it named another run than 0.1 (the same training
    after a round trip through a float32 array: a resume missed it, and trained on that lr); it names, and
    trains on, the value its shortest repr spells, as the CLI parses it (float64 and ints unchanged)."""
    from sparsetrain.experiment.config import Config, config_from_args
    from sparsetrain.experiment.study import run_dir_of
    cli = config_from_args(["mnist", "--eps", "0.1", "--lr", "0.1", "--alpha", "0.7", "--tau", "3",
                            "--out", str(tmp_path)])[0]
    fields = {k: getattr(cli, k) for k in cli.__dataclass_fields__}
    for cast in (np.float32, np.float16, np.float64, float):
        spelt = Config(**{**fields, "eps": cast(0.1), "teacher_lr": cast(0.1), "student_lr": cast(0.1),
                          "alpha": cast(0.7), "tau": cast(3)})
        assert spelt == cli and run_dir_of(spelt) == run_dir_of(cli), cast
        assert type(spelt.student_lr) is float and spelt.student_lr == 0.1 and spelt.tau == 3.0
    assert Config(**{**fields, "alpha": np.float32(np.float32(1) / 3)}).alpha == float(str(np.float32(1) / 3))


def test_resume_with_changed_settings_names_what_differs(tmp_path):
    """--resume (and --report-only) with a setting changed finds no run (the settings name it): the
    message names the settings the nearest run in --out differs in, not only its directory."""
    import dataclasses
    from sparsetrain.experiment.config import config_from_args
    from sparsetrain.experiment.study import run_dir_of
    _mnist(tmp_path)
    for argv in (["--wall", "0.5"], ["--wall", "0.5", "--lr", "0.2", "--model", "vgg_d1g1"]):  # (the nearest: one change)
        cfg = config_from_args(_argv(tmp_path, *argv))[0]
        os.makedirs(run_dir_of(cfg))
        with open(os.path.join(run_dir_of(cfg), "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "student": cfg.resolved_student()}, f)
    out = _cli(tmp_path, "--resume", "--amp", "off")
    err = out.stderr.strip()
    assert out.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    nearest = os.path.basename(run_dir_of(config_from_args(_argv(tmp_path, "--wall", "0.5"))[0]))
    assert err.endswith(f"; the nearest, {nearest}, differs in --amp (auto there, off here), "
                        "--wall (0.5 there, 0.996 here)"), err


@pytest.mark.parametrize("dataset, noted", [("flowers102", ["--val-fraction 0.3 has no effect: flowers102 keeps its "
                                                             "official validation split; it still names the run"]),
                                            ("mnist", [])])
def test_val_fraction_on_flowers102_is_noted(tmp_path, dataset, noted):
    """flowers102 keeps its official validation split (data.load_dataset): --val-fraction was silent there."""
    from sparsetrain.experiment.config import config_from_args, notes
    assert notes(*config_from_args(_argv(tmp_path, "--val-fraction", "0.3", dataset=dataset))) == noted


def test_out_expands_a_leading_tilde(tmp_path, monkeypatch, capsys):
    """`--out=~/runs` (no shell expands a ~ after '='), or a Config built in Python with out="~/runs", wrote
    the run into a folder named `~` in the working directory; the ~ is the home folder now, as --data-dir's."""
    import dataclasses

    from sparsetrain.experiment import study
    from sparsetrain.experiment.config import config_from_args, validate
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    cfg, _ = config_from_args(["mnist", "--profile", "quick", "--out=~/runs"])
    assert cfg.out == str(home / "runs") and study.run_dir_of(cfg).startswith(str(home / "runs") + os.sep)
    built = dataclasses.replace(cfg, out="~/other")
    validate(built)  # (run_study's check)
    assert built.out == str(home / "other")
    assert study.main(["mnist", "--profile", "quick", "--out=~/runs", "--report-only"]) == 2
    assert f"no run to report in {home / 'runs'}{os.sep}" in capsys.readouterr().err
    assert not (tmp_path / "~").exists()


def test_reuse_and_teacher_paths_expand_a_leading_tilde(tmp_path, monkeypatch):
    """`--reuse=~/runs/x` and `--teachers=~/t.pt` (no shell expands a ~ after '=') were looked up in a
    folder named `~` here (no teacher: "no such file"); their ~ is the home folder now, as --out's."""
    from sparsetrain.experiment.config import Config, config_from_args
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    cfg, _ = config_from_args(["mnist", "--profile", "quick", "--reuse=~/runs/x", "--teachers", "best", "~/t.pt"])
    assert cfg.reuse == (str(home / "runs" / "x"),) and cfg.teachers == ("best", str(home / "t.pt"))
    built = Config(dataset="mnist", reuse=["~/a"], teachers=("dense", "~/b.pt"))
    assert built.reuse == (str(home / "a"),) and built.teachers == ("dense", str(home / "b.pt"))


@pytest.mark.parametrize("cli", ["sparsetrain.experiment.config", "sparsetrain.sweep.cli"])
def test_version_prints_the_package_and_library_versions(cli, capsys):
    """--version (there was none: the experiment said "the following arguments are required: dataset")
    prints sparsetrain's version, pyproject.toml's, and the libraries' a run records (torchvision's from its
    package metadata, not imported at every start: without torchvision.__version__'s local "+cu130"); exit 0."""
    import importlib
    import importlib.metadata
    import re
    import sparsetrain
    with pytest.raises(SystemExit) as e:
        importlib.import_module(cli).build_parser().parse_args(["--version"])
    assert e.value.code == 0
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == sparsetrain.__version__
    assert capsys.readouterr().out.strip() == (
        f"sparsetrain {sparsetrain.__version__} (torch {torch.__version__}, torchvision {importlib.metadata.version('torchvision')}, "
        f"Python {sys.version.split()[0]})")
