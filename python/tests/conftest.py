import os

import numpy as np
import pytest
from hypothesis import settings


# lowbit's parallel kernels and torch's both run on the cores CI has.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Property tests draw the same examples on every run, so that a commit passes or fails the same
# way everywhere; LOWBIT_HYPOTHESIS_RANDOM=1 explores fresh examples (and finds new ties).
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("LOWBIT_HYPOTHESIS_RANDOM") == "1" else "fixed")

RANGES = [(-2, 1), (0, 3), (-8, 7), (0, 15), (-16, 15), (0, 31), (-64, 63), (-128, 127), (0, 255)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def adversarial(scale: float, n_random: int = 4000, seed: int = 0) -> np.ndarray:
    """Values on every .5 tie of the grid, specials, denormals and random values, as float32."""
    r = np.random.default_rng(seed)
    k = np.arange(-300, 300, dtype=np.float32)
    ties = (k + 0.5) * np.float32(scale)
    near = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))
    specials = np.array(
        [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 3e38, -3e38, 1e19, -1e19, 9.2e18, 3e9, -3e9],
        dtype=np.float32,
    )
    rand = (r.standard_normal(n_random) * 40 * scale).astype(np.float32)
    return np.concatenate([ties, *near, specials, rand]).astype(np.float32)
