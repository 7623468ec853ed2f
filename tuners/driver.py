"""The driver loop shared by every stage: keep every worker busy, hand each finished job back as it arrives."""

from __future__ import annotations

from tqdm import tqdm

from tuners.jobs import Pool, Steps


def drive(pool: Pool, steps: Steps, *, desc: str, total: int) -> None:
    """Submit work while a worker is idle, then wait for any one job; repeat until no work is left or running.

    Args:
        pool: the workers.
        steps: what to run: ``next_job()`` gives the next (tag, job), or None when there is nothing to submit now
            (it is asked again after each finished job; the loop ends when it returns None with nothing running),
            and ``on_done(done)`` takes each finished job, in the driver, in completion order.
        desc: progress-bar label (the stage).
        total: jobs this call is expected to finish (progress-bar length).
    """
    with tqdm(total=total, desc=desc, unit="job", dynamic_ncols=True) as bar:
        while True:
            while pool.idle() > 0 and (item := steps.next_job()) is not None:
                pool.submit(*item)
            if pool.pending() == 0:
                return
            steps.on_done(pool.wait())
            bar.update(1)
