"""Which runtime runs a network at inference: torch, or ONNX Runtime on an export of the same
module.

The model file (and the package's MTCNN weights) stay the one source of truth: an ONNX graph is
exported from the loaded torch module at load time, in memory, never shipped or cached apart
from it. ``auto`` times both runtimes on a typical input, interleaved, and keeps ONNX Runtime
where it is clearly faster (``PROBE_MARGIN``), else torch: which wins depends on the CPU and the
thread count (docs/benchmarks.md, "ONNX Runtime").
"""

from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from faceage.arguments import ENGINES
from faceage.errors import UserError

# Interleaved calls per runtime in the ``auto`` probe (after one warm-up each): the median
# decides; ~5x the net's time on the probe input, a fraction of a second for these nets.
PROBE_ROUNDS = 5
# ``auto`` leaves torch only for a clear win: ONNX Runtime must take under 1/1.1 of torch's time.
# Where the two are even (P-net on one thread), the probe's noise would otherwise decide, and two
# processes on one machine (Serve's replicas, the CLI) could run the same net differently; torch
# also follows a replica's thread count per call, an ONNX Runtime session keeps its own.
PROBE_MARGIN = 1.1

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise UserError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    return engine


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(module: torch.nn.Module, example: torch.Tensor,
                dynamic: dict[int, str]) -> bytes:
    """``module`` (eval mode; one tensor in, a tensor or tuple out) as an ONNX graph whose input
    ``x`` has the ``dynamic`` axes (``{0: "n"}``: any batch size). Modules take their
    export-friendly path while ``torch.onnx.is_in_onnx_export()`` (plain layouts, no oneDNN)."""
    buf = io.BytesIO()
    # The exporter puts back the training flag the top module had, on every submodule: a
    # wrapper left in train mode would turn the network's BatchNorm to batch statistics, and the
    # next torch call would overwrite its running statistics.
    module.eval()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The tracer warns about every Python int taken from a shape; the dynamic axes are
        # declared, and the parity tests check the graph at other sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": dynamic})
    return buf.getvalue()


class OrtRunner:
    """An ONNX Runtime session on the CPU called like the torch module it was exported from:
    a float tensor in, a tuple of tensors out."""

    def __init__(self, graph: bytes, threads: int, spinning: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        # By default threads sleep between calls instead of spinning: a Serve replica shares
        # its cores with the other deployment and the proxy (bench/onnx_runtime.py measures
        # both).
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if spinning else "0")
        self.threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {"x": x.detach().cpu().contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, tuple | list) else (out,)


@dataclass
class EngineChoice:
    """The runtime chosen for one network, and why (what ``/model`` reports)."""

    network: str
    engine: str
    asked: str
    threads: int
    ms: dict[str, float] = field(default_factory=dict)  # probe medians, per runtime

    def info(self) -> dict:
        """``chosen_by``: probe (``auto``, both timed), asked, or only-one (``auto`` on a GPU
        or without the onnxruntime package)."""
        how = "probe" if self.ms else ("asked" if self.asked == self.engine else "only-one")
        return {"engine": self.engine, "asked": self.asked, "chosen_by": how,
                "threads": self.threads, **({"probe_ms": self.ms} if self.ms else {})}


def probe(runners: dict[str, Runner], example: torch.Tensor,
          rounds: int = PROBE_ROUNDS) -> dict[str, float]:
    """Median milliseconds of each runner on ``example``, called in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for run in runners.values():
            run(example)
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                run(example)
                times[name].append(1e3 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def choose_runner(network: str, module: torch.nn.Module, example: torch.Tensor,
                  engine: str, device: torch.device | str = "cpu",
                  dynamic: dict[int, str] | None = None) -> tuple[Runner, EngineChoice]:
    """The runner for ``module`` under ``engine`` (``auto``: the clearly faster on ``example``,
    which is also the export's example input), and what was chosen. ONNX Runtime runs on the
    CPU only: on another device, and where the package is missing, ``auto`` is torch."""
    check_engine(engine)
    threads = torch.get_num_threads()

    def torch_runner(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _as_tuple(module(x))

    usable = torch.device(device).type == "cpu" and onnxruntime_available()
    if engine == "torch" or (engine == "auto" and not usable):
        return torch_runner, EngineChoice(network, "torch", engine, threads)
    if not usable:
        raise UserError(f"engine onnxruntime runs on the CPU and needs the onnxruntime package "
                        f"(pip install onnxruntime); {network} is on {device}")
    ort_runner = OrtRunner(export_onnx(module, example, dynamic or {0: "n"}), threads)
    if engine == "onnxruntime":
        return ort_runner, EngineChoice(network, "onnxruntime", engine, threads)
    ms = probe({"torch": torch_runner, "onnxruntime": ort_runner}, example)
    best = "onnxruntime" if ms["onnxruntime"] * PROBE_MARGIN < ms["torch"] else "torch"
    return ({"torch": torch_runner, "onnxruntime": ort_runner}[best],
            EngineChoice(network, best, engine, threads, ms))
