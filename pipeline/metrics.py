"""The design's contract path for `metrics` (ARCHITECTURE.md, Contracts): the code is pipeline/core/metrics.py."""

from pipeline.core.metrics import *  # noqa: F403
