"""``python -m sandbox_kernel.server``: the same as ``sandbox-kernel serve``."""

import sys

from . import main

sys.exit(main())
