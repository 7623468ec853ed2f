"""The driver loop shared by every stage: keep every worker busy, hand each finished job back as it arrives."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from tuners.jobs import Done, Job, Pool


def drive(
    pool: Pool,
    next_job: Callable[[], tuple[int, Job] | None],
    on_done: Callable[[Done], None],
    *,
    desc: str,
    total: int,
) -> None:
    """Submit work while a worker is idle, then wait for any one job; repeat until no work is left or running.

    Args:
        pool: the workers.
        next_job: the next (tag, job) to run, or None when the stage has nothing to submit now (it is asked again
            after each finished job; the loop ends when it returns None with nothing running).
        on_done: called in the driver for each finished job, in completion order.
        desc: progress-bar label (the stage).
        total: jobs this call is expected to finish (progress-bar length).
    """
    with tqdm(total=total, desc=desc, unit="job", dynamic_ncols=True) as bar:
        while True:
            while pool.idle() > 0 and (item := next_job()) is not None:
                pool.submit(*item)
            if pool.pending() == 0:
                return
            on_done(pool.wait())
            bar.update(1)
