"""The ``faceage`` command: prepare, train, tune, evaluate, predict, up, feedback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from faceage import DEFAULT_MODEL_PATH, __version__, bundled_path
from faceage.errors import TrainingFailed, UserError
from faceage.runtime import apply_ray_env_defaults


def _cmd_train(args: argparse.Namespace) -> int:
    from faceage.config import load_config
    from faceage.training.driver import run_training

    run_training(load_config(args.config, args.overrides))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from faceage.training.tune.driver import run_tune_command

    return run_tune_command(args)


def _cmd_predict(args: argparse.Namespace) -> int:
    from faceage.inference.predict import run_predict

    return run_predict(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from faceage.training.evaluate import run_evaluate

    return run_evaluate(args)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from faceage.data.prepare import run_prepare_command

    return run_prepare_command(args)


def _cmd_up(args: argparse.Namespace) -> int:
    from faceage.up import run_up

    return run_up(args)


def _cmd_feedback(args: argparse.Namespace) -> int:
    from faceage.feedback import run_feedback_command

    return run_feedback_command(args)


COMMANDS = ("train", "tune", "prepare", "predict", "evaluate", "up", "feedback")


def model_file_metadata(path: Path) -> dict:
    """A model file's metadata without torch: the JSON string inside ``torch.save``'s zip.

    The pickle is read with every class it names replaced by an inert stand-in, so nothing the
    file names is imported or run (the tensors are skipped, not rebuilt)."""
    import io
    import json
    import pickle
    import zipfile

    class Inert(dict):
        def __setstate__(self, state):
            pass

    def inert(*_args, **_kwargs):
        return Inert()

    class MetadataOnly(pickle.Unpickler):
        def find_class(self, module, name):
            return inert

        def persistent_load(self, pid):
            return None

    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        blob = MetadataOnly(io.BytesIO(archive.read(min(pickles, key=len)))).load()
    return json.loads(blob["metadata_json"])


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
    def wanted(name: str) -> bool:
        return command is None or command == name

    p = argparse.ArgumentParser(prog="faceage", description="Face age regression on Ray.")
    p.add_argument("--version", action=_VersionAction,
                   help="show the version of faceage and of its default model, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train a model with Ray Train and export it",
                       description="Train with Ray Train (progressive unfreezing) and export "
                                   "the best checkpoint as a model file.")
    if wanted("train"):
        from faceage.config import add_train_arguments

        add_train_arguments(t)
    t.set_defaults(func=_cmd_train)

    tu = sub.add_parser("tune", help="compare backbones and schedules with Ray Tune (ASHA)",
                        description="Ray Tune over training runs (one TorchTrainer per trial, "
                                    "ASHA on val MAE); writes a results table, a plot and the "
                                    "best trial's model file.")
    if wanted("tune"):
        from faceage.training.tune.driver import add_tune_arguments

        add_tune_arguments(tu)
    tu.set_defaults(func=_cmd_tune)

    pr = sub.add_parser("prepare", help="detect and align faces of a data set with Ray Data",
                        description="Detect, align and crop every image's face in parallel "
                                    "(Ray Data), writing crops, index.csv and prepare.json.")
    if wanted("prepare"):
        from faceage.data.prepare import add_prepare_arguments

        add_prepare_arguments(pr)
    pr.set_defaults(func=_cmd_prepare)

    pd_ = sub.add_parser("predict", help="ages of the faces in photos, folders or a video",
                         description="Detect, align and estimate the age of every face.")
    if wanted("predict"):
        from faceage.inference.predict import add_predict_arguments

        add_predict_arguments(pd_)
    pd_.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="MAE, RMSE, CS@5 of a model file on a labelled set",
                        description="Evaluate a model file; writes a JSON report and a PNG.")
    if wanted("evaluate"):
        from faceage.training.evaluate import add_evaluate_arguments

        add_evaluate_arguments(ev)
    ev.set_defaults(func=_cmd_evaluate)

    up = sub.add_parser("up", help="Ray head, dashboard, Serve API and Streamlit app, locally",
                        description="Start a Ray head with its dashboard (or use $RAY_ADDRESS), "
                                    "the Serve application of serve/config.yaml and the "
                                    "Streamlit app; Ctrl-C stops them all.")
    if wanted("up"):
        from faceage.up import add_up_arguments

        add_up_arguments(up)
    up.set_defaults(func=_cmd_up)

    fb = sub.add_parser("feedback", help="list or delete the corrections users sent the server",
                        description="The corrections a server with --feedback-dir stored: "
                                    "list them, or delete some or all (rows and face crops).")
    if wanted("feedback"):
        from faceage.feedback import add_feedback_arguments

        add_feedback_arguments(fb)
    fb.set_defaults(func=_cmd_feedback)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything imports Ray (see faceage.runtime.RAY_ENV_DEFAULTS).
    apply_ray_env_defaults()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    if getattr(args, "config", None) and args.command in ("train", "tune", "evaluate"):
        args.config = packaged_config(args.config)
    try:
        return args.func(args)
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
