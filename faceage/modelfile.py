"""The exported model file: weights plus everything inference needs, loadable without a config.

A model file is a ``torch.save`` dict of plain types (loaded with ``weights_only=True``):
``{"format": "faceage-model", "format_version": 1, "metadata_json": str, "state_dict": {...}}``.
The metadata names the backbone and head, the preprocessing (input size, normalisation), the
crop policy the training images were framed with, a summary of the training data, the metrics
and the full training config.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceage import __version__
from faceage.errors import UserError
from faceage.models import AgeRegressor
from faceage.preprocess import crops_to_batch

FORMAT = "faceage-model"
FORMAT_VERSION = 1
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "faceage-default.pt"


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:12]


def save_model_file(model: AgeRegressor, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` and ``metadata`` (JSON-serialisable) to ``path``; returns the path."""
    inner = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in inner.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "faceage_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": inner.backbone_name,
        "head_hidden": inner.head[0].out_features,
        "dropout": inner.head[2].p,
        **metadata,
    }
    meta.setdefault("name", f"faceage-{inner.backbone_name}")
    meta["version"] = f"{__version__}+{_weights_digest(state)}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION,
                "metadata_json": json.dumps(meta), "state_dict": state}, buf)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and state_dict of a model file, with a clear error for anything else."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model file not found: {p}")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{p} is not a faceage model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise UserError(f"{p} is not a faceage model file (export one with `faceage train`)")
    if blob.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{p} was written by a newer faceage (format {blob['format_version']}); upgrade faceage"
        )
    return json.loads(blob["metadata_json"]), blob["state_dict"]


@dataclass
class AgeModel:
    """A loaded model file: the network in eval mode and its metadata; predicts from face crops."""

    net: AgeRegressor
    metadata: dict[str, Any]
    device: torch.device

    @property
    def input_size(self) -> int:
        return int(self.metadata["preprocessing"]["input_size"])

    @property
    def crop_policy(self) -> dict[str, Any]:
        return dict(self.metadata.get("crop_policy") or {"name": "utkface-chip"})

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "faceage"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unknown"))

    def preprocess(self, crops: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 RGB face crops → a normalised batch, exactly as at evaluation time."""
        return crops_to_batch(crops, self.metadata["preprocessing"])

    @torch.inference_mode()
    def predict_batch(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        x = batch.to(self.device)
        ages = self.net(x)
        if tta:
            ages = (ages + self.net(torch.flip(x, dims=[3]))) / 2
        return ages.float().cpu().numpy()

    def predict(self, crops: list[np.ndarray], tta: bool = False,
                batch_size: int = 64) -> np.ndarray:
        """Ages for a list of face crops (any square size; resized to the model's input)."""
        out = []
        for i in range(0, len(crops), batch_size):
            out.append(self.predict_batch(self.preprocess(crops[i:i + batch_size]), tta=tta))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def predict_groups(self, groups: Sequence[Sequence[np.ndarray]],
                       tta: bool = False) -> list[np.ndarray]:
        """Ages for each group of crops (one image's faces, one request's), in one model call.

        ``faceage predict`` groups the faces of several images, the Serve AgeRegressor the crops
        of concurrent requests (``@serve.batch``); each group gets its own slice of ages back.
        """
        counts = [len(g) for g in groups]
        ages = self.predict([c for g in groups for c in g], tta=tta)
        bounds = np.cumsum([0, *counts])
        return [ages[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def load_model_file(path: str | Path | None = None, device: str = "cpu") -> AgeModel:
    """Load a model file (default: the shipped model) ready for inference."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not path.exists() and path == DEFAULT_MODEL_PATH:
        raise UserError(
            f"the default model {path} is missing; pass --model with a file from `faceage train`"
        )
    meta, state = read_model_file(path)
    net = AgeRegressor(meta["backbone"], head_hidden=int(meta["head_hidden"]),
                       dropout=float(meta.get("dropout", 0.0)))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not match backbone {meta['backbone']}: {exc}"
        ) from None
    dev = torch.device(device)
    net.to(dev).eval()
    return AgeModel(net, meta, dev)
