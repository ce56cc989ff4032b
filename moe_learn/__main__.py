"""``python -m moe_learn``: the same command as ``moe-learn``."""

import sys

from moe_learn.course.cli import main

sys.exit(main())
