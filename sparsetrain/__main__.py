import sys

from .experiment.study import main

sys.exit(main())
