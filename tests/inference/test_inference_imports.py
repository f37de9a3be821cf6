"""Inference loads no training code: the import closure of the model, the CLI's predict path and
the Serve application, each checked in a fresh interpreter (DESIGN: "Serve replicas and the CLI's
predict path import neither pandas nor the training modules")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Training-side modules: faceage's own and the libraries only they need.
TRAINING = ("faceage.data", "faceage.training", "pandas", "mlflow", "matplotlib", "ray.train",
            "ray.tune", "ray.data")

REPORT = f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if sys.modules[m] is not None and any(
    m == t or m.startswith(t + ".") for t in {TRAINING!r}))))
"""


def loaded_training_modules(code: str) -> list[str]:
    """The training modules loaded after running ``code`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", code + REPORT], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_report_sees_training_modules():
    """The check itself reports a loaded training module (else the tests below prove nothing)."""
    code = ("import sys, types\n"
            "sys.modules['faceage.data.datasets'] = types.ModuleType('faceage.data.datasets')\n")
    assert loaded_training_modules(code) == ["faceage.data.datasets"]


# One fresh interpreter imports each entry point in turn, the torch-free ones first, and reports
# what is loaded after each: a module loaded by an earlier step is still there at a later report,
# so each step's report covers the steps before it too (one interpreter start, not four: each
# takes 5-15 s here). pandas is made unimportable from the start: Ray Serve imports it itself
# when it is installed (ray/serve/_private/utils.py, optional); faceage's code must not need it.
STEPS = {
    # faceage/serving/app.py (the Ingress replicas' module) and what the Ingress unpickles from
    # the model deployments (Face, AgeEstimates) and /stream's NextFrameSearch: no torch.
    "ingress": "import faceage.serving.app, faceage.inference.interval, "
               "faceage.inference.detection, faceage.inference.stream",
    "inference": "import faceage.inference.images, faceage.inference.detection, "
                 "faceage.inference.alignment, faceage.inference.pipeline, "
                 "faceage.inference.stream, faceage.inference.modelfile, "
                 "faceage.inference.preprocess, faceage.inference.annotate",
    # What `faceage predict` imports before it touches a photo: its parser and its modules.
    "predict": "from faceage.cli import build_parser\n"
               "build_parser('predict').parse_args(['predict', 'x.jpg'])\n"
               "import faceage.inference.predict, faceage.inference.annotate, "
               "faceage.inference.modelfile",
    "serve": "import faceage.serving.app, faceage.serving.deployments",
}
TORCH_SIDE = ("torch", "torchvision", "facenet_pytorch", "faceage.inference.modelfile",
              "faceage.serving.deployments")


@pytest.fixture(scope="module")
def loaded_after_each_step() -> dict[str, dict[str, list[str]]]:
    """``{step: {"training": [...], "torch": [...]}}``: what was loaded once the step ran."""
    code = "import json, sys\nsys.modules['pandas'] = None\nreports = {}\n"
    for step, imports in STEPS.items():
        code += imports + "\n" + (
            f"reports[{step!r}] = {{'training': sorted(m for m in sys.modules if sys.modules[m] "
            f"is not None and any(m == t or m.startswith(t + '.') for t in {TRAINING!r})), "
            f"'torch': sorted(m for m in {TORCH_SIDE!r} if m in sys.modules)}}\n")
    code += "print(json.dumps(reports))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_ingress_module_loads_no_torch(loaded_after_each_step):
    """The model deployments live in faceage/serving/deployments.py, which only the application
    builder imports."""
    assert loaded_after_each_step["ingress"] == {"training": [], "torch": []}


def test_the_inference_modules_load_no_training_code(loaded_after_each_step):
    assert loaded_after_each_step["inference"]["training"] == []
    assert "torch" in loaded_after_each_step["inference"]["torch"]  # the step did import


def test_predict_command_imports_no_training_code(loaded_after_each_step):
    assert loaded_after_each_step["predict"]["training"] == []


def test_serve_app_imports_no_training_code(loaded_after_each_step):
    """faceage/serving/app.py's and faceage/serving/deployments.py's closure."""
    assert loaded_after_each_step["serve"]["training"] == []
    assert "faceage.serving.deployments" in loaded_after_each_step["serve"]["torch"]


@pytest.mark.slow
def test_faceage_predict_run_imports_no_training_code(astronaut_path):
    """A whole `faceage predict --json` run, model and detector included."""
    code = ("import sys\nfrom faceage.cli import main\n"
            f"rc = main(['predict', '--json', {str(astronaut_path)!r}])\n"
            "assert rc == 0, rc\n")
    assert loaded_training_modules(code) == []

