"""The ``faceage`` command: prepare, train, tune, evaluate, predict, up."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from faceage import __version__
from faceage.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from faceage.config import load_config
    from faceage.train import flat_overrides, run_training

    run_training(load_config(args.config, flat_overrides(args)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from faceage.train import add_train_arguments

    p = argparse.ArgumentParser(prog="faceage", description="Face age regression on Ray.")
    p.add_argument("--version", action="version", version=f"faceage {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a model with Ray Train and export it",
                       description="Train with Ray Train (progressive unfreezing) and export "
                                   "the best checkpoint as a model file.")
    add_train_arguments(t)
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
