"""``python -m faceage.tune ...``: the same as ``faceage tune ...`` (e.g. in a Ray job)."""

import sys

from faceage.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
