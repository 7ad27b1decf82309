"""``python -m fsdp_fuzz`` (and ``python -m fuzz`` from a checkout): see ``fsdp_fuzz.cli``."""

import sys

from fsdp_fuzz.cli import main

if __name__ == "__main__":
    sys.exit(main())
