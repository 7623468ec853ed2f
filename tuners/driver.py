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
        next_job: the next (tag, job) to run, or None when the stage has nothing more to submit.
        on_done: called in the driver for each finished job, in completion order.
        desc: progress-bar label (the stage).
        total: jobs this call is expected to finish (progress-bar length).
    """
    exhausted = False
    with tqdm(total=total, desc=desc, unit="job", dynamic_ncols=True) as bar:
        while True:
            while not exhausted and pool.idle() > 0:
                item = next_job()
                if item is None:
                    exhausted = True
                else:
                    pool.submit(*item)
            if pool.pending() == 0:
                return
            on_done(pool.wait())
            bar.update(1)
