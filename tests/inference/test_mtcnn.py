"""faceage's MTCNN (faceage.inference.mtcnn) against facenet-pytorch's, which it replaces: the
nets and weights, the pyramid and batched crops, the faces found, and the ages they lead to."""

from __future__ import annotations

import ast
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from faceage.inference.detection import FaceDetector
from faceage.inference.images import load_image
from faceage.inference.mtcnn.boxes import crop_windows, nms_min
from faceage.inference.mtcnn.detect import detect_faces, pyramid_scales
from faceage.inference.mtcnn.nets import WEIGHT_FILES, load_nets, max_pool_ceil
from faceage.inference.mtcnn.resample import MEAN, SCALE, crop_resize, integral_image, resize_level
from faceage.inference.overlap import iou
from testkit.frames import group_photo, place

REPO = Path(__file__).resolve().parents[2]
AAF = REPO.parent / "shared" / "data" / "aaf"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread, as a Serve Detector replica runs: on a busy machine torch's default
    (a thread per core) spins and makes these tests many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def nets():
    return load_nets()


@pytest.fixture(scope="module")
def facenet():
    """facenet-pytorch's MTCNN with faceage's defaults (dev dependency: the reference)."""
    fp = pytest.importorskip("facenet_pytorch")
    return fp.MTCNN(keep_all=True, min_face_size=20, device="cpu").eval()


@pytest.fixture(scope="module")
def photos(astronaut_path, rocket_path) -> dict[str, np.ndarray]:
    """The suite's photos and 640x480 frames made from them: the face small, large, cut by the
    frame's edge; five faces; no face."""
    astronaut = load_image(astronaut_path)
    out = {"astronaut": astronaut, "rocket": load_image(rocket_path),
           "group 1280x720": group_photo()}
    for name, (zoom, cx, cy) in {"small face": (0.6, 200, 260), "centred": (1.0, 320, 240),
                                 "close-up": (1.6, 330, 300), "at the edge": (1.2, 560, 180)
                                 }.items():
        out[f"frame {name}"] = place(astronaut, zoom, cx, cy)
    return out


def assert_same_faces(facenet, nets, image: np.ndarray, label: str) -> int:
    """facenet-pytorch's ``MTCNN.detect`` and ``detect_faces`` find the same faces: count,
    boxes (IoU >= 0.9), scores and landmarks."""
    boxes, probs, points = facenet.detect(image, landmarks=True)
    ours, our_points = detect_faces(image, nets, 20.0)
    if boxes is None:
        assert len(ours) == 0, label
        return 0
    assert len(ours) == len(boxes), label
    for box, prob, pts in zip(boxes, probs, points, strict=True):
        overlaps = [iou(box, b) for b in ours]
        j = int(np.argmax(overlaps))
        assert overlaps[j] >= 0.9, (label, box, ours[j])
        assert abs(ours[j, 4] - prob) < 1e-3, (label, prob, ours[j, 4])
        side = max(box[2] - box[0], box[3] - box[1])
        assert np.abs(our_points[j] - pts).max() < 0.02 * side, label
    return len(boxes)


def test_the_weights_ship_in_the_package_and_load(nets):
    folder = resources.files("faceage.inference.mtcnn")
    for name in [*WEIGHT_FILES.values(), "LICENSE-facenet-pytorch"]:
        assert folder.joinpath(name).is_file(), name
    assert "onet.pt" in folder.joinpath("LICENSE-facenet-pytorch").read_text()
    for net in nets.modules.values():
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert nets.device == torch.device("cpu")


def test_the_nets_are_facenet_pytorchs(nets, monkeypatch):
    """Same state_dict keys and values as facenet-pytorch's nets, same outputs."""
    fp = pytest.importorskip("facenet_pytorch.models.mtcnn")
    torch.manual_seed(0)
    mods = nets.modules
    for ours, theirs, shape in ((mods["pnet"], fp.PNet(), (1, 3, 37, 51)),
                                (mods["rnet"], fp.RNet(), (5, 3, 24, 24)),
                                (mods["onet"], fp.ONet(), (5, 3, 48, 48))):
        theirs.eval()
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(shape)
        with torch.no_grad():
            for u, v in zip(ours(x), theirs(x), strict=True):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
            # Without oneDNN (and on a GPU) R- and O-net run in NCHW throughout: same outputs.
            monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
            for u, v in zip(ours(x), theirs(x), strict=True):
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
            monkeypatch.undo()


@pytest.mark.parametrize("shape,k,s", [((1, 10, 287, 383), 2, 2), ((1, 10, 286, 382), 2, 2),
                                       ((4, 28, 22, 22), 3, 2), ((4, 64, 21, 20), 3, 2),
                                       ((2, 64, 8, 8), 2, 2), ((1, 3, 3, 4), 3, 2)])
def test_max_pool_is_torchs(shape, k, s):
    x = torch.randn(shape)
    pool = torch.nn.MaxPool2d(k, s, ceil_mode=True)
    assert torch.equal(max_pool_ceil(x, pool), pool(x))


def test_pyramid_levels_are_torchs_area_resampling():
    """A level gathered from the summed-area table equals ``interpolate(mode="area")`` of the
    image (what facenet-pytorch feeds P-net), normalised."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    table = integral_image(image, torch.device("cpu"))
    full = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for h, w in [(59, 80), (42, 57), (13, 17), (97, 131), (120, 150)]:
        expected = (F.interpolate(full, size=(h, w), mode="area") - MEAN) * SCALE
        torch.testing.assert_close(resize_level(table, h, w), expected, rtol=0, atol=1e-5)
    assert pyramid_scales(480, 640, 20, 0.709)[0] == pytest.approx(0.6)
    assert len(pyramid_scales(480, 640, 20, 0.709)) == 10 and pyramid_scales(11, 40, 12, 0.7) == []


def test_batched_crops_cut_boxes_at_the_border_as_facenet_pytorch():
    """All candidate crops in one gather equal facenet-pytorch's per-box crop and area resize,
    boxes across the image's edges included: the part outside is cut off and the rest stretched
    (facenet-pytorch's ``pad`` clips; it does not zero-fill as the original MTCNN does)."""
    rng = np.random.default_rng(1)
    h, w = 60, 80
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.7, 5.2, 40.1, 34.9],    # inside
                          [-15.0, -9.5, 20.0, 25.5],  # over the top-left corner
                          [60.0, 40.0, 100.0, 80.0],  # over the bottom-right corner
                          [-30.0, 10.0, 130.0, 50.0],  # wider than the image
                          [30.0, 30.0, 37.0, 37.0]])   # smaller than the crop: upsampled
    windows = crop_windows(boxes, w, h)
    assert windows.tolist() == [[9, 4, 40, 34], [0, 0, 20, 25], [59, 39, 80, 60],
                                [0, 9, 80, 50], [29, 29, 37, 37]]
    crops = crop_resize(integral_image(image, torch.device("cpu")), windows, 24)
    full = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for crop, (x0, y0, x1, y1) in zip(crops, windows.int().tolist(), strict=True):
        # facenet-pytorch: imgs[:, :, y - 1:ey, x - 1:ex] resampled by interpolate(mode="area").
        expected = F.interpolate(full[:, :, y0:y1, x0:x1], size=(24, 24), mode="area")
        torch.testing.assert_close(crop[None], (expected - MEAN) * SCALE, rtol=0, atol=1e-5)
    assert crop_resize(integral_image(image, torch.device("cpu")),
                       torch.zeros((0, 4)), 48).shape == (0, 3, 48, 48)


def test_min_overlap_nms_keeps_the_best_of_nested_boxes():
    boxes = torch.tensor([[0.0, 0, 100, 100], [10, 10, 50, 50], [200, 200, 260, 260],
                          [195, 205, 262, 258]])
    scores = torch.tensor([0.9, 0.95, 0.8, 0.85])
    # The small box lies inside the big one: overlap / smaller area = 1, so one is dropped,
    # although their IoU (0.16) would keep both.
    assert nms_min(boxes, scores, 0.7).tolist() == [1, 3]
    assert nms_min(torch.zeros((0, 4)), torch.zeros(0), 0.7).tolist() == []


def test_the_same_faces_as_facenet_pytorch_on_the_suites_photos(facenet, nets, photos):
    found = {name: assert_same_faces(facenet, nets, image, name)
             for name, image in photos.items()}
    assert found["astronaut"] == 1 and found["rocket"] == 0 and found["group 1280x720"] == 5
    assert all(found[k] >= 1 for k in found if k.startswith("frame"))


def test_the_same_faces_as_facenet_pytorch_on_all_age_faces_frames(facenet, nets):
    """Frames like bench/stream_profile.py's clip, from All-Age-Faces photos (../shared)."""
    if not AAF.is_dir():
        pytest.skip(f"{AAF} is not there (shared data set)")
    names = sorted(p.name for p in AAF.glob("*.jpg"))[::2000][:4]
    for i, name in enumerate(names):
        photo = np.asarray(Image.open(AAF / name).convert("RGB"))
        frame = place(photo, 0.7 + 0.3 * i, 280 + 30 * i, 240)
        assert_same_faces(facenet, nets, frame, name)


def test_tiny_empty_and_read_only_images(nets):
    assert detect_faces(np.zeros((11, 40, 3), np.uint8), nets)[0].shape == (0, 5)
    boxes, points = detect_faces(np.full((120, 160, 3), 128, np.uint8), nets)
    assert boxes.shape == (0, 5) and points.shape == (0, 5, 2)
    image = np.asarray(Image.open(REPO / "tests/fixtures/astronaut.jpg").convert("RGB"))
    image.flags.writeable = False  # as arrays arrive from Ray's object store
    assert len(detect_faces(image, nets)[0]) == 1
    assert len(detect_faces(image, nets, thresholds=(0.6, 0.7, 1.0))[0]) == 0
    # A view into a larger image (FaceDetector.detect_near passes one).
    assert len(detect_faces(image[40:200, 150:300], nets)[0]) == 1


def test_faceage_imports_no_facenet_pytorch():
    for path in (REPO / "faceage").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "facenet_pytorch" for n in names), path


def test_detection_runs_with_facenet_pytorch_unimportable(astronaut_path, monkeypatch):
    """The whole pipeline's detector while ``import facenet_pytorch`` fails (the test above
    reads the imports; this one runs the detector, a fresh one, weights and all)."""
    for name in [n for n in sys.modules if n.split(".")[0] == "facenet_pytorch"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import facenet_pytorch fails
    faces = FaceDetector().detect(load_image(astronaut_path))
    assert len(faces) == 1 and round(faces[0].score, 3) == 1.0


class FacenetFaceDetector(FaceDetector):
    """``FaceDetector`` as it was before faceage's MTCNN: facenet-pytorch's ``detect_face``
    under the same downscaling, padding and filtering."""

    def __init__(self, facenet):
        super().__init__()
        self._facenet = facenet

    def _run_mtcnn(self, image, min_face):
        from facenet_pytorch.models.utils.detect_face import detect_face

        h, w = image.shape[:2]
        min_face = max(12.0, float(min_face))
        if min(h, w) < min_face:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        n = self._facenet
        with torch.no_grad():
            boxes, points = detect_face(image, min_face, n.pnet, n.rnet, n.onet,
                                        list(self.config.thresholds), self.config.factor,
                                        torch.device("cpu"))
        return (np.asarray(boxes[0], np.float32).reshape(-1, 5),
                np.asarray(points[0], np.float32).reshape(-1, 5, 2))


def test_ages_through_the_pipeline_match_facenet_pytorch_detection(facenet, photos):
    """The shipped model through ``FacePipeline``: faces found by faceage's MTCNN and by
    facenet-pytorch's (the old ``FaceDetector``) get the same boxes and ages (within 0.5 y)."""
    from faceage.inference.modelfile import load_model_file
    from faceage.inference.pipeline import FacePipeline

    model = load_model_file()
    new = FacePipeline(model)
    old = FacePipeline(model, detector=FacenetFaceDetector(facenet))
    names = ["astronaut", "group 1280x720", "frame close-up", "frame at the edge", "rocket"]
    images = [photos[n] for n in names]
    for name, (new_faces, new_est), (old_faces, old_est) in zip(
            names, new.predict_faces(images), old.predict_faces(images), strict=True):
        assert len(new_faces) == len(old_faces), name
        for f, g, a, b in zip(new_faces, old_faces, new_est, old_est, strict=True):
            assert iou(f.box, g.box) >= 0.9, name
            assert abs(a[0] - b[0]) <= 0.5, (name, a[0], b[0])
