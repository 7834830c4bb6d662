import sys

from .config import config_from_args

config_from_args(sys.argv[1:])  # argument errors first: one line and exit 2 before the study's imports

from .study import main  # noqa: E402

sys.exit(main())
