"""The ``faceage`` command: prepare, train, tune, evaluate, calibrate, predict, up, corrections."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from faceage import DEFAULT_MODEL_PATH, __version__, bundled_path
from faceage.errors import TrainingFailed, UserError
from faceage.inference.model_metadata import model_file_metadata
from faceage.runtime import apply_ray_env_defaults


@dataclass(frozen=True)
class Command:
    """One ``faceage`` subcommand: its help texts, the function that adds its options and the
    one that runs it, each named ``module:function`` and imported only when that command runs
    (``faceage predict`` then loads no training code: pandas, Ray Train, Ray Data).
    ``aliases``: old names that still work (argparse aliases)."""

    name: str
    help: str
    description: str
    arguments: str
    run: str
    aliases: tuple[str, ...] = ()


COMMAND_TABLE = (
    Command("train", "train a model with Ray Train and export it",
            "Train with Ray Train (progressive unfreezing) and export the best checkpoint as a "
            "model file.",
            "faceage.arguments:add_train_arguments", "faceage.training.driver:run_train_command"),
    Command("tune", "compare backbones and schedules with Ray Tune (ASHA)",
            "Ray Tune over training runs (one TorchTrainer per trial, ASHA on val MAE); writes "
            "a results table, a plot and the best trial's model file.",
            "faceage.training.tune.driver:add_tune_arguments",
            "faceage.training.tune.driver:run_tune_command"),
    Command("prepare", "detect and align faces of a data set with Ray Data",
            "Detect, align and crop every image's face in parallel (Ray Data), writing crops, "
            "index.csv and prepare.json.",
            "faceage.data.prepare:add_prepare_arguments",
            "faceage.data.prepare:run_prepare_command"),
    Command("predict", "ages of the faces in photos, folders or a video",
            "Detect, align and estimate the age of every face.",
            "faceage.inference.predict:add_predict_arguments",
            "faceage.inference.predict:run_predict"),
    Command("evaluate", "MAE, RMSE, CS@5 of a model file on a labelled set",
            "Evaluate a model file; writes a JSON report and a PNG.",
            "faceage.training.evaluate:add_evaluate_arguments",
            "faceage.training.evaluate:run_evaluate"),
    Command("calibrate", "refit a model file's age interval on validation faces",
            "Predict the val split of a training config's sources by the path faceage predict "
            "takes and refit the model's age interval on it; writes a new model file.",
            "faceage.training.calibrate:add_calibrate_arguments",
            "faceage.training.calibrate:run_calibrate_command"),
    Command("up", "Ray head, dashboard, Serve API and Streamlit app, locally",
            "Start a Ray head with its dashboard (or use $RAY_ADDRESS), the Serve application of "
            "serve/config.yaml and the Streamlit app; Ctrl-C stops them all.",
            "faceage.up:add_up_arguments", "faceage.up:run_up"),
    Command("corrections", "list or delete the corrections users sent the server",
            "The corrections a server with --corrections-dir stored: list them, or delete some "
            "or all (rows and face crops). (`faceage feedback`: its deprecated old name.)",
            "faceage.corrections_cli:add_corrections_arguments",
            "faceage.corrections_cli:run_corrections_command", aliases=("feedback",)),
)
COMMANDS = tuple(c.name for c in COMMAND_TABLE)
# Every name a subcommand answers to, its deprecated aliases included -> its command's name.
COMMAND_NAMES = {name: c.name for c in COMMAND_TABLE for name in (c.name, *c.aliases)}


def _function(name: str) -> Callable:
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)




def version_text() -> str:
    """``faceage --version``: the package's version and where it runs from, and the default
    model's name and version (read from its file, without loading torch)."""
    import faceage

    lines = [f"faceage {__version__} ({Path(faceage.__file__).parent})"]
    try:
        meta = model_file_metadata(DEFAULT_MODEL_PATH)
        lines.append(f"default model {meta.get('name', '?')} {meta.get('version', '?')} "
                     f"({DEFAULT_MODEL_PATH})")
    except FileNotFoundError:
        lines.append(f"default model: none ({DEFAULT_MODEL_PATH} is missing)")
    except Exception as exc:  # a damaged or foreign file must not break --version
        lines.append(f"default model: unreadable ({DEFAULT_MODEL_PATH}: {type(exc).__name__})")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it reads the model file)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def packaged_config(name: str | None) -> str | None:
    """``--config NAME``: NAME itself when it exists; else, for ``configs/X.yaml`` or ``X.yaml``
    that faceage ships (an installed wheel outside a checkout), the packaged copy, with a note."""
    if not name or Path(name).expanduser().exists() or Path(name).is_absolute():
        return name
    parts = Path(name).parts
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "configs"):
        return name
    shipped = bundled_path(f"configs/{parts[-1]}")
    if not shipped.is_file():
        return name
    print(f"faceage: no {name} here; using the config faceage ships, {shipped}", file=sys.stderr)
    return str(shipped)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``faceage`` parser. Given ``command``, only that subcommand's options are imported and
    added: ``faceage predict`` then loads no training code (pandas, Ray Train, Ray Data)."""
    p = argparse.ArgumentParser(prog="faceage", description="Face age regression on Ray.")
    p.add_argument("--version", action=_VersionAction,
                   help="show the version of faceage and of its default model, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in COMMAND_TABLE:
        parser = sub.add_parser(c.name, aliases=list(c.aliases), help=c.help,
                                description=c.description)
        if command is None or command == c.name:
            _function(c.arguments)(parser)
        parser.set_defaults(run=c.run)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything imports Ray (see faceage.runtime.RAY_ENV_DEFAULTS).
    apply_ray_env_defaults()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMAND_NAMES.get(argv[0]) if argv else None
    if command is not None and command != argv[0]:
        print(f"faceage: `faceage {argv[0]}` is a deprecated name of `faceage {command}`; use "
              "that", file=sys.stderr)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "config", None) and args.command in ("train", "tune", "evaluate"):
        args.config = packaged_config(args.config)
    try:
        return _function(args.run)(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
