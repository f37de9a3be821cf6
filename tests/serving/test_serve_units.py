"""faceage/serving/app.py without Ray: the config, the application builder and the deployments'
own code.

Each deployment's class (``Detector.func_or_class``) is constructed here in-process, the way a
replica constructs it, and the Ingress talks to the other two through stand-in handles. What
needs Ray Serve itself (HTTP, batching across replicas, load shedding, faults) is
tests/serving/test_serve.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect

import numpy as np
import pytest
from PIL import Image

from faceage.inference.images import load_image
from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file
from faceage.inference.pipeline import FacePipeline


def run_coroutine(coro):
    """``asyncio.run`` in a thread of its own: the browser tests' session-scoped Playwright keeps
    an event loop running in the main thread, where ``asyncio.run`` refuses to start."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

def test_config_yaml_validates_and_fits_two_cores():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from faceage.serving.app import ServeArgs
    from faceage.serving.deployments import BatchSettings
    from faceage.serving.local import apply_overrides
    from faceage.serving.local_process import DEFAULT_CONFIG

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    assert (app.name, app.route_prefix, app.import_path) == ("faceage", "/",
                                                              "faceage.serving.app:app")
    ServeArgs.model_validate(app.args)
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Detector", "AgeRegressor"}
    cpus = sum(d.num_replicas * d.ray_actor_options.num_cpus for d in deployments.values())
    assert cpus <= 2
    batching = BatchSettings(**deployments["AgeRegressor"].user_config)
    assert deployments["AgeRegressor"].max_ongoing_requests >= batching.max_batch_size
    for d in deployments.values():
        assert d.max_queued_requests > 0, f"{d.name}: unbounded queue"

    changed = apply_overrides(raw, {"args.model_path": "/m.pt", "http_options.port": 1234,
                                    "deployments.Detector.num_replicas": 1,
                                    "deployments.AgeRegressor.user_config.max_batch_size": 1})
    app = changed["applications"][0]
    assert app["args"]["model_path"] == "/m.pt" and changed["http_options"]["port"] == 1234
    detector = next(d for d in app["deployments"] if d["name"] == "Detector")
    regressor = next(d for d in app["deployments"] if d["name"] == "AgeRegressor")
    assert detector["num_replicas"] == 1 and regressor["user_config"]["max_batch_size"] == 1
    assert raw["applications"][0]["args"]["model_path"] != "/m.pt", "the input is not changed"
    with pytest.raises(KeyError):
        apply_overrides(raw, {"replicas": 3})


def test_a_missing_model_fails_the_build_with_the_path():
    from faceage.errors import UserError
    from faceage.serving.app import app

    with pytest.raises(UserError, match="model file not found: /nonexistent/model.pt"):
        app({"model_path": "/nonexistent/model.pt"})


# -- the deployments' classes, in this process --------------------------------------------------


def unbatched(method):
    """The body of a ``@serve.batch`` method, without Ray's batching (which needs a replica)."""
    return method.__func__.__wrapped__.__get__(method.__self__)


class LocalHandle:
    """Stands in for a DeploymentHandle: ``handle.method.remote(...)`` awaits the local object;
    a ``@serve.batch`` method gets a batch of one."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        method = getattr(self.target, name)
        if hasattr(getattr(method, "__func__", None), "__wrapped__"):
            body = unbatched(method)

            async def method(item):
                return (await body([item]))[0]

        class Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    result = method(*args, **kwargs)
                    return await result if inspect.isawaitable(result) else result

                return call()

        return Method()


@pytest.fixture(scope="module")
def model_path(untrained_model_file):
    return DEFAULT_MODEL_PATH if DEFAULT_MODEL_PATH.exists() else untrained_model_file


@pytest.fixture(scope="module")
def replicas(model_path):
    """A Detector and an AgeRegressor as their replicas construct them (defaults of ServeArgs)."""
    from faceage.serving.app import ServeArgs
    from faceage.serving.deployments import AgeRegressor, Detector

    args = ServeArgs(model_path=str(model_path))
    detector = Detector.func_or_class(str(model_path), args.detector.model_dump(), args.no_face,
                                      args.max_pixels, "cpu", args.stream_detector.model_dump())
    regressor = AgeRegressor.func_or_class(str(model_path), args.tta, "cpu")
    return detector, regressor, args


def make_ingress(detector, regressor, args):
    from faceage.serving.app import Ingress

    # @serve.ingress wraps the class in a subclass with an async constructor (an ASGI replica);
    # the class as written is its first base.
    plain = Ingress.func_or_class.__bases__[0]
    assert plain.__name__ == "Ingress" and issubclass(Ingress.func_or_class, plain)
    return plain(LocalHandle(detector), LocalHandle(regressor), args.model_dump())


def test_detector_finds_faces_and_returns_bad_images_as_errors(replicas, astronaut_path):
    detector, _, _ = replicas
    found = run_coroutine(detector.find(astronaut_path.read_bytes(), "astronaut.jpg"))
    assert (found["width"], found["height"]) == (512, 512)
    size = detector.finders["photo"].size
    # The crops travel as one stack beside the faces (in the object store when large).
    assert len(found["faces"]) == 1 and found["faces"][0].crop is None
    assert found["crops"].shape == (1, size, size, 3)
    assert set(found["timings_ms"]) == {"decode", "detect"}
    assert run_coroutine(detector.find(b"not an image", "upload")) == {
        "error": "upload: not an image, or not one of the supported formats "
                 "(JPEG, PNG, WEBP, AVIF, HEIF, BMP, GIF, TIFF, PPM)", "status": 400}
    info = detector.info()
    assert info["crop_size"] == size and info["threads"] >= 1
    assert info["stream_detector"]["min_face_fraction"] > info["detector"]["min_face_fraction"] > 0


def test_the_stream_profile_finds_the_photo_profiles_large_face(replicas, astronaut_path):
    """The video profile (downscaled, large faces only) finds the same face as full detection,
    framed within a few pixels, and the two profiles share one set of MTCNN weights."""
    detector, _, _ = replicas
    data = astronaut_path.read_bytes()
    [photo] = run_coroutine(detector.find(data, profile="photo"))["faces"]
    [stream] = run_coroutine(detector.find(data, profile="stream"))["faces"]
    assert np.abs(photo.box - stream.box).max() < 8
    finders = detector.finders
    assert finders["photo"].detector._nets is finders["stream"].detector._nets


def test_age_regressor_ages_a_batch_of_requests_in_one_model_call(replicas, astronaut_path):
    detector, regressor, _ = replicas
    crop = run_coroutine(detector.find(astronaut_path.read_bytes()))["crops"][0]
    stacks = [np.stack([crop]), np.stack([crop, crop[:, ::-1]]), np.stack([crop[::-1]])]
    for s in stacks:
        s.flags.writeable = False  # as arrays arrive from Ray's object store
    calls = []
    predict_groups = regressor.model.predict_groups

    def spy(groups, tta=False, coverage=0.8):
        calls.append([len(g) for g in groups])
        return predict_groups(groups, tta, coverage)

    regressor.model.predict_groups = spy
    try:
        # What @serve.batch hands the method: the requests' crop stacks, as one list.
        ages = run_coroutine(unbatched(regressor.ages)(stacks))
    finally:
        regressor.model.predict_groups = predict_groups
    assert calls == [[1, 2, 1]]
    # Each request alone, as the replica ages it (the mirror average when the model says so).
    alone = [regressor.model.estimate(list(s), tta=regressor.tta) for s in stacks]
    assert [len(a) for a in ages] == [1, 2, 1]
    for got, want in zip(ages, alone, strict=True):
        assert np.allclose(got.age, want.age, atol=1e-4)
        assert np.allclose(got.low, want.low, atol=1e-4)
        assert np.allclose(got.high, want.high, atol=1e-4)
        assert ((0 <= got.low) & (got.low <= got.age) & (got.age <= got.high)).all()


def test_age_regressor_reports_and_applies_its_interval_coverage(model_path, astronaut_path):
    from faceage.serving.app import ServeArgs
    from faceage.serving.deployments import AgeRegressor

    with pytest.raises(ValueError, match="interval_coverage"):
        ServeArgs(interval_coverage=1.0)
    with pytest.raises(ValueError, match="interval_coverage"):
        ServeArgs(interval_coverage=0)
    regressor = AgeRegressor.func_or_class(str(model_path), False, "cpu", 0.5)
    info = regressor.info()["interval"]
    assert info["coverage"] == 0.5 and info["method"] in (
        "laplace-from-val-mae", "scaled-residual", "residual")
    crop = np.full((regressor.model.input_size,) * 2 + (3,), 120, np.uint8)
    [narrow] = run_coroutine(unbatched(regressor.ages)([np.stack([crop])]))
    wide = regressor.model.estimate([crop], coverage=0.9)
    assert narrow.high[0] - narrow.low[0] < wide.high[0] - wide.low[0]


def test_ingress_answers_what_faceage_predict_answers(replicas, model_path, astronaut_path,
                                                      rocket_path):
    """Ingress → Detector → AgeRegressor gives FacePipeline's face records (the CLI's path)."""
    ingress = make_ingress(*replicas)
    pipeline = FacePipeline(load_model_file(model_path))

    async def both():
        return await asyncio.gather(*(ingress.predict_image(p.read_bytes(), p.name)
                                      for p in (astronaut_path, rocket_path)))

    astronaut, rocket = run_coroutine(both())
    assert astronaut["faces"] == pipeline.predict(load_image(astronaut_path))
    width, height = Image.open(rocket_path).size
    assert rocket["faces"] == [] and rocket["image"] == {"width": width, "height": height}
    assert astronaut["model"]["name"] == pipeline.model.name
    assert set(astronaut["timings_ms"]) == {"decode", "detect", "detect_call", "age", "total"}


def test_ingress_turns_bad_images_and_overload_into_status_codes(replicas):
    from ray.serve.exceptions import BackPressureError

    from faceage.serving.schemas import ApiError

    ingress = make_ingress(*replicas)
    with pytest.raises(ApiError) as bad:
        run_coroutine(ingress.predict_image(b"\xff\xd8 half a jpeg", "upload.jpg"))
    assert bad.value.status == 400 and "upload.jpg" in bad.value.message
    frame = run_coroutine(ingress._frame(3, "text, not bytes"))
    assert frame["frame"] == 3 and frame["status"] == 415

    async def shed():
        raise BackPressureError(num_queued_requests=64, max_queued_requests=64)

    with pytest.raises(ApiError) as overloaded:
        run_coroutine(ingress._call(shed()))
    assert overloaded.value.status == 503 and "capacity" in overloaded.value.message


def test_a_failing_downstream_call_is_a_json_500(replicas):
    """Whatever fails below the Ingress reaches the client as the JSON error form with its
    status, never Starlette's plain-text 500."""
    import json

    from faceage.serving.app import api
    from faceage.serving.schemas import ApiError

    detector, regressor, args = replicas

    class Broken:
        async def find(self, *args):
            raise RuntimeError("the Detector broke")

    ingress = make_ingress(Broken(), regressor, args)
    with pytest.raises(ApiError) as failed:
        run_coroutine(ingress.predict_image(b"bytes", "upload.jpg"))
    assert failed.value.status == 500 and "RuntimeError" in failed.value.message
    frame = run_coroutine(ingress._frame(0, b"bytes"))
    assert frame["status"] == 500 and "RuntimeError" in frame["error"]

    class Request:  # what the handler reads of the request
        method, url = "POST", type("URL", (), {"path": "/predict"})()

    handler = api.exception_handlers[Exception]
    response = run_coroutine(handler(Request(), KeyError("a bug in the Ingress")))
    assert response.status_code == 500 and response.media_type == "application/json"
    body = json.loads(response.body)
    assert body["status"] == 500 and "KeyError" in body["error"]
