import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the experiment's CLI (experiment/__main__.py)

from ..experiment.interrupt import exit_on_ctrl_c  # noqa: E402

with exit_on_ctrl_c("sweep"):  # (Ctrl-C while torch and Ray load: one line, not an import traceback)
    from .cli import main
    from .runner import shutdown_ray

code = main()
shutdown_ray()  # (a Ctrl-C during Ray's own atexit shutdown was a traceback)
sys.exit(code)
