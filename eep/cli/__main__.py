"""``python -m eep.cli``: the ``eep`` console script."""

import sys

from eep.cli import main

sys.exit(main())
