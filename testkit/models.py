"""Untrained model files: real files of the format faceage reads, for plumbing and speed (their
ages mean nothing)."""

from __future__ import annotations

from pathlib import Path


def untrained_model_file(path: str | Path, backbone: str | None = None,
                         head_hidden: int | None = None, input_size: int | None = None,
                         name: str = "untrained") -> Path:
    """A model file with untrained weights; the default recipe's backbone, head and input size
    unless given."""
    import torch

    from faceage.config import Config
    from faceage.inference.modelfile import save_model_file
    from faceage.inference.preprocess import preprocessing_metadata
    from faceage.models.network import build_model

    m = Config().model
    torch.manual_seed(0)
    net = build_model(backbone or m.backbone, "none", head_hidden or m.head_hidden, 0.0)
    return save_model_file(net, Path(path), {
        "name": name,
        "preprocessing": preprocessing_metadata(input_size or m.input_size),
        "crop_policy": {"name": "utkface-chip"},
        "data": {"note": "untrained weights, for tests and benchmarks"},
    })
