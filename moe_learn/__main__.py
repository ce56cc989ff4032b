"""``python -m moe_learn``: the same command as ``moe-learn``."""

import sys

from .cli import main

sys.exit(main())
