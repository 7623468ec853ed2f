"""The design's contract path for `guidance` (ARCHITECTURE.md, Contracts): the code is pipeline/core/guidance.py."""

from pipeline.core.guidance import *  # noqa: F403
