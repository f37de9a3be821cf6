"""Decoding, detection and alignment on committed public-domain photos (tests/fixtures)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from faceage.errors import ImageError, UserError
from faceage.inference.alignment import (
    UTKFACE_CHIP_TEMPLATE,
    CropPolicy,
    align_face,
    whole_image_face,
)
from faceage.inference.detection import DetectorConfig, Face, FaceDetector
from faceage.inference.images import load_image
from faceage.inference.pipeline import FaceFinder, FacePipeline, face_record
from testkit.photos import png_header_only

# Eileen Collins in astronaut.jpg, read off the picture: face box and eye centres (pixels).
ASTRONAUT_BOX = (181, 62, 268, 172)
ASTRONAUT_EYES = ((205, 102), (247, 104))


@pytest.fixture(scope="module")
def astronaut(astronaut_path) -> np.ndarray:
    return load_image(astronaut_path)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


# -- decoding ------------------------------------------------------------------------------------


def test_load_image_from_path_bytes_and_file(astronaut_path, astronaut):
    assert astronaut.shape == (512, 512, 3) and astronaut.dtype == np.uint8
    data = astronaut_path.read_bytes()
    assert np.array_equal(load_image(data), astronaut)
    assert np.array_equal(load_image(io.BytesIO(data)), astronaut)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_load_image_converts_modes_to_rgb(astronaut, mode):
    src = Image.fromarray(astronaut)
    if mode == "I;16":
        gray = np.asarray(src.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        im = Image.fromarray(gray)
    else:
        im = src.convert(mode)
    data = _jpeg_bytes(im) if mode == "CMYK" else _png_bytes(im)
    out = load_image(data)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "CMYK", "RGBA", "P"):
        # Same picture, not clipped or inverted: close to the original's brightness.
        ref = np.asarray(src.convert("L"), dtype=float)
        assert abs(out.mean() - ref.mean()) < 12


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    out = load_image(_png_bytes(im))
    assert out.shape == (30, 40, 3)
    assert (out == 255).all()


def test_palette_with_transparency():
    im = Image.new("P", (20, 10), 0)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.info["transparency"] = 0
    out = load_image(_png_bytes(im, transparency=0))
    assert (out == 255).all()


def test_exif_orientation_is_honoured(astronaut, detector):
    upright = Image.fromarray(astronaut[:, :400])  # 400 wide, 512 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_jpeg_bytes(stored, exif=exif.tobytes()))
    assert out.shape == (512, 400, 3)
    assert np.abs(out.astype(int) - np.asarray(upright, dtype=int)).mean() < 6
    faces = detector.detect(out)
    assert len(faces) == 1
    assert np.allclose(faces[0].box, ASTRONAUT_BOX, atol=12)


def test_sixteen_bit_scaled_not_clipped():
    a = np.full((8, 8), 32768, dtype=np.uint16)
    out = load_image(_png_bytes(Image.fromarray(a)))
    assert 120 <= int(out[0, 0, 0]) <= 135


def _sixteen_bit(astronaut: np.ndarray, kind: str) -> tuple[bytes, np.ndarray]:
    """The astronaut widened to 16 bits and encoded as ``kind``, and the 8-bit image it holds."""
    import cv2

    gray8 = np.asarray(Image.fromarray(astronaut).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # 0-255 onto 0-65535, as image tools widen
    if kind == "png I;16":
        return _png_bytes(Image.fromarray(gray16)), gray8
    if kind == "png I;16 (v << 8)":
        return _png_bytes(Image.fromarray(gray8.astype(np.uint16) << 8)), gray8
    if kind == "png I;16 + EXIF":
        exif = Image.Exif()
        exif[0x0112] = 1
        return _png_bytes(Image.fromarray(gray16), exif=exif.tobytes()), gray8
    if kind in ("tiff I;16", "tiff I;16B", "tiff I", "tiff I (0-255)"):
        im = {"tiff I;16": Image.fromarray(gray16),
              "tiff I;16B": Image.frombytes("I;16B", gray16.shape[::-1],
                                            gray16.astype(">u2").tobytes()),
              "tiff I": Image.fromarray(gray16.astype(np.int32), "I"),
              "tiff I (0-255)": Image.fromarray(gray8.astype(np.int32), "I")}[kind]
        buf = io.BytesIO()
        im.save(buf, format="TIFF")
        return buf.getvalue(), gray8
    bgr16 = astronaut[..., ::-1].astype(np.uint16) * 257
    if kind == "png RGBA 16":
        bgr16 = np.dstack([bgr16, np.full(bgr16.shape[:2], 65535, np.uint16)])
    ext = ".tif" if kind == "tiff RGB 16" else ".png"
    return cv2.imencode(ext, bgr16)[1].tobytes(), astronaut


SIXTEEN_BIT_KINDS = ["png I;16", "png I;16 (v << 8)", "png I;16 + EXIF", "tiff I;16",
                     "tiff I;16B", "tiff I", "tiff I (0-255)", "png RGB 16", "png RGBA 16",
                     "tiff RGB 16"]


@pytest.mark.parametrize("kind", SIXTEEN_BIT_KINDS)
def test_sixteen_bit_decodes_as_the_eight_bit_image(astronaut, kind):
    data, eight = _sixteen_bit(astronaut, kind)
    out = load_image(data, name=kind)
    if eight.ndim == 2:
        eight = np.repeat(eight[..., None], 3, axis=2)
    assert out.shape == eight.shape and out.dtype == np.uint8
    # Exact: the high byte undoes both v * 257 and v << 8 (scaling by 255/65535 is off by one
    # for v << 8, clipping as Pillow's convert does turns the photo white).
    assert np.array_equal(out, eight)


def test_sixteen_bit_gray_is_aged_as_the_eight_bit_one(astronaut):
    """The shipped model gives the 16-bit PNG the 8-bit PNG's age (a clipping decode finds no
    face at all: Pillow's own convert("L") turns the photo nearly white)."""
    from faceage.inference.modelfile import DEFAULT_MODEL_PATH, load_model_file

    if not DEFAULT_MODEL_PATH.exists():
        pytest.skip(f"{DEFAULT_MODEL_PATH} is not in this checkout")
    data16, gray8 = _sixteen_bit(astronaut, "png I;16")
    pipe = FacePipeline(load_model_file(DEFAULT_MODEL_PATH))
    (faces8, ages8), (faces16, ages16) = pipe.predict_faces(
        [load_image(_png_bytes(Image.fromarray(gray8))), load_image(data16)])
    assert len(faces8) == len(faces16) == 1
    assert abs(float(ages16.age[0]) - float(ages8.age[0])) < 0.5


@pytest.mark.parametrize("name,data,status,words", [
    ("empty", b"", 400, "empty"),
    ("text", b"this is not a picture\n" * 20, 400, "not an image"),
    ("bomb", png_header_only(100_000, 100_000), 413, "pixels"),
    ("over limit", png_header_only(9_000, 9_000), 413, "megapixels"),
])
def test_bad_bytes_give_image_errors(name, data, status, words):
    with pytest.raises(ImageError) as err:
        load_image(data, name=name)
    assert err.value.status == status
    assert name in str(err.value) and words in str(err.value)


def test_truncated_jpeg_is_a_400(astronaut_path):
    data = astronaut_path.read_bytes()
    with pytest.raises(ImageError) as err:
        load_image(data[: len(data) // 2], name="half.jpg")
    assert err.value.status == 400 and "truncated" in str(err.value)


def test_pixel_limit_is_configurable(astronaut_path):
    with pytest.raises(ImageError) as err:
        load_image(astronaut_path, max_pixels=100_000)
    assert err.value.status == 413


def test_unreadable_paths(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


# -- detection -----------------------------------------------------------------------------------


def test_detects_the_astronaut_where_she_is(astronaut, detector):
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.95
    assert np.allclose(f.box, ASTRONAUT_BOX, atol=10)
    assert np.allclose(f.landmarks[:2], ASTRONAUT_EYES, atol=6)


def test_no_face_in_the_rocket_photo(rocket_path, detector):
    assert detector.detect(load_image(rocket_path)) == []


def test_thirty_faces(astronaut, detector):
    face = np.asarray(Image.fromarray(astronaut[40:200, 160:290]).resize((80, 98)))
    canvas = np.full((5 * 110, 6 * 100, 3), 235, np.uint8)
    for r in range(5):
        for c in range(6):
            canvas[r * 110 + 6: r * 110 + 104, c * 100 + 10: c * 100 + 90] = face
    faces = detector.detect(canvas)
    assert len(faces) == 30
    centres = sorted(((f.box[1] + f.box[3]) / 2 // 110, (f.box[0] + f.box[2]) / 2 // 100)
                     for f in faces)
    assert centres == sorted((r, c) for r in range(5) for c in range(6))


def test_face_filling_the_frame_is_found_by_padding(astronaut, detector):
    tight = astronaut[66:166, 175:275]  # the face alone, as in a pre-cropped chip
    faces = detector.detect(tight)
    assert len(faces) == 1
    eyes = np.array(ASTRONAUT_EYES) - np.array([175, 66])
    assert np.allclose(faces[0].landmarks[:2], eyes, atol=6)


def test_large_images_are_detected_downscaled_and_mapped_back(astronaut, detector):
    big = np.asarray(Image.fromarray(astronaut).resize((3072, 3072), Image.Resampling.BILINEAR))
    faces = detector.detect(big)
    assert len(faces) == 1
    assert np.allclose(faces[0].box, np.array(ASTRONAUT_BOX) * 6, atol=60)
    assert np.allclose(faces[0].landmarks[:2], np.array(ASTRONAUT_EYES) * 6, atol=36)


def test_min_face_size_and_tiny_images(astronaut):
    assert FaceDetector(DetectorConfig(min_face_size=200)).detect(astronaut) == []
    assert FaceDetector().detect(np.zeros((8, 8, 3), np.uint8)) == []


def test_min_face_fraction_skips_faces_small_for_the_frame(astronaut):
    """The live-stream profile's bound: the astronaut's face is ~18 % of the photo's side."""
    assert len(FaceDetector(DetectorConfig(min_face_fraction=0.1)).detect(astronaut)) == 1
    bounded = FaceDetector(DetectorConfig(min_face_fraction=0.3))
    assert bounded.detect(astronaut) == []
    assert bounded.min_face(480, 640) == pytest.approx(144) and bounded.min_face(40, 40) == 20


def test_a_close_up_is_re_found_padded_with_a_bounded_pyramid(astronaut, detector, monkeypatch):
    """A face filling most of the frame sends ``pad: auto`` to a padded second pass; that pass
    only searches faces at least half as large (a few pyramid levels, not all), and a small face
    the first pass found elsewhere is kept."""
    region = astronaut[30:200, 150:300]
    canvas = np.full((400, 520, 3), 200, np.uint8)
    canvas[5:395, 0:340] = np.asarray(Image.fromarray(region).resize((340, 390)))
    canvas[20:88, 440:500] = np.asarray(Image.fromarray(region).resize((60, 68)))
    calls = []
    run = detector._run_mtcnn
    monkeypatch.setattr(detector, "_run_mtcnn",
                        lambda image, min_face: calls.append((image.shape, min_face))
                        or run(image, min_face))
    big, small = detector.detect(canvas)
    side = max(big.box[2] - big.box[0], big.box[3] - big.box[1])
    assert side >= 0.6 * 400 and small.box[0] > 400 and small.area < big.area / 10
    assert len(calls) == 4  # and the same two on the mirror image
    (first_shape, first_min), (padded_shape, padded_min) = calls[:2]
    assert [shape for shape, _ in calls[2:]] == [first_shape, padded_shape]
    assert first_shape == canvas.shape and first_min == 20
    assert padded_shape[0] > 400 and padded_min >= 0.4 * side


def test_detect_near_searches_around_the_previous_boxes(astronaut, detector, untrained_model_file):
    """Tracking in a video: the face is found from last frame's box (shifted 12 px since), a
    box where no face is finds nothing there, and FaceFinder then searches the whole frame."""
    from faceage.inference.modelfile import load_model_file

    frame = np.full((480, 640, 3), 90, np.uint8)
    frame[40:440, 72:472] = np.asarray(Image.fromarray(astronaut).resize((400, 400)))
    [whole] = detector.detect(frame)
    previous = (whole.box - np.array([12, 0, 12, 0])).tolist()
    [near] = detector.detect_near(frame, [previous])
    assert np.abs(near.box - whole.box).max() < 6
    assert np.abs(near.landmarks - whole.landmarks).max() < 4
    assert detector.detect_near(frame, [[540, 360, 600, 420]]) == []
    finder = FaceFinder.for_model(load_model_file(untrained_model_file).metadata, detector)
    faces, tracked = finder.find_tracked(frame, [previous])
    assert tracked and len(faces) == 1 and faces[0].crop is not None
    faces, tracked = finder.find_tracked(frame, [[540, 360, 600, 420]])
    assert not tracked and len(faces) == 1  # nothing there: the whole frame was searched


def test_a_face_and_its_mirror_image_are_framed_alike(astronaut, detector):
    """``mirror`` (the photo default): the faces of the mirror image are the mirror of the
    photo's faces, to float precision, and so are their crops; one pass is not symmetric."""
    from testkit.frames import group_photo, place

    one_pass = FaceDetector(DetectorConfig(mirror=False))
    images = {"astronaut": astronaut, "group": group_photo(),
              "close-up": place(astronaut, 1.6, 330, 300)}
    policy = CropPolicy()
    worst_one_pass = 0.0
    for label, image in images.items():
        w = image.shape[1]
        flipped = np.ascontiguousarray(image[:, ::-1])
        faces, mirrored = detector.detect(image), detector.detect(flipped)
        assert len(faces) == len(mirrored) >= 1, label
        for a, b in zip(faces, mirrored, strict=True):
            assert np.allclose(a.box[[1, 3]], b.box[[1, 3]], atol=1e-3), label
            assert np.allclose(a.box[[0, 2]], (w - 1) - b.box[[2, 0]], atol=1e-3), label
            marks = b.landmarks[[1, 0, 2, 4, 3]]
            assert np.allclose(a.landmarks[:, 0], (w - 1) - marks[:, 0], atol=1e-3), label
            assert np.allclose(a.landmarks[:, 1], marks[:, 1], atol=1e-3), label
            crop_a, crop_b = (align_face(image, a, policy, 64),
                              align_face(flipped, b, policy, 64))
            # Equal up to the template's own asymmetry (its centre is 0.004 of the side left
            # of the middle) and rounding: a fraction of a grey level on average.
            assert np.abs(crop_a.astype(int) - crop_b[:, ::-1]).mean() < 6, label
        a, b = one_pass.detect(image)[0], one_pass.detect(flipped)[0]
        worst_one_pass = max(worst_one_pass, float(np.abs(
            a.landmarks[:, 0] - ((w - 1) - b.landmarks[[1, 0, 2, 4, 3], 0])).max()))
    assert worst_one_pass > 0.1  # MTCNN alone is not mirror-symmetric


def test_mirror_average_keeps_faces_found_by_one_pass_only():
    from faceage.inference.detection import mirror_average

    def face(x1, y1, x2, y2, score=0.99):
        marks = np.array([[x1 + 5, y1 + 5], [x2 - 5, y1 + 5], [(x1 + x2) / 2, (y1 + y2) / 2],
                          [x1 + 6, y2 - 5], [x2 - 6, y2 - 5]], np.float32)
        return Face(np.array([x1, y1, x2, y2], np.float32), score, marks)

    width = 100
    # Found by both (the mirror pass finds it 2 px to the side), by the first pass only, and
    # by the mirror pass only.
    first = [face(10, 10, 40, 40), face(60, 60, 90, 95)]
    mirrored = [face(width - 1 - 42, 10, width - 1 - 12, 40, 0.97),
                face(width - 1 - 30, 70, width - 1 - 5, 95)]
    merged = mirror_average(first, mirrored, width)
    assert len(merged) == 3
    both = min(merged, key=lambda f: abs(f.box[0] - 11))
    assert np.allclose(both.box, [11, 10, 41, 40]) and both.score == pytest.approx(0.98)
    assert np.allclose(both.landmarks[0], [16, 15]) and np.allclose(both.landmarks[1], [36, 15])
    assert [f.area for f in merged] == sorted((f.area for f in merged), reverse=True)


def test_grayscale_photo(astronaut, detector):
    gray = np.repeat(np.asarray(Image.fromarray(astronaut).convert("L"))[..., None], 3, axis=2)
    assert len(detector.detect(gray)) == 1


def test_rejects_non_rgb_arrays(detector):
    with pytest.raises(ImageError):
        detector.detect(np.zeros((10, 10), np.uint8))


# -- alignment -----------------------------------------------------------------------------------


def _landmarks_in_crop(face: Face, policy: CropPolicy, size: int) -> np.ndarray:
    m = policy.matrix(face, size)
    return face.landmarks @ m[:, :2].T + m[:, 2]


@pytest.mark.parametrize("size", [96, 200])
def test_aligned_crop_puts_landmarks_on_the_template(astronaut, detector, size):
    face = detector.detect(astronaut)[0]
    policy = CropPolicy()
    crop = align_face(astronaut, face, policy, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    pts = _landmarks_in_crop(face, policy, size)
    assert np.allclose(pts, np.array(UTKFACE_CHIP_TEMPLATE) * size, atol=0.05 * size)
    assert abs(pts[0, 1] - pts[1, 1]) < 0.015 * size  # eyes level


def test_alignment_undoes_head_tilt(astronaut, detector):
    face = detector.detect(astronaut)[0]
    upright = align_face(astronaut, face, CropPolicy(), 128)
    cx, cy = (face.box[:2] + face.box[2:]) / 2
    tilted = np.asarray(Image.fromarray(astronaut).rotate(25, center=(cx, cy),
                                                          resample=Image.Resampling.BILINEAR))
    tface = detector.detect(tilted)[0]
    eyes = tface.landmarks[:2]
    assert abs(np.degrees(np.arctan2(*(eyes[1] - eyes[0])[::-1]))) > 15  # the photo is tilted
    crop = align_face(tilted, tface, CropPolicy(), 128)
    pts = _landmarks_in_crop(tface, CropPolicy(), 128)
    assert abs(pts[0, 1] - pts[1, 1]) < 2.5
    # The same face comes out: the tilted photo's crop looks like the upright one's.
    assert np.abs(crop.astype(int) - upright.astype(int))[16:112, 16:112].mean() < 20


def test_margin_widens_the_crop(astronaut, detector):
    face = detector.detect(astronaut)[0]
    tight = _landmarks_in_crop(face, CropPolicy(), 200)
    wide = _landmarks_in_crop(face, CropPolicy(margin=0.25), 200)
    eye_tight = np.linalg.norm(tight[1] - tight[0])
    eye_wide = np.linalg.norm(wide[1] - wide[0])
    assert eye_wide == pytest.approx(eye_tight / 1.5, rel=1e-6)


def test_big_faces_are_area_averaged_not_aliased(astronaut, detector):
    big = np.asarray(Image.fromarray(astronaut).resize((2048, 2048), Image.Resampling.BICUBIC))
    face = detector.detect(big)[0]
    small = detector.detect(astronaut)[0]
    a = align_face(big, face, CropPolicy(), 64).astype(float)
    b = align_face(astronaut, small, CropPolicy(), 64).astype(float)
    assert np.abs(a - b).mean() < 12


def test_whole_image_face(astronaut):
    f = whole_image_face(astronaut[:300], 96)
    assert f.crop.shape == (96, 96, 3)
    assert f.box.tolist() == [0, 0, 512, 300] and f.landmarks.shape == (0, 2)


def test_crop_policy_metadata_round_trip():
    default = CropPolicy.from_metadata({"name": "utkface-chip"})
    assert default == CropPolicy() == CropPolicy.from_metadata(None)
    assert CropPolicy.from_metadata(default.to_metadata()) == default
    box = CropPolicy(name="b", kind="box", margin=0.3, box_scale=0.9, box_shift=0.07)
    assert CropPolicy.from_metadata(json.loads(json.dumps(box.to_metadata()))) == box
    with pytest.raises(UserError):
        CropPolicy.from_metadata({"name": "x", "template": [[0, 0]]})
    with pytest.raises(UserError):
        CropPolicy.from_metadata({"name": "x", "template": "nonsense"})


# -- the pipeline and its JSON record -------------------------------------------------------------


def test_face_record_is_the_documented_json(astronaut, detector):
    face = detector.detect(astronaut)[0]
    rec = json.loads(json.dumps(face_record(face, np.float32(41.234), np.float32(33.456),
                                            np.float64(50.0))))
    assert set(rec) == {"box", "score", "age", "age_interval", "landmarks"}
    assert len(rec["box"]) == 4 and all(isinstance(v, float) for v in rec["box"])
    assert isinstance(rec["score"], float) and rec["age"] == 41.23
    assert rec["age_interval"] == [33.46, 50.0]
    assert len(rec["landmarks"]) == 5 and all(len(p) == 2 for p in rec["landmarks"])


def test_pipeline_predicts_each_face(untrained_model_file, astronaut, rocket_path):
    from faceage.inference.modelfile import load_model_file

    model = load_model_file(untrained_model_file)
    pipe = FacePipeline(model)
    assert pipe.finder.size == 96
    (faces, est), (none, no_ages) = pipe.predict_faces([astronaut, load_image(rocket_path)])
    ages = est.age
    assert len(faces) == 1 and len(ages) == 1 and np.isfinite(ages[0])
    assert 0 <= est.low[0] <= ages[0] <= est.high[0]
    assert faces[0].crop.shape == (96, 96, 3)
    assert none == [] and len(no_ages) == 0
    records = pipe.predict(astronaut)
    assert records[0]["age"] == pytest.approx(float(ages[0]), abs=0.01)
    low, high = records[0]["age_interval"]
    assert low == pytest.approx(float(est.low[0]), abs=0.01) and high >= records[0]["age"]
    wide = FacePipeline(model, coverage=0.95).predict(astronaut)[0]["age_interval"]
    assert wide[1] - wide[0] > high - low
    # Serve composes the same two steps: FaceFinder.find then AgeModel.predict.
    finder = FaceFinder.for_model(model.metadata)
    again = model.predict([f.crop for f in finder.find(astronaut)])
    assert again[0] == pytest.approx(float(ages[0]), abs=1e-4)


def test_no_face_whole_uses_the_image(untrained_model_file, rocket_path):
    from faceage.inference.modelfile import load_model_file

    pipe = FacePipeline(load_model_file(untrained_model_file), no_face="whole")
    rocket = load_image(rocket_path)
    records = pipe.predict(rocket)
    assert len(records) == 1
    assert records[0]["box"] == [0.0, 0.0, float(rocket.shape[1]), float(rocket.shape[0])]
    assert records[0]["score"] == 0.0 and records[0]["landmarks"] == []


# -- photos as phones take them: reduced JPEG decoding, HEIC ---------------------------------------


def test_large_jpegs_decode_reduced_and_keep_the_original_size():
    """A 12 MP JPEG decodes at half size with ``reduce_to`` (libjpeg's DCT scaling), and the
    Photo keeps the original size; smaller JPEGs and other formats decode whole."""
    from faceage.inference.images import load_photo
    from testkit.photos import phone_jpeg, phone_scene

    data = phone_jpeg(12)
    photo = load_photo(data, reduce_to=1600)
    assert (photo.width, photo.height, photo.pixels.shape) == (4000, 3000, (1500, 2000, 3))
    assert photo.scale == (2.0, 2.0)
    assert load_photo(data).pixels.shape == (3000, 4000, 3)
    assert load_photo(data, reduce_to=2100).pixels.shape == (3000, 4000, 3)  # 1/2 < 2100
    # Stored a quarter turn off, EXIF orientation 6: upright, and the original size swapped.
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    phone_scene(4000, 3000).transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", exif=exif)
    turned = load_photo(buf.getvalue(), reduce_to=1000)
    assert (turned.width, turned.height, turned.pixels.shape) == (4000, 3000, (750, 1000, 3))
    png = io.BytesIO()
    phone_scene(3200, 2400).save(png, "PNG")
    assert load_photo(png.getvalue(), reduce_to=1000).scale == (1.0, 1.0)


def test_faces_of_a_reduced_decode_are_in_the_original_pixels():
    """FaceFinder.find_photo on the half-size decode of a 12 MP photo gives the face the full
    decode gives, in the original's pixels, and crops of the model's size."""
    from faceage.inference.images import Photo, load_photo
    from testkit.photos import phone_jpeg

    data = phone_jpeg(12)
    finder = FaceFinder(None, 96)
    reduced, _ = finder.find_photo(load_photo(data, reduce_to=1600))
    full, _ = finder.find_photo(Photo(load_image(data), 4000, 3000))
    assert len(reduced) == len(full) == 1 and reduced[0].crop.shape == (96, 96, 3)
    assert np.abs(reduced[0].box - full[0].box).max() < 0.01 * 4000
    assert np.abs(reduced[0].landmarks - full[0].landmarks).max() < 0.01 * 4000
    # The portrait is scaled 3000/512 and shifted 500 px right in the scene.
    expected = np.array(ASTRONAUT_BOX) * 3000 / 512 + [500, 0, 500, 0]
    assert np.allclose(reduced[0].box, expected, atol=0.03 * 3000)
    # Tracking boxes (``near``) are taken in the original's pixels too.
    near, tracked = finder.find_photo(load_photo(data, reduce_to=1600), [reduced[0].box])
    assert tracked and np.abs(near[0].box - reduced[0].box).max() < 0.01 * 4000


def test_heic_decodes_upright(detector):
    """A 12 MP HEIC stored a quarter turn off with orientation 6 (as phones save them) decodes
    upright: one face, eyes level and above the mouth."""
    from testkit.photos import phone_heic

    image = load_image(phone_heic())
    assert image.shape == (3024, 4032, 3)
    [face] = detector.detect(image)
    left_eye, right_eye, _, mouth_left, mouth_right = face.landmarks
    assert abs(left_eye[1] - right_eye[1]) < 0.2 * abs(right_eye[0] - left_eye[0])
    assert max(left_eye[1], right_eye[1]) < min(mouth_left[1], mouth_right[1])
