"""The exported model file: weights plus everything inference needs, loadable without a config.

A model file is a ``torch.save`` dict of plain types (loaded with ``weights_only=True``):
``{"format": "faceage-model", "format_version": 1, "metadata_json": str, "state_dict": {...}}``.
The metadata names the backbone and head (``uncertainty``: ``laplace`` for a two-output head
that predicts a scale per face, else ``none``), the preprocessing (input size, normalisation),
the crop policy the training images were framed with, the age-interval calibration
(``interval_calibration``, fitted on the validation split), a summary of the training data, the
metrics and the full training config.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceage import DEFAULT_MODEL_PATH, __version__
from faceage.errors import UserError
from faceage.inference.engines import EngineChoice, Runner, choose_runner
from faceage.inference.interval import (  # noqa: F401 (AgeEstimates: re-exported, its old home)
    DEFAULT_COVERAGE,
    AgeEstimates,
    IntervalCalibration,
    check_coverage,
)
from faceage.inference.preprocess import crops_to_batch
from faceage.models.network import AgeNet, head_uncertainty

FORMAT = "faceage-model"
FORMAT_VERSION = 1
# A model file with neither a calibration nor a val MAE (hand-made, or metrics stripped) gets a
# Laplace interval as if its MAE were this many years: wide, and said so in its note.
FALLBACK_MAE = 8.0


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].numpy().tobytes())
    return h.hexdigest()[:12]


def save_model_file(model: AgeNet, path: str | Path, metadata: dict[str, Any]) -> Path:
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
        "uncertainty": getattr(inner, "uncertainty", "none"),
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


class _AgesAndScales(torch.nn.Module):
    """``AgeNet.forward_with_scale`` as one module with tensor outputs only (what an ONNX export
    and a runner need): ``(ages,)`` or ``(ages, scales)``."""

    def __init__(self, net: AgeNet):
        super().__init__()
        self.net = net
        self.train(net.training)  # a new Module is in train mode; it follows the network's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ages, scales = self.net.forward_with_scale(x)
        return (ages,) if scales is None else (ages, scales)


@dataclass
class AgeModel:
    """A loaded model file: the network in eval mode and its metadata; predicts from face crops.

    ``runner`` runs the network (torch, or ONNX Runtime on an export of it: ``engine``)."""

    net: AgeNet
    metadata: dict[str, Any]
    device: torch.device
    runner: Runner | None = None
    engine: EngineChoice | None = None

    def __post_init__(self) -> None:
        if self.runner is None:
            self.runner, self.engine = choose_runner("age", _AgesAndScales(self.net),
                                                     self._example(), "torch", self.device)

    def _example(self, batch: int = 8) -> torch.Tensor:
        """A batch as the regressor sees them: what the ``auto`` probe times and exports with."""
        size = self.input_size
        return torch.rand(batch, 3, size, size, device=self.device)

    @property
    def input_size(self) -> int:
        return int(self.metadata["preprocessing"]["input_size"])

    @property
    def flip_average(self) -> bool:
        """Whether this model's ages are the mean of each face and its mirror image: how it was
        validated and its interval calibrated (``train.eval_tta``), so the default of every
        route (``faceage predict``, ``evaluate``, Serve); a face and its mirror then read the
        same. Model files written before this was recorded say no."""
        return bool(self.metadata.get("flip_average", False))

    @property
    def tta_zoom(self) -> float | None:
        """With the mirror average on, each face is also seen closer: the centre ``tta_zoom``
        of each side of its crop (``closer_view``), with its mirror image, and the ages and
        scales are the mean of the four views (``train.eval_zoom``, how the model was validated
        and its interval calibrated). None: the face and its mirror only."""
        zoom = self.metadata.get("tta_zoom")
        return None if zoom is None else float(zoom)

    def resolve_tta(self, tta: bool | None) -> bool:
        """``tta`` as asked (``--tta``/``--no-tta``, ``args.tta``), else ``flip_average``."""
        return self.flip_average if tta is None else bool(tta)

    @property
    def crop_policy(self) -> dict[str, Any]:
        return dict(self.metadata.get("crop_policy") or {"name": "utkface-chip"})

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "faceage"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "unknown"))

    @functools.cached_property
    def calibration(self) -> IntervalCalibration:
        """The model file's interval calibration; for files from before intervals, a Laplace
        interval from its val MAE (±ln(5)·MAE at 80 %, the same width for every face)."""
        return calibration_of(self.metadata)

    def interval_info(self, coverage: float = DEFAULT_COVERAGE) -> dict[str, Any]:
        """What ``/model`` and reports say about the intervals at ``coverage``."""
        cal = self.calibration
        lo, hi = cal.bounds(coverage)
        if cal.method == "scaled-residual":
            how = (f"calibrated on {cal.samples} validation faces; the width follows the "
                   "scale the model predicts for each face")
        elif cal.method == "residual":
            how = f"calibrated on {cal.samples} validation faces; the same width for every face"
        else:
            how = ("the model file has no calibration: a symmetric interval of ±ln(5)·MAE at "
                   "80 % (±ln(1/(1-c))·MAE at coverage c: Laplace errors with the file's val "
                   "MAE), the same width for every face")
        if cal.bands:
            how += ("; calibrated per band of predicted age (from " + ", ".join(
                f"{b:g}" for b in cal.bands) + "), every source weighing the same")
        return {"coverage": check_coverage(coverage), "method": cal.method,
                "samples": cal.samples, "note": cal.note, "description": how,
                **({"bands": {f"{b:g}": [round(v, 3) for v in cal.bounds(coverage, i)]
                              for i, b in enumerate(cal.bands)}} if cal.bands else {}),
                "uncertainty": self.net.uncertainty,
                "residual_bounds": [round(lo, 3), round(hi, 3)],
                "per_face_width": cal.method == "scaled-residual"}

    def preprocess(self, crops: list[np.ndarray], zoom: float | None = None) -> torch.Tensor:
        """HxWx3 uint8 RGB face crops → a normalised batch, exactly as at evaluation time
        (``zoom``: of their ``closer_view``)."""
        return crops_to_batch(crops, self.metadata["preprocessing"], zoom)

    @torch.inference_mode()
    def predict_batch_with_scale(self, batch: torch.Tensor,
                                 tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Ages and Laplace scales (None for a one-output head) of a preprocessed batch."""
        x = batch.to(self.device)
        n = len(x)
        if tta:  # each face and its mirror image in one call, averaged
            x = torch.cat([x, torch.flip(x, dims=[3])])
        out = [o.float() for o in self.runner(x)]
        if tta:
            out = [(o[:n] + o[n:]) / 2 for o in out]
        return out[0].cpu().numpy(), (out[1].cpu().numpy() if len(out) > 1 else None)

    def predict_batch(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        return self.predict_batch_with_scale(batch, tta)[0]

    def predict_with_scale(self, crops: list[np.ndarray], tta: bool = False,
                           batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """Ages and scales (years; None for a one-output head) for a list of face crops; with
        ``tta``, the mean over each face and its mirror image (and their ``tta_zoom`` views)."""
        zooms = (None, self.tta_zoom) if tta and self.tta_zoom else (None,)
        ages, scales = [], []
        for i in range(0, len(crops), batch_size):
            chunk = crops[i:i + batch_size]
            batch = torch.cat([self.preprocess(chunk, zoom) for zoom in zooms])
            a, s = self.predict_batch_with_scale(batch, tta)
            ages.append(a.reshape(len(zooms), -1).mean(axis=0))
            scales.append(None if s is None else s.reshape(len(zooms), -1).mean(axis=0))
        if not ages:
            empty = np.zeros(0, dtype=np.float32)
            return empty, (None if self.net.uncertainty == "none" else empty)
        return np.concatenate(ages), (None if scales[0] is None else np.concatenate(scales))

    def predict(self, crops: list[np.ndarray], tta: bool = False,
                batch_size: int = 64) -> np.ndarray:
        """Ages for a list of face crops (any square size; resized to the model's input)."""
        return self.predict_with_scale(crops, tta, batch_size)[0]

    def estimate(self, crops: list[np.ndarray], tta: bool = False,
                 coverage: float = DEFAULT_COVERAGE, batch_size: int = 64) -> AgeEstimates:
        """Ages with their central ``coverage`` intervals for a list of face crops."""
        ages, scales = self.predict_with_scale(crops, tta, batch_size)
        low, high = self.calibration.interval(ages, scales, coverage)
        return AgeEstimates(ages, low.astype(np.float32), high.astype(np.float32))

    def predict_groups(self, groups: Sequence[Sequence[np.ndarray]], tta: bool = False,
                       coverage: float = DEFAULT_COVERAGE) -> list[AgeEstimates]:
        """Ages and intervals for each group of crops (one image's faces, one request's), in
        one model call.

        ``faceage predict`` groups the faces of several images, the Serve AgeRegressor the crops
        of concurrent requests (``@serve.batch``); each group gets its own slice back.
        """
        counts = [len(g) for g in groups]
        est = self.estimate([c for g in groups for c in g], tta=tta, coverage=coverage)
        bounds = np.cumsum([0, *counts])
        return [est[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def calibration_of(metadata: dict[str, Any]) -> IntervalCalibration:
    """The interval calibration a model file's metadata carries, or its fallback: Laplace from
    the val MAE (files from before intervals), else Laplace from ``FALLBACK_MAE`` years."""
    stored = metadata.get("interval_calibration")
    if stored:
        try:
            return IntervalCalibration.from_metadata(stored)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the model file's interval_calibration is unreadable: {exc}") from None
    mae = (metadata.get("metrics") or {}).get("val_mae")
    if mae is not None and np.isfinite(float(mae)) and float(mae) > 0:
        return IntervalCalibration.from_val_mae(float(mae))
    cal = IntervalCalibration.from_val_mae(FALLBACK_MAE)
    return replace(cal, note=f"no calibration and no val MAE in the model file; Laplace with an "
                             f"assumed MAE of {FALLBACK_MAE:g} years")


def load_model_file(path: str | Path | None = None, device: str = "cpu",
                    engine: str = "torch") -> AgeModel:
    """Load a model file (default: the shipped model) ready for inference, the network run by
    ``engine`` (faceage.inference.engines; ``auto``: the faster of torch and ONNX Runtime on
    this CPU, from a short probe)."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not path.exists() and path == DEFAULT_MODEL_PATH:
        raise UserError(
            f"the default model {path} is missing; pass --model with a file from `faceage train`"
        )
    meta, state = read_model_file(path)
    net = AgeNet(meta["backbone"], head_hidden=int(meta["head_hidden"]),
                       dropout=float(meta.get("dropout", 0.0)),
                       uncertainty=meta.get("uncertainty") or head_uncertainty(state))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(
            f"{path}: weights do not match backbone {meta['backbone']}: {exc}"
        ) from None
    dev = torch.device(device)
    net.to(dev).eval().requires_grad_(False)
    model = AgeModel(net, meta, dev)
    if engine != "torch":
        model.runner, model.engine = choose_runner("age", _AgesAndScales(net), model._example(),
                                                   engine, dev)
    return model
