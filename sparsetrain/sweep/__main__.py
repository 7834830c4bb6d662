import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the experiment's CLI (experiment/__main__.py)

try:  # (Ctrl-C while torch and Ray load: one line, not an import traceback)
    from .cli import main
except KeyboardInterrupt:
    print("interrupted before the sweep started: nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
