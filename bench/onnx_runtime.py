"""torch against ONNX Runtime for each network faceage runs at inference (ms per call).

    uv run python bench/onnx_runtime.py                       # 5 rounds, 1 and 2 threads
    uv run python bench/onnx_runtime.py --rounds 7 --model models/faceage-default.pt

Networks and inputs, as the pipeline calls them: P-net on every pyramid level of a 640x480
frame (20 px faces), R-net on 128 candidates, O-net on 16; the age network on one face with
its mirror image (one client) and on 16 faces with theirs (a batch of concurrent requests).
Then whole detections of 640x480 frames (``FaceDetector.detect``) with each engine.

Variants, interleaved in every round (their order rotates): torch (faceage's own paths: oneDNN
for R- and O-net), ONNX Runtime on an export of the same module (CPU execution provider, all
graph optimisations, threads sleeping between calls as faceage runs it), and ONNX Runtime with
its threads spinning. The "torch ÷" columns are torch's time over the variant's in the same
round: median over rounds (min-max); above 1, ONNX Runtime is faster.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from faceage.inference.detection import DetectorConfig, FaceDetector
from faceage.inference.engines import OrtRunner, export_onnx
from faceage.inference.modelfile import _AgesAndScales, load_model_file
from faceage.inference.mtcnn.detect import pyramid_scales
from faceage.inference.mtcnn.nets import DYNAMIC_AXES, load_nets

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU's model name, and whether it has AMX (which torch's oneDNN uses)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines()
             if line.startswith("model name")]
    return (names[0] if names else "unknown CPU") + (" (AMX)" if "amx_tile" in info
                                                      else " (no AMX)")


def network_cases(model_path: Path) -> dict[str, tuple[torch.nn.Module, list[torch.Tensor],
                                                       dict[int, str]]]:
    """name: (module, the inputs of one call as the pipeline makes it, dynamic axes)."""
    nets = load_nets()
    levels = [torch.rand(1, 3, int(480 * s + 1), int(640 * s + 1)) * 2 - 1
              for s in pyramid_scales(480, 640, 20.0, 0.709)]
    model = load_model_file(model_path, engine="torch")
    size = model.input_size
    age = _AgesAndScales(model.net)
    return {"P-net, a 640x480 pyramid": (nets.modules["pnet"], levels, DYNAMIC_AXES["pnet"]),
            "R-net, 128 crops": (nets.modules["rnet"], [torch.rand(128, 3, 24, 24)], {0: "n"}),
            "O-net, 16 crops": (nets.modules["onet"], [torch.rand(16, 3, 48, 48)], {0: "n"}),
            f"age, 1 face + mirror ({size} px)": (age, [torch.rand(2, 3, size, size)], {0: "n"}),
            f"age, 16 faces + mirrors ({size} px)": (age, [torch.rand(32, 3, size, size)],
                                                     {0: "n"})}


def time_calls(fn, inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in inputs:
        fn(x)
    return time.perf_counter() - start


def run_rounds(variants: dict[str, object], inputs: list, rounds: int, repeat: int
               ) -> dict[str, list[float]]:
    """Per-round ms (median of ``repeat`` calls) of each variant, order rotating per round."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            time_calls(variants[n], inputs)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                out[n].append(1e3 * statistics.median(
                    time_calls(variants[n], inputs) for _ in range(repeat)))
    return out


def ratio_cell(base: list[float], other: list[float]) -> str:
    ratios = [b / o for b, o in zip(base, other, strict=True)]
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f})"


def print_table(rows: list[tuple[str, int, dict[str, list[float]]]]) -> None:
    """One row per input and thread count: each variant's median ms, and torch ÷ the others."""
    names = list(rows[0][2])
    others = [n for n in names if n != "torch"]
    print("\n| input | threads | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"torch ÷ {n}" for n in others) + " |")
    print("|---|---:|" + "---:|" * (len(names) + len(others)))
    for name, threads, t in rows:
        cells = [f"{statistics.median(t[n]):.2f}" for n in names]
        cells += [ratio_cell(t["torch"], t[n]) for n in others]
        print(f"| {name} | {threads} | {' | '.join(cells)} |")


def detection_row(threads: int, rounds: int) -> tuple[str, int, dict[str, list[float]]]:
    """Whole detections of 6 frames with each engine (``auto``: probed at this thread count)."""
    from detection import webcam_frames

    frames = webcam_frames(6)
    variants = {engine: FaceDetector(DetectorConfig(engine=engine)).detect
                for engine in ("torch", "onnxruntime", "auto")}
    return ("FaceDetector.detect, 6 frames 640x480", threads,
            run_rounds(variants, frames, rounds, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5, help="calls per variant per round")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", type=Path, default=REPO / "models" / "faceage-default.pt")
    args = p.parse_args()
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; rounds {args.rounds}")
    before = torch.get_num_threads()
    rows, detections = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, (module, inputs, axes) in network_cases(args.model).items():
            graph = export_onnx(module, inputs[0], axes)
            variants = {"torch": module, "ORT": OrtRunner(graph, threads),
                        "ORT spinning": OrtRunner(graph, threads, spinning=True)}
            rows.append((name, threads, run_rounds(variants, inputs, args.rounds, args.repeat)))
        detections.append(detection_row(threads, args.rounds))
    torch.set_num_threads(before)
    print_table(rows)
    print_table(detections)


if __name__ == "__main__":
    main()
