"""Seeds: every random stream of a sweep derives from the sweep seed and an index, never from global state."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, index: int) -> int:
    """An independent seed for item `index` of a run seeded with `seed` (NumPy SeedSequence of the pair)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
