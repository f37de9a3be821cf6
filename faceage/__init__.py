"""faceage: face age regression trained on Ray."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# The one place the version is written: pyproject.toml reads it ([tool.hatch.version]).
__version__ = "0.1.0"

_PACKAGE_DIR = Path(__file__).resolve().parent


def _find_checkout() -> Path | None:
    """The source checkout this package is imported from (``uv sync``, ``PYTHONPATH=.``, a Ray
    job's uploaded working_dir), or None for an installed wheel."""
    root = _PACKAGE_DIR.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "faceage"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


# Where the checkout's files are (models/, configs/, serve/config.yaml); None outside one.
CHECKOUT: Path | None = _find_checkout()


def bundled_path(relative: str) -> Path:
    """A file the project ships beside the code (``models/faceage-default.pt``, ``configs/X.yaml``,
    ``serve/config.yaml``), by its path in the checkout.

    In a checkout, the checkout's own file (the one a user edits); in an installed wheel, the
    copy the wheel carries under ``faceage/_bundled/`` (pyproject.toml's force-include). The
    path is returned whether or not the file exists: callers say what is missing.
    """
    if CHECKOUT is not None:
        return CHECKOUT / relative
    return Path(str(files(__name__).joinpath("_bundled", *Path(relative).parts)))


# The shipped model (models/MODEL_CARD.md): every command, Serve and the app use it by default.
# Here rather than in faceage.inference.modelfile so that code without torch (the Serve
# Ingress) can name it.
DEFAULT_MODEL_PATH = bundled_path("models/faceage-default.pt")
