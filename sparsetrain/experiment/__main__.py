import os
import sys

# OpenMP workers spin at most ~10k iterations at a barrier before sleeping (libgomp's default spins
# far longer): alone it costs nothing measurable, with runs sharing the cores it roughly halves the
# slowdown (bench/contention.py). Set before torch loads the OpenMP runtime; the user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .interrupt import exit_on_ctrl_c, stop_on_sigterm  # noqa: E402

with exit_on_ctrl_c("run"):  # (Ctrl-C while torch loads: one line, as during the run, not an import traceback)
    from .config import config_from_args

    config_from_args(sys.argv[1:])  # argument errors first: one line and exit 2 before the study's imports

    from .study import main

with stop_on_sigterm():  # (SIGTERM while it runs: stopped as on Ctrl-C, then dies of SIGTERM)
    code = main()
sys.exit(code)
