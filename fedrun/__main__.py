"""``python -m fedrun ...`` and ``torchrun -m fedrun ...``."""

import sys

from fedrun.cli import main

sys.exit(main())
