"""What Serve answered against what ``faceage predict --json`` prints for the same photos."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

from faceage.cli import main as faceage_main


def served_engines(info: dict) -> dict[str, str]:
    """The runtime Serve runs each network on (``/model``): ``{"age": ..., "pnet": ...}``."""
    detector = info["detector"]["engines"]
    return {"age": info["engine"]["engine"], **{n: e["engine"] for n, e in detector.items()}}


def auto_pick(probe_ms: dict[str, float]) -> str:
    """What ``auto`` must pick from its probe's medians: ONNX Runtime where it takes under 1/1.1
    of torch's time, else torch (stated here apart from faceage.inference.engines)."""
    return "onnxruntime" if probe_ms["onnxruntime"] * 1.1 < probe_ms["torch"] else "torch"


@contextmanager
def engines_pinned(engines: dict[str, str]) -> Iterator[None]:
    """``auto`` in this process picks ``engines[network]`` instead of probing.

    The probe times both runtimes, so two processes may pick differently where they are close,
    and torch and ONNX Runtime agree as the parity tests ask (0.1 years), not to the last printed
    digit. Comparing Serve with the CLI means comparing the same runtimes: the CLI takes
    Serve's picks."""
    from faceage.inference import detection, modelfile
    from faceage.inference import engines as engines_module
    from faceage.inference.mtcnn import nets

    choose = engines_module.choose_runner

    def pinned(network, module, example, engine, *args, **kwargs):
        return choose(network, module, example,
                      engines.get(network, engine) if engine == "auto" else engine,
                      *args, **kwargs)

    with mock.patch.object(modelfile, "choose_runner", pinned), \
            mock.patch.object(nets, "choose_runner", pinned), \
            mock.patch.dict(detection._MTCNN_NETS, clear=True):  # none loaded unpinned
        yield


def cli_faces(model: Path, *paths: Path, capsys,
              engines: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """``faceage predict --json`` in this process: faces per path. On one torch thread, as
    Serve's replicas run: on some CPUs oneDNN's kernels for 1 and 2 threads differ in the last
    bits, enough to move an age by 0.02 years. ``engines``: the runtime per network where the
    CLI would pick one (``served_engines``), else each is probed as usual."""
    import torch

    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with engines_pinned(engines or {}):
            code = faceage_main(["predict", "--json", "--model", str(model), *map(str, paths)])
        assert code == 0
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
