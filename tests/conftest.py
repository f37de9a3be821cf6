"""Shared, session-scoped test fixtures (add yours; do not rewrite others')."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared"
UTKFACE = SHARED / "data" / "utkface"


@pytest.fixture(scope="session")
def untrained_model_file(tmp_path_factory) -> Path:
    """A real model file (MobileNetV2, untrained weights, 96 px input): plumbing, not accuracy."""
    import torch

    from faceage.data import preprocessing_metadata
    from faceage.modelfile import save_model_file
    from faceage.models import build_model

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", "none", 64, 0.0)
    path = tmp_path_factory.mktemp("models") / "untrained.pt"
    return save_model_file(model, path, {
        "name": "faceage-untrained-test",
        "preprocessing": preprocessing_metadata(96),
        "crop_policy": {"name": "utkface-chip"},
        "data": {"note": "untrained weights, for tests"},
    })


@pytest.fixture(scope="session")
def astronaut_path() -> Path:
    """NASA's public-domain portrait of Eileen Collins (512x512, one face)."""
    return TEST_DATA / "astronaut.jpg"


@pytest.fixture(scope="session")
def rocket_path() -> Path:
    """A public-domain launch photo without a face."""
    return TEST_DATA / "rocket.jpg"
