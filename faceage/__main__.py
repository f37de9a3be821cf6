"""``python -m faceage ...``: the same as the ``faceage`` command."""

import sys

from faceage.cli import main

if __name__ == "__main__":
    sys.exit(main())
