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
