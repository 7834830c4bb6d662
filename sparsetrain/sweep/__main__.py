import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the experiment's CLI (experiment/__main__.py)

from .cli import main  # noqa: E402

sys.exit(main())
