"""Command-line options several commands share (``faceage train``, ``tune``, the local Serve)."""

from __future__ import annotations

import argparse


def add_set_argument(p: argparse.ArgumentParser,
                     help: str = "override a setting, e.g. train.batch_size=32") -> None:
    """The one ``--set`` option: ``--set a=1 b=2`` and ``--set a=1 --set b=2`` alike give
    ``args.overrides == ["a=1", "b=2"]``, each item read by ``parse_override``."""
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help=help)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE ...`` as ``faceage train`` takes them."""
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    add_set_argument(p)


# What runs a network at inference (faceage.inference.engines).
ENGINES = ("auto", "torch", "onnxruntime")


def add_engine_argument(p: argparse.ArgumentParser) -> None:
    """``--engine``: torch, ONNX Runtime, or auto (the faster per network on this CPU)."""
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="what runs the detector's nets and the age network: torch, onnxruntime "
                        "(CPU), or auto: whichever is faster for each net here, from a short "
                        "probe at load (default)")
