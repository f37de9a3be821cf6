"""Each pretrained start end to end: ``faceage train --set model.backbone=...`` on a tiny set,
then the exported model behind Serve's ``/predict`` gives what ``faceage predict`` gives.

The model file carries each backbone's normalisation and input size; Serve must read them from
there, not assume MobileNetV2's ImageNet ones.
"""

from __future__ import annotations

import pytest
import requests

from faceage.cli import main as faceage_main
from faceage.inference.modelfile import load_model_file
from faceage.models.backbones import BACKBONES, published_weights_file
from faceage.serving.local_process import LocalServe
from testkit.served import assert_same_faces, cli_faces, served_engines

# (backbone, its published start, input size); the start is used where its package is installed.
STARTS = [("efficientnet_lite0", "imagenet", 48), ("dlib_age_resnet", "dlib-age", 64)]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backbone, start, size", STARTS)
def test_backbone_trains_exports_and_serves_the_clis_answer(ray_local, tiny_utkface, tmp_path,
                                                           astronaut_path, capsys, backbone,
                                                           start, size):
    pretrained = start if published_weights_file(backbone) else "none"
    code = faceage_main([
        "train", "--set", f"data.path={tiny_utkface}", f"storage_path={tmp_path / 'runs'}",
        "name=tiny", "data.limit=null", f"data.cache_dir={tmp_path / 'cache'}",
        f"model.backbone={backbone}", f"model.pretrained={pretrained}",
        f"model.input_size={size}", "model.head_hidden=16", "train.batch_size=8",
        "train.max_steps_per_epoch=2", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        "schedule.stages=[{name: head, train: 0, epochs: 1, lr: 0.002}, "
        "{name: top, train: 2, epochs: 1, lr: 0.001}]"])
    assert code == 0, capsys.readouterr().out[-3000:]
    model_path = tmp_path / "runs" / "tiny" / "model.pt"
    model = load_model_file(model_path)
    spec = BACKBONES[backbone]
    assert model.metadata["backbone"] == backbone and model.input_size == size
    assert model.metadata["preprocessing"]["mean"] == pytest.approx(list(spec.mean))
    assert model.metadata["preprocessing"]["std"] == pytest.approx(list(spec.std))
    assert model.metadata["config"]["model"]["pretrained"] == pretrained

    with LocalServe({"args.model_path": str(model_path)}, num_cpus=2,
                    log_path=tmp_path / "serve.log", timeout=600) as served:
        info = requests.get(served.url + "/model", timeout=60).json()
        r = requests.post(served.url + "/predict", data=astronaut_path.read_bytes(),
                          headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert r.status_code == 200, r.text
    # The CLI on the runtimes Serve picked: each probes torch against ONNX Runtime at load.
    expected = cli_faces(model_path, astronaut_path, capsys=capsys,
                         engines=served_engines(info))["astronaut.jpg"]
    assert len(expected) == 1
    assert info["name"] == f"faceage-{backbone}"
    assert_same_faces(r.json()["faces"], expected)
