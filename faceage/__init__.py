"""faceage: face age regression trained on Ray."""

from pathlib import Path

__version__ = "0.1.0"

# The shipped model (models/MODEL_CARD.md): every command, Serve and the app use it by default.
# Here rather than in faceage.inference.modelfile so that code without torch (the Serve
# Ingress) can name it.
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "faceage-default.pt"
