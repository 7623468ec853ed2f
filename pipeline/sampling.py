"""The design's contract path for `sampling` (ARCHITECTURE.md, Contracts): the code is pipeline/core/sampling.py."""

from pipeline.core.sampling import *  # noqa: F403
