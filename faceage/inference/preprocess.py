"""Model input: how a face crop becomes a normalised tensor, and the metadata that records it.

Inference code (``faceage.inference.modelfile``, the Serve replicas, ``faceage predict``) imports
this module and never the training modules: ``faceage.data.datasets`` brings pandas, the decode
cache and the augmentation. Training uses the same ``eval_transform`` for validation, so the
transform lives once and every model file records it (``preprocessing_metadata``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2 as T

from faceage.models.backbones import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """uint8 CHW face crop (or a BCHW batch of them) → normalised float tensor at ``input_size``."""
    return T.Compose([
        T.Resize((input_size, input_size), antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean, std),
    ])


def preprocessing_metadata(input_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> dict:
    """What inference needs to reproduce the eval transform; stored in the model file (each
    backbone has its own ``mean`` and ``std``: ``faceage.models.backbones``)."""
    return {
        "input_size": input_size,
        "resize": "bilinear-antialias, whole crop to input_size x input_size",
        "mean": list(mean),
        "std": list(std),
        "color": "RGB",
    }


def closer_view(images: torch.Tensor, share: float | None) -> torch.Tensor:
    """The centre of (B)CHW images, ``share`` of each side: the face seen closer (one of the
    views the mirror average takes with a model's ``tta_zoom``). As many pixels go from each
    edge, so the closer view of a mirror image is the mirror image of the closer view."""
    if share is None or share >= 1:
        return images
    h, w = images.shape[-2:]
    top, left = round(h * (1 - share) / 2), round(w * (1 - share) / 2)
    return images[..., top:h - top, left:w - left]


def crops_to_batch(crops: Sequence[np.ndarray], preprocessing: dict,
                   zoom: float | None = None) -> torch.Tensor:
    """HxWx3 uint8 RGB face crops → a normalised batch, as ``preprocessing`` metadata says
    (``zoom``: of each crop's ``closer_view``)."""
    tf = eval_transform(int(preprocessing["input_size"]), preprocessing["mean"],
                        preprocessing["std"])
    # np.require copies only read-only or strided arrays (np.asarray(PIL image) is read-only).
    tensors = [torch.from_numpy(np.require(c, np.uint8, ["C", "W"])) for c in crops]
    return torch.stack([tf(closer_view(t.permute(2, 0, 1), zoom)) for t in tensors])
