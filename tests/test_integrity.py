"""A phase folder checked before a run resumes or reads it (experiment/integrity.py), and the
run's files written or refused with one line (disk full, a foreign state, a damaged teacher)."""
import errno
import io
import json
import os
import zipfile

import pytest
import torch

from conftest import read_rows, run_dir, strip_timing
from sparsetrain.experiment import checkpoint, files, study


def _one_line_error(capsys, argv):
    capsys.readouterr()
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_missing_record_does_not_turn_the_checks_off(mnist_dir, study_args, capsys):
    """Deleting a file's .sha256 record made verify() skip it: a damaged round checkpoint was distilled
    from, a torn metrics.csv summarised (exit 0). Once the phase's other files have records, a file
    without its own is refused by name; best.json must name metrics.csv's best row."""
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base) == 0
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    r0, metrics, best = pd / "ckpt" / "round_00.pt", pd / "metrics.csv", pd / "best.json"
    keep = {p: p.read_bytes() for p in pd.rglob("*") if p.is_file()}

    def flip(p):
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))

    def restore():
        for p in pd.rglob("*"):
            if p.is_file() and p not in keep:
                p.unlink()
        for p, b in keep.items():
            p.write_bytes(b)

    cases = {"damaged round, record deleted": (lambda: (flip(r0), (pd / "ckpt" / "round_00.pt.sha256").unlink()),
                                               f"{r0}: its .sha256 record is missing"),
             "torn metrics, record deleted": (lambda: (metrics.write_bytes(keep[metrics][:-300]),
                                                       (pd / "metrics.csv.sha256").unlink()),
                                              f"{metrics}: its .sha256 record is missing"),
             "best.json and record deleted": (lambda: (pd / "best.json.sha256").unlink(),
                                              f"{best}: its .sha256 record is missing")}
    for name, (damage, says) in cases.items():
        damage()
        err = _one_line_error(capsys, base)
        assert says in err and f"delete {pd}" in err, (name, err)
        restore()
    # a run finished before 2026-12-05 (no records of its results): best.json must name the best row
    rows = [r for r in keep[metrics].decode().splitlines()]
    best_round = json.loads(keep[best])["round"]
    other = 1 if best_round != 1 else 2
    for p in (pd / "metrics.csv.sha256", pd / "best.json.sha256"):
        p.unlink()
    best.write_text(json.dumps({**json.loads(keep[best]), "round": other}))
    err = _one_line_error(capsys, base)
    assert f"{best} names round {other}, but {metrics}'s best round is {best_round}" in err, err
    best.write_text(json.dumps({**json.loads(keep[best]), "round": 99}))
    assert f"names round 99" in _one_line_error(capsys, base)
    restore()
    assert len(rows) > 2 and study.main(base) == 0  # (restored: the finished run again)


def test_a_resume_state_without_its_record_is_refused(mnist_dir, study_args, capsys, interrupted):
    """A damaged state.pt whose record was deleted was resumed; with the round checkpoints recorded, it
    is refused by name, and resumes once the record is back."""
    base = study_args(mnist_dir, "--teachers", "dense")
    interrupted(base, 4)  # (round 1's second epoch: state.pt, round_00.pt and their records)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    record = pd / "state.pt.sha256"
    saved = record.read_bytes()
    record.unlink()
    err = _one_line_error(capsys, base)
    assert f"{pd / 'state.pt'}: its .sha256 record is missing" in err and "restart this phase" in err, err
    record.write_bytes(saved)
    assert study.main(base) == 0


def test_a_lost_resume_state_or_round_is_refused_not_restarted(mnist_dir, study_args, capsys, interrupted):
    """state.pt lost while its record remains restarted the phase from round 0 without a word
    (overwriting round_00.pt and the rows); a round checkpoint lost with its record, in a phase still
    running, went unnoticed until the phase finished. Both are refused at start, by name."""
    base = study_args(mnist_dir, "--teachers", "dense")
    interrupted(base, 6)  # (round 2's second epoch: round_00.pt and round_01.pt written, rows 0 and 1)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    state, r0 = pd / "state.pt", pd / "ckpt" / "round_00.pt"
    saved, r0_bytes = state.read_bytes(), r0.read_bytes()
    state.unlink()
    err = _one_line_error(capsys, base)
    assert (f"{state} is missing but its record is here: the phase's progress was lost; delete {state}.sha256 to "
            "restart the phase from round 0") in err, err
    assert r0.read_bytes() == r0_bytes  # (nothing was retrained over it)
    state.write_bytes(saved)
    record = pd / "ckpt" / "round_01.pt.sha256"
    rec_bytes, r1_bytes = record.read_bytes(), (pd / "ckpt" / "round_01.pt").read_bytes()
    (pd / "ckpt" / "round_01.pt").unlink()
    record.unlink()
    err = _one_line_error(capsys, base)
    assert f"{pd}: the checkpoint of round_01.pt is missing (and its checksum); delete {pd}" in err, err
    (pd / "ckpt" / "round_01.pt").write_bytes(r1_bytes)
    record.write_bytes(rec_bytes)
    assert study.main(base) == 0


def test_a_finished_phase_without_metrics_is_refused(mnist_dir, study_args, capsys, tmp_path):
    """A finished teacher whose metrics.csv and record were deleted ended in a FileNotFoundError
    traceback (teacher_checkpoint's read_metrics); a finished phase needs its metrics.csv."""
    from sparsetrain.experiment.loop import PhaseError
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base) == 0
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    (pd / "metrics.csv").unlink()
    (pd / "metrics.csv.sha256").unlink()
    err = _one_line_error(capsys, base)
    assert f"{pd / 'metrics.csv'}: metrics.csv missing (the phase is finished: best.json); delete the phase folder " \
           f"{pd} to retrain it" in err, err
    # read directly (a phase checked before 2026-12-05): one line too, not a traceback
    with pytest.raises(PhaseError, match=rf"FileNotFoundError.*; delete {pd} to train the teacher again"):
        study.teacher_checkpoint("dense", str(pd))


def test_a_state_of_another_model_is_refused(mnist_dir, study_args, capsys, interrupted):
    """A state.pt copied from another run (here one with --dropout: another architecture) was resumed:
    start() rebuilt whatever model the state named. It must be this phase's model."""
    import shutil
    other, here = study_args(mnist_dir, "--dropout", "0.1", "--out", str(mnist_dir / "o")), study_args(mnist_dir)
    interrupted(other, 2)
    interrupted(here, 2)
    src, pd = run_dir(mnist_dir / "o") / "seed0" / "teacher", run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    for name in ("state.pt", "state.pt.sha256"):
        shutil.copy(src / name, pd / name)
    err = _one_line_error(capsys, here)
    assert f"{pd / 'state.pt'} is the state of another model (" in err and "'dropout': 0.1" in err, err
    assert "not this phase's ({'name': 'lenet300', 'num_classes': 10, 'in_channels': 1, 'image_size': 28})" in err
    assert "delete it and its .sha256 record to restart this phase from its first round" in err


def test_a_state_of_the_same_model_from_another_run_is_refused(mnist_dir, study_args, capsys, interrupted):
    """A state.pt of the same model copied from another run (here --rate 0.4, with its record) passed the
    architecture check and was resumed: this phase then went on from the other run's weights and rows.
    A state names its run directory, seed and phase; once deleted with its record, the phase restarts."""
    import shutil
    other, here = study_args(mnist_dir, "--rate", "0.4", "--out", str(mnist_dir / "o")), study_args(mnist_dir)
    interrupted(other, 3)
    interrupted(here, 3)
    src, pd = run_dir(mnist_dir / "o") / "seed0" / "teacher", run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    for name in ("state.pt", "state.pt.sha256"):
        shutil.copy(src / name, pd / name)
    err = _one_line_error(capsys, here)
    assert f"{pd / 'state.pt'} is the state of {src.parent.parent.name}/seed0/teacher, not of this phase " \
           f"({pd.parent.parent.name}/seed0/teacher)" in err, err
    assert "delete it and its .sha256 record to restart this phase from its first round" in err
    for name in ("state.pt", "state.pt.sha256"):
        (pd / name).unlink()
    assert study.main(here + ["--out", str(mnist_dir / "ref")]) == 0  # (uninterrupted, for the reference)
    assert study.main(here) == 0
    ref = run_dir(mnist_dir / "ref") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(read_rows(ref))


@pytest.mark.parametrize("target,at", [("replace", 9), ("fsync", 14)])
def test_a_full_disk_is_one_line_and_the_run_resumes(mnist_dir, study_args, capsys, monkeypatch, target, at):
    """ENOSPC while the run writes its files ended in a traceback (an OSError, or torch's zip writer's
    RuntimeError chained to it). atomic_write raises WriteFailed naming the file: one line, exit 2; the
    same command then resumes to the uninterrupted run's rows."""
    base = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(base + ["--out", str(mnist_dir / "a")]) == 0
    real, calls = getattr(os, target), {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(os, target, failing)
    err = _one_line_error(capsys, base + ["--out", str(mnist_dir / "b")])
    monkeypatch.setattr(os, target, real)
    assert calls["n"] >= at and "error: cannot write " in err, err
    assert "No space left on device; free space (or fix permissions) and run the same command to resume" in err
    assert not list((mnist_dir / "b").rglob(f"*.{files.TMP_TAG}.*"))  # (the failed write's temporary file removed)
    assert study.main(base + ["--out", str(mnist_dir / "b")]) == 0
    for phase in ("teacher", "distill-dense"):
        ra, rb = (read_rows(run_dir(mnist_dir / d) / "seed0" / phase / "metrics.csv") for d in "ab")
        assert strip_timing(ra) == strip_timing(rb)


def test_a_full_disk_linking_a_shared_student_is_one_line(mnist_dir, study_args, capsys, monkeypatch):
    """Two teacher choices naming one checkpoint (best = dense when the best round is 0) share one student,
    its second phase a symlink to the first; a link the disk had no room for (ENOSPC) was an OSError
    traceback: WriteFailed naming the link, one line, exit 2, and the same command then finishes."""
    real_checkpoint, real_symlink = study.teacher_checkpoint, os.symlink
    monkeypatch.setattr(study, "teacher_checkpoint", lambda choice, tdir: real_checkpoint("dense", tdir))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", full)
    base = study_args(mnist_dir, "--teachers", "dense", "best", "--wall", "0.6")
    err = _one_line_error(capsys, base)
    link = run_dir(mnist_dir / "runs") / "seed0" / "distill-best"
    assert err.startswith(f"error: cannot write {link}: No space left on device; free space"), err
    monkeypatch.setattr(os, "symlink", real_symlink)
    assert study.main(base) == 0 and os.readlink(link) == "distill-dense"


def test_torch_save_failing_to_write_raises_the_oserror(tmp_path):
    """torch.save's zip writer reports a failed write as "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos": atomic_save raises the OSError behind it as WriteFailed
    naming the file; a RuntimeError that is not a write (a bug) stays one."""
    class Full(io.BytesIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as got:
        checkpoint._save({"w": torch.zeros(1000)}, Full())
    assert got.value.errno == errno.ENOSPC and not isinstance(got.value, RuntimeError)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        checkpoint._save({"w": Boom()}, io.BytesIO())
    real = os.fsync
    try:
        os.fsync = lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error"))
        with pytest.raises(files.WriteFailed, match=rf"^cannot write {tmp_path / 'x.pt'}: Input/output error; free"):
            checkpoint.atomic_save({"w": torch.zeros(3)}, str(tmp_path / "x.pt"))
    finally:
        os.fsync = real
    assert os.listdir(tmp_path) == []


def test_a_stop_inside_torch_save_is_a_stop_not_a_failed_write(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (the CLI raises KeyboardInterrupt for both) landing in one of torch.save's writes came
    back from the zip writer as "RuntimeError: ... unexpected pos", then a WriteFailed ("free space ...
    to resume") instead of the run's stop: atomic_save raises the KeyboardInterrupt, leaving no file behind."""
    class Stopped(io.BytesIO):
        writes = 0

        def write(self, b):
            Stopped.writes += 1
            if Stopped.writes == 3:
                raise KeyboardInterrupt("SIGTERM")
            return super().write(b)

    with pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
        checkpoint._save({"w": torch.zeros(1000), "b": torch.ones(1000)}, Stopped())
    real = torch.save
    Stopped.writes = 0
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: real(obj, Stopped()) or f.write(b"x"))
    with pytest.raises(KeyboardInterrupt, match="^SIGTERM$"):
        checkpoint.atomic_save({"w": torch.zeros(1000), "b": torch.ones(1000)}, str(tmp_path / "x.pt"))
    assert os.listdir(tmp_path) == []


def test_a_damaged_teacher_checkpoint_is_one_line(mnist_dir, study_args, capsys, tmp_path):
    """A --teachers PATH without a record, with a CSR index damaged, was a RuntimeError traceback from
    load_state_dict ("col_indices must lie in [0, 784)"): a CorruptFile naming the file."""
    from sparsetrain.engine.convert import sparsify_
    from sparsetrain.engine.nn import prunable_layers
    from sparsetrain.experiment.models import build_model
    arch = dict(name="lenet300", num_classes=10, in_channels=1, image_size=28)
    model = build_model(**arch)
    name, layer = prunable_layers(model)[0]
    sparsify_(model, {name: torch.rand_like(layer.weight) < 0.5})
    payload = checkpoint.model_payload(model, {}, arch)
    cols = next(k for k in payload["state"] if k.endswith("col_indices"))
    payload["state"][cols] = payload["state"][cols].clone()
    payload["state"][cols][0] = 10 ** 6  # (a flipped byte)
    bad = tmp_path / "bad_teacher.pt"
    torch.save(payload, bad)  # (no .sha256 record: a file from elsewhere)
    with pytest.raises(files.CorruptFile, match=rf"^{bad}: its weights do not load into its model \(.*col_indices"):
        checkpoint.load_model(str(bad))
    err = _one_line_error(capsys, study_args(mnist_dir, "--teachers", str(bad)))
    assert f"--teachers {bad}: {bad}: its weights do not load into its model" in err and "damaged" in err, err


def test_a_flipped_byte_in_a_checkpoint_without_its_record_is_refused(mnist_dir, study_args, capsys, tmp_path):
    """torch.load does not check the zip's CRC-32s: a --teachers PATH (no .sha256 record beside it) with one
    byte of a weight flipped loaded as a model with that weight changed, silently. safe_load now checks the
    CRCs of a file without its record: a CorruptFile naming the file and the entry; an intact one loads."""
    from sparsetrain.experiment.models import build_model
    arch = dict(name="lenet300", num_classes=10, in_channels=1, image_size=28)
    model = build_model(**arch)
    good, bad = tmp_path / "good_teacher.pt", tmp_path / "bad_teacher.pt"
    checkpoint.save_model(str(good), model, {}, arch)
    os.remove(f"{good}.sha256")  # (a file from elsewhere)
    with zipfile.ZipFile(good) as z:  # (the largest entry: the first layer's weights)
        entry = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(good.read_bytes())
    at = entry.header_offset + 30 + len(entry.filename) + len(entry.extra) + entry.file_size // 2
    data[at] ^= 0x01
    bad.write_bytes(bytes(data))
    loaded = checkpoint.load_model(str(good))[0].state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())  # (the intact copy: as saved)
    with pytest.raises(files.CorruptFile, match=rf"^checkpoint {bad} is corrupt: its entry {entry.filename} fails "
                                                r"the zip's CRC-32 check"):
        checkpoint.load_model(str(bad))
    err = _one_line_error(capsys, study_args(mnist_dir, "--teachers", str(bad)))
    assert f"--teachers {bad}: checkpoint {bad} is corrupt" in err, err


def test_a_checkpoint_without_its_record_that_cannot_be_read_is_not_called_corrupt(mnist_dir, study_args, capsys,
                                                                                  tmp_path, monkeypatch):
    """A checkpoint without a .sha256 record (a --teachers PATH, an old run's) that cannot be read (EACCES) was
    "corrupt or not a torch file" from the torch.load catch, as if damaged: it is ReadFailed naming the file (as
    verify's for one with a record), one line from the CLI; a readable copy still loads."""
    import builtins
    from sparsetrain.experiment.models import build_model
    arch = dict(name="lenet300", num_classes=10, in_channels=1, image_size=28)
    teacher = tmp_path / "old_teacher.pt"
    checkpoint.save_model(str(teacher), build_model(**arch), {}, arch)
    os.remove(f"{teacher}.sha256")  # (a file from elsewhere)
    assert checkpoint.load_model(str(teacher))[0] is not None
    real = builtins.open

    def denied(f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f) == str(teacher):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(f))
        return real(f, *a, **k)
    teacher.chmod(0)
    with monkeypatch.context() as m:
        if os.geteuid() == 0:  # (root reads a mode-000 file: the same refusal simulated, for this file alone)
            m.setattr(builtins, "open", denied)
        try:
            with pytest.raises(files.ReadFailed) as e:
                checkpoint.load_model(str(teacher))
            assert str(e.value) == f"cannot read {teacher}: Permission denied; fix its permissions (or the disk) and " \
                                   "run the same command again"
            err = _one_line_error(capsys, study_args(mnist_dir, "--teachers", str(teacher)))
            assert f"cannot read {teacher}: Permission denied" in err and "corrupt" not in err, err
        finally:
            teacher.chmod(0o644)
    # readable again: an I/O error while its CRC-32s are checked is said so too, not a failed CRC

    def eio(self):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(zipfile.ZipFile, "testzip", eio)
    with pytest.raises(files.ReadFailed, match=rf"^cannot read {teacher}: {os.strerror(errno.EIO)}; fix its permissions"):
        checkpoint.load_model(str(teacher))


@pytest.mark.parametrize("record", [True, False])
def test_a_checkpoint_deleted_while_it_is_loaded_is_missing_not_corrupt(tmp_path, monkeypatch, record):
    """A checkpoint deleted between safe_load's existence check and its read (another process cleaning up) was
    "corrupt or not a torch file" (torch.load's FileNotFoundError) or, with its record, "corrupt: missing"
    (verify's): it is the FileNotFoundError a missing one gets."""
    from sparsetrain.experiment.models import build_model
    arch = dict(name="lenet300", num_classes=10, in_channels=1, image_size=28)
    path = tmp_path / "teacher.pt"
    checkpoint.save_model(str(path), build_model(**arch), {}, arch)
    if not record:
        os.remove(f"{path}.sha256")
    real = checkpoint.verify

    def deleted_first(p):  # (the deletion lands after the existence check: before verify, or before torch.load)
        if record:
            os.remove(p)
            return real(p)
        found = real(p)
        os.remove(p)
        return found
    monkeypatch.setattr(checkpoint, "verify", deleted_first)
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.safe_load(str(path))
    assert str(e.value) == f"checkpoint not found: {path}"


def test_a_lock_that_cannot_be_opened_is_refused_not_ignored(mnist_dir, study_args, capsys, tmp_path):
    """folder_lock ran the body without any lock on every OSError opening .lock (a folder in its place,
    no permission): two processes could run one run directory at once. The folder existing, it is one
    line, exit 2; a folder that cannot be made at all keeps its caller's error (no lock, no error here)."""
    base = study_args(mnist_dir)
    assert study.main(base) == 0
    lock = run_dir(mnist_dir / "runs") / ".lock"
    lock.unlink()
    lock.mkdir()
    err = _one_line_error(capsys, base)
    assert f"error: cannot write {lock}: Is a directory; the run's lock (no two processes may run this folder at " \
           "once) cannot be taken: remove it or fix its permissions" in err, err
    lock.rmdir()
    assert study.main(base) == 0
    (tmp_path / "a_file").write_text("")
    with files.folder_lock(str(tmp_path / "a_file" / "run")):  # (makedirs fails: the caller says why)
        entered = True
    assert entered


def test_a_folder_in_a_files_place_is_named(mnist_dir, study_args, capsys, interrupted):
    """A folder where best.json, metrics.csv, state.pt or a round checkpoint belongs was an
    IsADirectoryError traceback: a CorruptFile naming it."""
    base = study_args(mnist_dir, "--teachers", "dense")
    interrupted(base, 4)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    for name in ("state.pt", "ckpt/round_00.pt"):
        path = pd / name
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()
        err = _one_line_error(capsys, base)
        assert f"{path} is a folder, not the file the run wrote; delete {pd} to retrain this phase" in err, err
        path.rmdir()
        path.write_bytes(saved)
    assert study.main(base) == 0
    for name in ("best.json", "metrics.csv"):
        path = pd / name
        saved = path.read_bytes()
        path.unlink()
        path.mkdir()
        assert f"{path} is a folder" in _one_line_error(capsys, base)
        path.rmdir()
        path.write_bytes(saved)
    assert study.main(base) == 0


def test_report_only_on_a_read_only_run_is_one_line(mnist_dir, study_args, capsys, monkeypatch):
    """--report-only on a run on a read-only filesystem failed writing a figure's temporary file with
    an OSError traceback: one line, exit 2."""
    base = study_args(mnist_dir)
    assert study.main(base) == 0

    def read_only(path, mode="r", *a, **k):
        if "w" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return open(path, mode, *a, **k)

    monkeypatch.setattr(files, "open", read_only, raising=False)  # (atomic_write's temporary files)
    err = _one_line_error(capsys, base + ["--report-only"])
    assert f"error: cannot write {run_dir(mnist_dir / 'runs')}" in err and ": Read-only file system; " in err, err
    # (it advised "to resume": the report is written anew, there is no run to resume)
    assert err.endswith("; free space (or fix permissions) and run --report-only again\n"), err


def test_report_only_that_cannot_finish_a_killed_write_says_what_helps(mnist_dir, study_args, capsys, monkeypatch):
    """--report-only finds a write a kill cut between its two renames (verify: the temporary file matches the
    record) in a folder that refuses the rename: its one line advised "free space (or fix permissions) and run
    the same command to resume", neither of which a rename nor a report needs. Now it names the file the rename
    finishes and says to fix the folder's permissions and run the command again; writable again, it reports."""
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base) == 0
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    tmp = pd / f"metrics.csv.{files.TMP_TAG}.{(1 << 22) - 1}"  # (a dead writer's: no process has that pid here)
    rows = (pd / "metrics.csv").read_bytes()
    tmp.write_bytes(rows)
    (pd / "metrics.csv").write_bytes(rows[:len(rows) // 2])  # (the old file, the record the new one's)
    real = os.replace

    def read_only(src, dst, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), src)
    monkeypatch.setattr(os, "replace", read_only)
    err = _one_line_error(capsys, base + ["--report-only"])
    monkeypatch.setattr(os, "replace", real)
    assert err == (f"error: cannot write {tmp}: Read-only file system; it finishes {pd / 'metrics.csv'}'s interrupted "
                   "write: fix the folder's permissions and run the same command again\n"), err
    assert study.main(base + ["--report-only"]) == 0 and not tmp.exists() and (pd / "metrics.csv").read_bytes() == rows


def test_a_killed_write_s_leftover_in_a_read_only_run_is_one_line(mnist_dir, study_args, capsys, monkeypatch):
    """A run killed mid-write leaves `<file>.sparsetrain-tmp.<pid>`, which the next start removes (or renames into
    place); on a run directory made read-only since, that removal was a PermissionError/EROFS traceback. Now
    one line naming the file, exit 2; writable again, the same command cleans it up and finishes."""
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base) == 0
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    tmp = pd / f"metrics.csv.{files.TMP_TAG}.{(1 << 22) - 1}"  # (a dead writer's: no process has that pid here)
    tmp.write_text("round,val_acc\n0,0.")
    before = {p: p.read_bytes() for p in pd.iterdir() if p.is_file()}
    real_remove, real_replace = os.remove, os.replace

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, "remove", read_only)
    monkeypatch.setattr(os, "replace", read_only)
    err = _one_line_error(capsys, base)
    monkeypatch.setattr(os, "remove", real_remove)
    monkeypatch.setattr(os, "replace", real_replace)
    assert err.startswith(f"error: cannot write {tmp}: Read-only file system; "), err
    assert {p: p.read_bytes() for p in pd.iterdir() if p.is_file()} == before  # (nothing else touched)
    assert study.main(base) == 0 and not tmp.exists()


@pytest.mark.parametrize("name", ["state.pt", "metrics.csv.sha256"])
def test_a_resume_state_that_cannot_be_removed_is_one_line(mnist_dir, study_args, capsys, monkeypatch, name):
    """A finished phase drops its state.pt; an OSError removing it (EIO, a folder made read-only) was a
    traceback. Now one line naming the file, exit 2; the same command then finishes to the uninterrupted rows.
    So is each round's removal of a stale metrics.csv record; both said "cannot write" and "free space"."""
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base + ["--out", str(mnist_dir / "a")]) == 0
    real = os.remove

    def failing(path, *a, **k):
        if str(path).endswith(name):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return real(path, *a, **k)
    monkeypatch.setattr(os, "remove", failing)
    err = _one_line_error(capsys, base)
    monkeypatch.setattr(os, "remove", real)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    assert err == f"error: cannot remove {pd / name}: Input/output error; fix the folder's permissions (or the " \
                  "disk) and run the same command\n", err
    assert study.main(base) == 0 and not (pd / "state.pt").exists()
    ref = run_dir(mnist_dir / "a") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(read_rows(ref))


def test_a_phase_folder_that_cannot_be_made_is_one_line(mnist_dir, study_args, capsys, monkeypatch):
    """run_phase's os.makedirs of PHASE/ckpt on a full disk was an OSError traceback: one line, exit 2."""
    real = os.makedirs

    def full(path, *a, **k):
        if str(path).endswith(os.path.join("teacher", "ckpt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", full)
    err = _one_line_error(capsys, study_args(mnist_dir))
    assert "/seed0/teacher/ckpt: No space left on device; free space (or fix permissions) and run the same" in err
    monkeypatch.setattr(os, "makedirs", real)
    assert study.main(study_args(mnist_dir)) == 0


def test_a_phase_killed_twice_around_its_finish_still_reports(mnist_dir, study_args, capsys, monkeypatch):
    """finish writes metrics.csv with its record, then best.json: killed in between, the resume measured
    the last round again and rewrote metrics.csv without a record, leaving the old one; killed again before
    finish, --report-only refused the intact rows as corrupt. The rewrite now drops the stale record."""
    from sparsetrain.experiment import loop
    base = study_args(mnist_dir)
    assert study.main(base + ["--out", str(mnist_dir / "ref")]) == 0  # (uninterrupted, for the reference)

    def kill_at_first(name):
        real = getattr(loop, name)

        def dying(*a, **k):
            monkeypatch.setattr(loop, name, real)
            raise KeyboardInterrupt
        monkeypatch.setattr(loop, name, dying)
    kill_at_first("write_json")  # (the teacher's best.json: its metrics.csv and record are written)
    assert study.main(base) == 130
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    assert (pd / "metrics.csv.sha256").exists() and not (pd / "best.json").exists()
    kill_at_first("finish")  # (the last round measured and its row written again)
    assert study.main(base) == 130
    capsys.readouterr()
    assert study.main(base + ["--report-only"]) == 0, capsys.readouterr().err
    assert study.main(base) == 0
    ref = run_dir(mnist_dir / "ref") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(read_rows(ref))


def test_a_damaged_phase_linked_by_reuse_names_the_folder_to_delete(mnist_dir, study_args, capsys):
    """A damaged round checkpoint in a phase linked from another run (--reuse) said to delete the link,
    which the next run with --reuse linked again to the same damaged phase (the same error, for ever):
    the advice names the linked run's folder and the link; followed, the phase trains here. It offers too (since
    2026-12-06) to leave that run's folder as it is: the link alone removed and --reuse left out, it trains here."""
    import shutil
    theirs = study_args(mnist_dir, "--phases", "teacher", "--out", str(mnist_dir / "a"))
    assert study.main(theirs) == 0
    src = run_dir(mnist_dir / "a") / "seed0" / "teacher"
    ref = read_rows(src / "metrics.csv")
    ckpt = src / "ckpt" / "round_00.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    damaged = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    for out in ("runs", "b"):
        here = study_args(mnist_dir, "--out", str(mnist_dir / out), "--reuse", str(run_dir(mnist_dir / "a")))
        err = _one_line_error(capsys, here + ["--phases", "distill"])
        link = run_dir(mnist_dir / out) / "seed0" / "teacher"
        assert f"{link / 'ckpt' / 'round_00.pt'} is corrupt" in err, err
        assert f"delete {src.resolve()}, the phase of another run that {link} links (--reuse), and the link (or, to " \
               "leave that run's folder as it is, remove the link alone and run without --reuse) to retrain this " \
               "phase" in err, err
        assert not os.path.lexists(link)  # (a run refused before it trained leaves none of its links: since 2026-12-07)
        if out == "runs":  # (the link alone, without --reuse: trained here, that run's folder as it was)
            assert study.main(study_args(mnist_dir, "--out", str(mnist_dir / out))) == 0
            assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == damaged
        else:
            shutil.rmtree(src.resolve())
            assert study.main(here) == 0  # (nothing left to link: the teacher trains here)
        assert not link.is_symlink() and strip_timing(read_rows(link / "metrics.csv")) == strip_timing(ref)


@pytest.mark.parametrize("damage", ["{\"flipped\": [1", "[]"])
def test_a_damaged_noise_record_is_refused_not_rewritten(mnist_dir, study_args, capsys, interrupted, damage):
    """A seed's noise.json records the split and noisy labels its rounds trained on, which a resume must
    draw again; a damaged one turned that check off and was rewritten without a word. Refused by name;
    deleted on purpose, the run goes on and records the draw again."""
    base = study_args(mnist_dir)
    interrupted(base, 3)
    noise = run_dir(mnist_dir / "runs") / "seed0" / "noise.json"
    drawn = json.loads(noise.read_text())["labels_fingerprint"]
    noise.write_text(damage)
    err = _one_line_error(capsys, base)
    assert f"{noise} is corrupt (" in err and "delete it to continue without that check" in err, err
    noise.unlink()
    assert study.main(base) == 0
    assert json.loads(noise.read_text())["labels_fingerprint"] == drawn


def test_a_round_checkpoint_of_another_run_or_round_is_refused(mnist_dir, study_args, capsys):
    """A teacher's round checkpoint copied in from another run with its .sha256 record, or two rounds
    swapped, passed every checksum: the student was distilled from the wrong
    teacher without a word. A round checkpoint names its run directory, seed, phase and round; one written
    before it did (no place recorded) is still distilled from."""
    import shutil
    other = study_args(mnist_dir, "--rate", "0.4", "--phases", "teacher", "--out", str(mnist_dir / "o"))
    here = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(other) == 0 and study.main(here) == 0
    src, pd = run_dir(mnist_dir / "o") / "seed0" / "teacher", run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    mine, theirs = f"{pd.parent.parent.name}/seed0/teacher", f"{src.parent.parent.name}/seed0/teacher"
    keep = {p: p.read_bytes() for p in pd.rglob("*") if p.is_file()}
    ref = read_rows(pd.parent / "distill-dense" / "metrics.csv")
    r0, r1 = pd / "ckpt" / "round_00.pt", pd / "ckpt" / "round_01.pt"

    def restore():
        shutil.rmtree(pd)
        for p, b in keep.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b)

    def copied():
        for name in ("round_00.pt", "round_00.pt.sha256"):
            shutil.copy(src / "ckpt" / name, pd / "ckpt" / name)

    def swapped(named=False):  # (records of before 2026-12-06 name no file: the payload's round tells)
        for ext in ("", ".sha256"):
            a, b = (keep[p] for p in (r0.with_name(r0.name + ext), r1.with_name(r1.name + ext)))
            if ext and not named:
                a, b = (json.dumps({k: v for k, v in json.loads(x).items() if k != "name"}).encode() for x in (a, b))
            r0.with_name(r0.name + ext).write_bytes(b)
            r1.with_name(r1.name + ext).write_bytes(a)
    for damage, says in ((copied, f"is round 0 of {theirs}, not round 0 of this phase ({mine})"),
                         (swapped, f"is round 1 of {mine}, not round 0 of this phase ({mine})")):
        damage()
        err = _one_line_error(capsys, here)
        assert f"{r0} {says}: copied from another run, seed or phase, or swapped with another round's; a finished " \
               f"phase's results cannot be rebuilt: delete {pd} to retrain this phase" in err, (damage.__name__, err)
        restore()
    swapped(named=True)  # (records that name their files: refused by the record, before any load)
    err = _one_line_error(capsys, here)
    assert f"{r0}.sha256 is the record of 'round_01.pt', not of 'round_00.pt': it and its file were copied or " \
           f"renamed from another file's; a finished phase's results cannot be rebuilt: delete {pd}" in err, err
    restore()
    # a checkpoint written before 2026-12-06 (its round, no place): distilled from as before
    payload = checkpoint.safe_load(str(r0))
    assert payload.pop("where") == mine and payload["round"] == 0
    checkpoint.atomic_save(payload, str(r0))
    shutil.rmtree(pd.parent / "distill-dense")
    assert study.main(here) == 0
    assert strip_timing(read_rows(pd.parent / "distill-dense" / "metrics.csv")) == strip_timing(ref)


def test_a_teacher_linked_by_reuse_names_the_folder_to_delete(mnist_dir, study_args, capsys, monkeypatch):
    """teacher_checkpoint's errors said "delete that folder" (or named the link) for a teacher phase linked
    from another run (--reuse), which the next run with --reuse linked again: the advice names that run's
    folder and the link, as verify_phase's does; so does a round checkpoint of the wrong round there. A
    linked teacher of a run of another name (its round checkpoints name that run) is distilled from."""
    from sparsetrain.experiment.loop import PhaseError
    theirs = study_args(mnist_dir, "--teachers", "best", "--phases", "teacher", "--out", str(mnist_dir / "a"))
    assert study.main(theirs) == 0
    src = run_dir(mnist_dir / "a") / "seed0" / "teacher"
    here = study_args(mnist_dir, "--teachers", "dense", "--phases", "distill", "--reuse", str(run_dir(mnist_dir / "a")))
    r0, r1 = src / "ckpt" / "round_00.pt", src / "ckpt" / "round_01.pt"
    keep = {p: p.read_bytes() for p in (r0, r1, r0.with_name("round_00.pt.sha256"), r1.with_name("round_01.pt.sha256"))}
    for p, q in ((r0, r1), (r1, r0)):  # (swapped with records of before 2026-12-06, which name no file)
        p.write_bytes(keep[q])
        record = json.loads(keep[q.with_name(q.name + ".sha256")])
        p.with_name(p.name + ".sha256").write_text(json.dumps({k: v for k, v in record.items() if k != "name"}))
    err = _one_line_error(capsys, here)
    assert not [p for p in (mnist_dir / "runs").rglob("*") if p.is_symlink()]  # (refused before it trained: no link
    # left, since 2026-12-07)
    for p, b in keep.items():
        p.write_bytes(b)
    assert study.main(here) == 0  # (the linked run's own rounds, named after it: distilled from)
    link = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    assert link.is_symlink() and run_dir(mnist_dir / "runs").name != src.parent.parent.name
    theirs_too = f"delete {src.resolve()}, the phase of another run that {link} links (--reuse), and the link (or, " \
                 "to leave that run's folder as it is, remove the link alone and run without --reuse) to train the " \
                 "teacher again"
    assert f"{link / 'ckpt' / 'round_00.pt'} is round 1 of {src.parent.parent.name}/seed0/teacher" in err, err
    assert theirs_too.replace("train the teacher again", "retrain this phase") in err, err  # (verify_phase's)
    best = src / "best.json"
    best.write_text("{not json")
    with pytest.raises(PhaseError) as e:
        study.teacher_checkpoint("best", str(link))
    assert f"{link}: its best.json and metrics.csv do not name the teacher's best round" in str(e.value)
    assert theirs_too in str(e.value), e.value
    with pytest.raises(PhaseError) as e:  # (not linked: it said "delete that folder")
        study.teacher_checkpoint("best", str(src))
    assert f"; delete {src} to train the teacher again" in str(e.value), e.value
    best.write_text(json.dumps({"round": 0}))
    r0.unlink()
    with pytest.raises(PhaseError) as e:
        study.teacher_checkpoint("dense", str(link))
    assert f"{link / 'ckpt' / 'round_00.pt'}, the teacher's dense round, is missing; {theirs_too}" in str(e.value)
    # a file that cannot be read (EACCES, EIO) is not a damaged teacher: it said to delete it (here that run's)
    from sparsetrain.experiment import teachers

    def denied(path, *a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    monkeypatch.setattr(teachers, "open", denied, raising=False)
    with pytest.raises(files.ReadFailed) as e:
        study.teacher_checkpoint("best", str(link))
    assert str(e.value) == f"cannot read {link / 'best.json'}: Permission denied; fix its permissions (or the " \
                           "disk) and run the same command again"
    monkeypatch.delattr(teachers, "open")
    stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: denied(p) if str(p).endswith("round_00.pt") else stat(p, *a, **k))
    with pytest.raises(files.ReadFailed) as e:
        study.teacher_checkpoint("dense", str(link))
    assert str(e.value).startswith(f"cannot read {link / 'ckpt' / 'round_00.pt'}: Permission denied; "), e.value


def test_a_finished_phase_copied_from_another_run_is_refused(mnist_dir, study_args, capsys):
    """A whole finished phase folder copied in from another run (here --rate 0.4) with its .sha256 records
    passed every check: the run reported (and distilled from) the other run's results. A finished phase's
    best.json names its run directory, seed and phase; one finished before it did is accepted as before."""
    import shutil
    other = study_args(mnist_dir, "--rate", "0.4", "--phases", "teacher", "--out", str(mnist_dir / "o"))
    here = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(other) == 0 and study.main(here) == 0
    src, pd = run_dir(mnist_dir / "o") / "seed0" / "teacher", run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    mine = f"{pd.parent.parent.name}/seed0/teacher"
    assert json.loads((pd / "best.json").read_text())["where"] == mine
    ref = read_rows(pd / "metrics.csv")
    shutil.rmtree(pd)
    shutil.copytree(src, pd)
    err = _one_line_error(capsys, here)
    assert f"{pd / 'best.json'} is the result of {src.parent.parent.name}/seed0/teacher, not of this phase ({mine}): " \
           f"a phase folder copied from another run, seed or phase; delete {pd} to retrain this phase" in err, err
    assert err == _one_line_error(capsys, here + ["--report-only"])  # (it reported the other run's rows as this run's)
    shutil.rmtree(pd)
    assert study.main(here) == 0 and strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(ref)
    best = json.loads((pd / "best.json").read_text())  # (a phase finished before 2026-12-06: no place named)
    del best["where"]
    files.write_json(str(pd / "best.json"), best, checksum=True)
    assert study.main(here) == 0


def test_a_lost_or_corrupt_config_beside_trained_phases_is_refused(mnist_dir, study_args, capsys, interrupted):
    """A corrupt config.json was refused, but a missing one beside trained phases was written anew and the run
    resumed: the data fingerprint and settings it is checked against were gone, so it went on with whatever data it
    was given. Both are refused now, naming the file and the choices (--resume and --report-only too, which said
    "no run"); nothing of the run is touched, and it resumes to the uninterrupted rows once the file is back."""
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base + ["--out", str(mnist_dir / "whole")]) == 0
    interrupted(base, 4)
    rd = run_dir(mnist_dir / "runs")
    config, state = rd / "config.json", rd / "seed0" / "teacher" / "state.pt"
    saved, before = config.read_bytes(), {p: p.read_bytes() for p in rd.rglob("*") if p.is_file() and p != config}
    choices = f": a resume checks the run's settings and data against it (the data's fingerprint is recorded " \
              "nowhere else); restore it from a backup copy, or start over, every phase trained again, in another " \
              f"--out (or move {rd} aside: its trained phases are kept there)"
    config.unlink()
    for extra in ([], ["--resume"], ["--report-only"]):
        err = _one_line_error(capsys, base + extra)
        assert f"error: {config} is missing, but the run directory holds trained phases{choices}" in err, (extra, err)
    config.write_text("{ not json")
    err = _one_line_error(capsys, base)
    assert f"error: {config} is corrupt (JSONDecodeError: " in err and choices in err, err
    config.write_text("{}")  # (no settings: taken for no config.json at all, rewritten, the checks gone)
    err = _one_line_error(capsys, base)
    assert f"error: {config} is corrupt (ValueError: not a JSON object of settings)" in err and choices in err, err
    for bad in (5, [5], "x"):  # (a hand edit of its resumed_with: an AttributeError from inside before 2026-12-07)
        config.write_text(json.dumps({**json.loads(saved), "resumed_with": bad}))
        err = _one_line_error(capsys, base)
        assert f"error: {config} is corrupt (ValueError: its resumed_with is not a list of JSON objects: {bad!r})" \
            in err and choices in err, err
    lost = {k: v for k, v in json.loads(saved).items() if k not in ("data_fingerprint", "data_source")}
    config.write_text(json.dumps(lost))  # (recorded before any phase trains: the resume took any data before 2026-12-07)
    err = _one_line_error(capsys, base)
    assert f"error: {config} is corrupt (ValueError: it has no data_fingerprint, yet the run directory holds trained " \
        "phases)" in err and choices in err, err
    assert {p: p.read_bytes() for p in rd.rglob("*") if p.is_file() and p != config} == before and state.exists()
    assert "remove" not in err and "delete" not in err  # (it advised "remove RUN_DIR": every trained phase lost)
    config.write_bytes(saved)
    assert study.main(base) == 0
    whole = run_dir(mnist_dir / "whole") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(rd / "seed0" / "teacher" / "metrics.csv")) == strip_timing(read_rows(whole))


@pytest.mark.parametrize("kill_after", ["checkpoint", "metrics"])
def test_a_damaged_checkpoint_of_the_round_being_resumed_is_written_anew(mnist_dir, study_args, capsys,
                                                                        monkeypatch, kill_after):
    """A kill after round 0's checkpoint (before metrics.csv's row, or after it) and before the state of round 1
    resumes round 0's measurement, which writes round_00.pt again; that checkpoint damaged was refused as "a trained
    round cannot be rebuilt". The resume rebuilds it now (a note says so) and ends with the uninterrupted run's rows
    (a round the state is past is still refused: test_pipeline.test_resume_refuses_a_corrupt_round_checkpoint)."""
    from sparsetrain.experiment import loop
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base + ["--out", str(mnist_dir / "whole")]) == 0
    real = loop.write_csv

    def killed(*a, **k):
        if kill_after == "metrics":
            real(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "write_csv", killed)
    assert study.main(base) == 130
    monkeypatch.setattr(loop, "write_csv", real)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    r0 = pd / "ckpt" / "round_00.pt"
    assert r0.exists() and (pd / "metrics.csv").exists() == (kill_after == "metrics")

    def damage(path):
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    damage(r0)
    capsys.readouterr()
    assert study.main(base) == 0
    assert f"note: {r0} is corrupt" in capsys.readouterr().err
    assert files.verify(str(r0))
    whole = run_dir(mnist_dir / "whole") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(read_rows(whole))


def test_a_students_round_checkpoint_of_another_run_is_refused_on_resume(mnist_dir, study_args, capsys):
    """A vanilla (or distilled) round checkpoint copied in from another run with its .sha256 record passed
    verify_phase's checksums (only a teacher's was checked for its place, when distilled from): the phase's
    results were another run's. Every verified round must now name this phase and its round; one written
    before 2026-12-06 (no place) still passes."""
    import shutil
    other = study_args(mnist_dir, "--rate", "0.4", "--teachers", "dense", "--out", str(mnist_dir / "o"))
    here = study_args(mnist_dir, "--teachers", "dense")
    assert study.main(other) == 0 and study.main(here) == 0
    src, pd = run_dir(mnist_dir / "o") / "seed0" / "distill-dense", run_dir(mnist_dir / "runs") / "seed0" / "distill-dense"
    mine, theirs = f"{pd.parent.parent.name}/seed0/distill-dense", f"{src.parent.parent.name}/seed0/distill-dense"
    r1 = pd / "ckpt" / "round_01.pt"
    keep = {p: p.read_bytes() for p in (r1, r1.with_name("round_01.pt.sha256"))}
    for name in ("round_01.pt", "round_01.pt.sha256"):
        shutil.copy(src / "ckpt" / name, pd / "ckpt" / name)
    err = _one_line_error(capsys, here)
    assert f"{r1} is round 1 of {theirs}, not round 1 of this phase ({mine}): copied from another run, seed or " \
           f"phase, or swapped with another round's; a finished phase's results cannot be rebuilt: delete {pd} to " \
           "retrain this phase" in err, err
    for p, b in keep.items():
        p.write_bytes(b)
    payload = checkpoint.safe_load(str(r1))  # (a checkpoint written before 2026-12-06: its round, no place)
    assert payload.pop("where") == mine and payload["round"] == 1
    checkpoint.atomic_save(payload, str(r1))
    assert study.main(here) == 0


@pytest.mark.parametrize("target", ["round_00.pt.sha256", "round_00.pt", "state.pt.sha256"])
def test_a_file_that_cannot_be_read_is_named_not_called_corrupt(mnist_dir, study_args, capsys, monkeypatch,
                                                                 interrupted, target):
    """verify_phase took an OSError reading a record (EACCES, EIO) for a corrupt record and advised deleting the
    phase (or state.pt, its progress), and one reading a checkpoint was a PermissionError traceback; a failed
    resume state removal said "cannot write". Each is now one line naming the operation, the file and the errno
    text, nothing deleted, and the same command resumes to the uninterrupted rows once the file reads again."""
    base = study_args(mnist_dir, "--phases", "teacher")
    assert study.main(base + ["--out", str(mnist_dir / "whole")]) == 0
    interrupted(base, 4)
    pd = run_dir(mnist_dir / "runs") / "seed0" / "teacher"
    path = str(pd / "ckpt" / target) if target.startswith("round") else str(pd / target)
    before = {p: p.read_bytes() for p in pd.rglob("*") if p.is_file()}
    real = open

    def denied(file, *a, **k):
        if str(file) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), file)
        return real(file, *a, **k)
    monkeypatch.setattr(files, "open", denied, raising=False)
    err = _one_line_error(capsys, base)
    assert err == f"error: cannot read {path}: Permission denied; fix its permissions (or the disk) and run the " \
                  "same command again\n", err
    assert "corrupt" not in err and "delete" not in err
    monkeypatch.delattr(files, "open")
    assert {p: p.read_bytes() for p in pd.rglob("*") if p.is_file()} == before
    assert study.main(base) == 0
    ref = run_dir(mnist_dir / "whole") / "seed0" / "teacher" / "metrics.csv"
    assert strip_timing(read_rows(pd / "metrics.csv")) == strip_timing(read_rows(ref))
