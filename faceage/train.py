"""``python -m faceage.train ...``: the same as ``faceage train ...`` (e.g. in a Ray job)."""

import sys

from faceage.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
