"""What Serve answered against what ``faceage predict --json`` prints for the same photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from faceage.cli import main as faceage_main


def cli_faces(model: Path, *paths: Path, capsys) -> dict[str, list[dict]]:
    """``faceage predict --json`` in this process: faces per path. On one torch thread, as
    Serve's replicas run: on some CPUs oneDNN's kernels for 1 and 2 threads differ in the last
    bits, enough to move an age by 0.02 years."""
    import torch

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert faceage_main(["predict", "--json", "--model", str(model), *map(str, paths)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return {Path(r["path"]).name: r["faces"] for r in lines}


def assert_same_faces(got: list[dict], want: list[dict]) -> None:
    """Boxes, scores, landmarks and ages as the CLI printed them.

    The CLI and Serve run the same code on the same bytes, but Serve's replicas run torch on one
    thread and batch crops from other requests, so a float may round the other way: allow one
    step of the printed rounding (0.1 px, 0.0001 score, 0.01 years) and nothing more.
    """
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w) == {"box", "score", "age", "age_interval", "landmarks"}
        assert np.allclose(g["box"], w["box"], rtol=0, atol=0.1 + 1e-6)
        assert np.allclose(g["landmarks"], w["landmarks"], rtol=0, atol=0.1 + 1e-6)
        assert abs(g["score"] - w["score"]) <= 1e-4 + 1e-9
        assert abs(g["age"] - w["age"]) <= 0.01 + 1e-9
        low, high = g["age_interval"]
        assert 0 <= low <= g["age"] <= high
        assert np.allclose(g["age_interval"], w["age_interval"], rtol=0, atol=0.01 + 1e-6)
