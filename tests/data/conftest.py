"""Fixtures of the data tests: the hostile image server of tests/image_helpers.py with photo-like images."""

from __future__ import annotations

import numpy as np
import pytest
from image_helpers import ImageServer, encode, photo_like


@pytest.fixture(scope="module")
def served_images() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    images = photo_like(rng, 24, size=80)
    out = {f"{i:03d}.jpg": encode(im, "JPEG", quality=90) for i, im in enumerate(images[:20])}
    out.update({f"{i:03d}.png": encode(im, "PNG") for i, im in enumerate(images[20:], start=20)})
    return out


@pytest.fixture(scope="module")
def image_server(served_images):
    server = ImageServer(served_images)
    yield server
    server.close()
