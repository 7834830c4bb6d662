"""The build is incremental: after `make install` (which `make test` runs first), a second one has
nothing to do: make finds every target up to date, and ninja, in the persistent build directory
with its record of every object's command and included headers, plans no compile (a dry run, -n,
with the ninja the build used: the venv's)."""
import glob
import os
import subprocess

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def test_second_make_install_does_no_compile_work():
    make = subprocess.run(["make", "-q", "install"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0, f"make install is not up to date: {make.stdout}{make.stderr}"
    dirs = glob.glob(os.path.join(ROOT, "build", "temp.*"))
    assert len(dirs) == 1, f"expected one persistent build directory under build/, got {dirs}"
    ninja = os.path.join(ROOT, ".venv", "bin", "ninja")
    dry = subprocess.run([ninja, "-n", "-C", dirs[0]], capture_output=True, text=True)
    assert dry.returncode == 0 and "no work to do" in dry.stdout, dry.stdout[-2000:]


def _flags_stamp():
    path = os.path.join(ROOT, ".venv", ".flags")
    with open(path) as f:
        return f.read(), os.stat(path).st_mtime_ns


def test_dry_runs_with_other_flags_change_nothing():
    """`make -n`/`make -q` with another flag set report the rebuild it would need and leave the
    flags stamp alone (it was once rewritten while make parsed the Makefile, so a dry run made the
    next real `make install` rebuild)."""
    before = _flags_stamp()
    query = subprocess.run(["make", "-q", "install", "NATIVE=1"], cwd=ROOT, capture_output=True, text=True)
    assert query.returncode == 1, f"NATIVE=1 must leave the build out of date: {query.stdout}{query.stderr}"
    dry = subprocess.run(["make", "-n", "install", "DEBUG=1"], cwd=ROOT, capture_output=True, text=True)
    assert dry.returncode == 0 and "setup.py -q build_ext" in dry.stdout, dry.stdout + dry.stderr
    assert _flags_stamp() == before
    assert subprocess.run(["make", "-q", "install"], cwd=ROOT).returncode == 0


def test_flags_other_than_0_or_1_warn_and_build_off():
    """NATIVE/DEBUG are generic names another tool may set: a value other than 0 or 1 is off, with a
    warning naming it, in the Makefile and in setup.py alike."""
    make = subprocess.run(["make", "-q", "install", "NATIVE=yes", "DEBUG=2"], cwd=ROOT, capture_output=True,
                          text=True)
    assert make.returncode == 0, "NATIVE=yes is off: the same build as NATIVE unset"
    assert "NATIVE='yes' is neither 0 nor 1: off" in make.stderr and "DEBUG='2'" in make.stderr, make.stderr
    env = dict(os.environ, NATIVE="yes", DEBUG="2")
    env.pop("SPARSETRAIN_SKIP_EXT", None)
    py = os.path.join(ROOT, ".venv", "bin", "python")
    setup = subprocess.run([py, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert setup.returncode == 0 and setup.stdout.strip() == "sparsetrain", setup.stdout + setup.stderr
    assert "NATIVE='yes' is neither 0 nor 1: off" in setup.stderr, setup.stderr
    assert "DEBUG='2' is neither 0 nor 1: off" in setup.stderr, setup.stderr
