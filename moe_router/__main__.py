"""``python -m moe_router``: the ``moe-router`` command line."""

import sys

from moe_router.cli import main

if __name__ == "__main__":
    sys.exit(main())
