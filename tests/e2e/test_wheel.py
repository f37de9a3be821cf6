"""The wheel is the whole product: built from the sdist, installed into a fresh venv, and run from
a folder that is not a checkout, `faceage --version`, `predict` and `up` work on what it carries
(`up` in tests/e2e/test_up.py, which starts the installed wheel's stack; the ``wheel`` and
``installed`` fixtures are in conftest.py)."""

from __future__ import annotations

import json
import re
import zipfile

import pytest
from conftest import INSTALL_S, run_checked

from faceage import __version__

pytestmark = [pytest.mark.slow, pytest.mark.timeout(INSTALL_S + 300)]


def test_the_wheel_carries_the_apps_the_model_configs_and_licences(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("faceage/serving/app.py", "faceage/serving/local.py", "faceage/webapp/main.py",
                 "faceage/_bundled/models/faceage-default.pt",
                 "faceage/_bundled/models/MODEL_CARD.md", "faceage/_bundled/configs/train.yaml",
                 "faceage/_bundled/configs/tune.yaml", "faceage/_bundled/serve/config.yaml",
                 "faceage/inference/mtcnn/pnet.pt", "faceage/inference/mtcnn/onet.pt",
                 "faceage/inference/mtcnn/LICENSE-facenet-pytorch",
                 f"faceage-{__version__}.dist-info/licenses/LICENSE",
                 f"faceage-{__version__}.dist-info/licenses/NOTICE"):
        assert name in names, f"{name} is not in {wheel.name}"
    assert not [n for n in names if n.startswith(("tests/", "serve/", "app/", "bench/"))]
    assert wheel.name == f"faceage-{__version__}-py3-none-any.whl"


def test_version_names_the_package_and_the_default_model(installed):
    out = run_checked([installed["faceage"], "--version"], installed["cwd"],
                      installed["env"]).stdout
    package, model = out.strip().splitlines()
    assert package.startswith(f"faceage {__version__} (") and str(installed["venv"]) in package
    assert re.match(r"default model faceage-\S+ \S+\+[0-9a-f]{12} \(", model), model
    assert "_bundled/models/faceage-default.pt" in model


def test_predict_answers_with_an_interval_from_the_shipped_model(installed):
    out = run_checked([installed["faceage"], "predict", "astronaut.jpg", "--json"],
                      installed["cwd"], installed["env"]).stdout
    (face,) = json.loads(out.strip().splitlines()[-1])["faces"]
    low, high = face["age_interval"]
    assert low < face["age"] < high
