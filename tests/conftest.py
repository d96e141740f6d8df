from __future__ import annotations

import numpy as np
import pytest

from scatstore.sample_data import load_image


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return load_image("astronaut")


@pytest.fixture(scope="session")
def textures() -> dict[str, np.ndarray]:
    return {n: load_image(n, rgb=False) for n in ("brick", "grass", "gravel")}
