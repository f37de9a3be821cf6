"""Rebuild the committed test photos from scikit-image's public-domain samples.

    uv run --with scikit-image python tests/data/make_fixtures.py

astronaut.jpg: Eileen Collins, NASA (public domain; skimage.data.astronaut).
rocket.jpg: DSCOVR launch, SpaceX (public domain; skimage.data.rocket), a photo with no face.
"""

from pathlib import Path

from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent

Image.fromarray(data.astronaut()).save(HERE / "astronaut.jpg", quality=90)
rocket = Image.fromarray(data.rocket())
rocket.resize((rocket.width // 2, rocket.height // 2), Image.Resampling.LANCZOS).save(
    HERE / "rocket.jpg", quality=85)
