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


def test_the_inference_modules_load_no_training_code():
    assert loaded_training_modules(
        "import faceage.inference.images, faceage.inference.detection, "
        "faceage.inference.alignment, faceage.inference.pipeline, faceage.inference.stream, "
        "faceage.inference.modelfile, faceage.inference.preprocess, "
        "faceage.inference.annotate") == []


def test_predict_command_imports_no_training_code():
    """What `faceage predict` imports before it touches a photo: its parser and its modules."""
    code = ("from faceage.cli import build_parser\n"
            "build_parser('predict').parse_args(['predict', 'x.jpg'])\n"
            "import faceage.inference.predict, faceage.inference.annotate\n"
            "import faceage.inference.modelfile\n")
    assert loaded_training_modules(code) == []


@pytest.mark.slow
def test_faceage_predict_run_imports_no_training_code(astronaut_path):
    """A whole `faceage predict --json` run, model and detector included."""
    code = ("import sys\nfrom faceage.cli import main\n"
            f"rc = main(['predict', '--json', {str(astronaut_path)!r}])\n"
            "assert rc == 0, rc\n")
    assert loaded_training_modules(code) == []


def test_serve_app_imports_no_training_code():
    """faceage/serving/app.py's and faceage/serving/deployments.py's closure, with pandas made
    unimportable: Ray Serve imports pandas itself when it is installed
    (ray/serve/_private/utils.py, optional), faceage's code must not need it."""
    code = ("import sys\nsys.modules['pandas'] = None\n"
            "import faceage.serving.app, faceage.serving.deployments\n")
    assert loaded_training_modules(code) == []


def test_the_ingress_module_loads_no_torch():
    """faceage/serving/app.py (the Ingress replicas' module) without torch: the model deployments
    live in faceage/serving/deployments.py, which only the application builder imports; what the
    Ingress unpickles from them (Face, AgeEstimates) is torch-free too, and so is /stream's
    NextFrameSearch."""
    code = ("import sys\nimport faceage.serving.app\n"
            "import faceage.inference.interval, faceage.inference.detection\n"
            "import faceage.inference.stream\n"
            "import json\nprint(json.dumps(sorted(m for m in ('torch', 'torchvision', "
            "'facenet_pytorch', 'faceage.inference.modelfile', 'faceage.serving.deployments') "
            "if m in sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
