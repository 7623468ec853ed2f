"""One Ray node vs two on this machine: the sweep's wall time, and the per-trial overhead a cluster adds.

The same sweep (`python -m pipeline.sweep`, sweep defaults plus a small budget plus the overrides given) runs three
times, each under its own sweep name in one root (the FID reference statistics are computed once, beforehand):

- ``local``: ``launcher.address=null``, the sweep starts its own Ray with 2 CPUs;
- ``1 node``: ``ray start --head --num-cpus=2``, then the sweep with ``launcher=cluster``;
- ``2 nodes``: a head and a second node with 1 CPU each, the same sweep.

All three have 2 actors of 1 CPU on the same 2 cores, so the ratios should be about 1x. Everything runs in a network
namespace with only loopback (tests/loopback.py; needs root), so no traffic leaves the machine. Per trial, as in
bench_costs.py: worker time inside the actor, and overhead = the driver's time on the trial (its MLflow child run)
minus the worker time.

    python bench/bench_cluster.py --write [override ...]     # writes docs/BENCHMARKS.md "## A Ray cluster"
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_costs import Trial, read_trials, spread
from benchdoc import BENCHMARKS, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback-only cluster the tests use

from loopback import HEAD, enter, in_namespace, kill_all, start_nodes  # noqa: E402

SECTION = "A Ray cluster"
WORKERS = 2
BUDGET = ["search.n_trials=12", "screen.points=4", "screen.rungs=[128]", "screen.regions=1", "refine.n_trials=2",
          "refine.num_images=128", "confirm.finalists=2",
          "confirm.rungs=[192,256]", "confirm.reference_num_images=512", f"launcher.workers={WORKERS}"]
CLUSTER = ["launcher=cluster", f"launcher.address={HEAD}", "launcher.cpus_per_worker=1"]
SETUPS = {"local": ([], []), "1 node": ([2], CLUSTER), "2 nodes": ([1, 1], CLUSTER)}  # node CPUs, extra overrides
RUN_TIMEOUT_S = 1800


def sweep_name(setup: str) -> str:
    return "bench-cluster-" + setup.replace(" ", "-")


def sweep_args(root: Path, setup: str, overrides: list[str]) -> list[str]:
    return [f"root={root}", f"sweep.name={sweep_name(setup)}", *BUDGET, *SETUPS[setup][1], *overrides]


def inside(work: Path, overrides: list[str]) -> None:
    """In the namespaces: each setup's nodes, its sweep (timed), then every Ray process killed; to WORK/runs.json."""
    enter(work / "home")
    runs = {}
    for setup, (cpus, _) in SETUPS.items():
        if cpus:
            start_nodes(cpus)
        started = time.time()
        proc = subprocess.run([sys.executable, "-m", "pipeline.sweep", *sweep_args(work / "root", setup, overrides)],
                              cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        runs[setup] = {"started": started, "finished": time.time(), "rc": proc.returncode,
                       "stdout": proc.stdout[-2000:], "stderr": proc.stderr[-4000:]}
        kill_all(set())
    (work / "runs.json").write_text(json.dumps(runs))


def summary(run: dict, trials: list[Trial], workers: int) -> dict[str, float]:
    """Seconds of one run: wall, start-up, trial phase, summed worker time, median overhead per trial; the share of
    the workers' capacity over the trial phase spent on trials (busy); the number of nodes that ran trials."""
    first, last = min(t.start_s for t in trials), max(t.end_s for t in trials)
    work_s = sum(t.wall_s for t in trials)
    return {"wall_s": run["finished"] - run["started"], "phase_s": last - first, "start_s": first - run["started"],
            "work_s": work_s, "extra_s": statistics.median(t.extra_s for t in trials),
            "busy": work_s / (workers * (last - first)), "nodes": len({t.node for t in trials})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides passed to every sweep")
    p.add_argument("--write", action="store_true", help=f"write the ## {SECTION} section of docs/BENCHMARKS.md")
    p.add_argument("--inside", type=Path, help=argparse.SUPPRESS)  # the run inside the namespaces
    args = p.parse_args(argv)
    if args.inside is not None:
        inside(args.inside, args.overrides)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("bench_cluster.py needs root (unshare) for its loopback-only network namespace")
    command = "python bench/bench_cluster.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    work = Path(tempfile.mkdtemp(prefix="guidetune-cluster-"))
    atexit.register(shutil.rmtree, work, True)
    from pipeline.config.schema import load_config
    from pipeline.preflight import fid_reference

    fid_reference(load_config(sweep_args(work / "root", "local", args.overrides)))  # cached for all three
    load_before = os.getloadavg()[0]
    proc = in_namespace([sys.executable, __file__, "--inside", str(work), *args.overrides], cwd=ROOT,
                        timeout_s=len(SETUPS) * RUN_TIMEOUT_S)
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        raise RuntimeError(f"the run in the namespaces failed: {proc.stderr[-4000:]}")
    runs = json.loads((work / "runs.json").read_text())
    failed = {s: r["stderr"] for s, r in runs.items() if r["rc"] != 0}
    if failed:
        raise RuntimeError(f"sweeps failed: {failed}")
    uri = f"sqlite:///{work / 'root'}/mlflow.db"
    trials = {s: read_trials(uri, sweep_name(s))[0] for s in SETUPS}
    stats = {s: summary(runs[s], trials[s], WORKERS) for s in SETUPS}
    best = {s: (work / "root" / "sweeps" / sweep_name(s) / "best.yaml").read_text() for s in SETUPS}
    base = stats["local"]
    rows = [
        f"| {s} | {st['nodes']} | {st['wall_s']:.1f} | {st['wall_s'] / base['wall_s']:.2f}x | {st['start_s']:.1f} | "
        f"{st['phase_s']:.1f} | {st['phase_s'] / base['phase_s']:.2f}x | {st['work_s']:.1f} | {st['busy']:.1%} | "
        f"{spread([t.extra_s for t in trials[s]])} | {st['extra_s'] - base['extra_s']:+.3f} |"
        for s, st in stats.items()
    ]
    same = "the same" if len(set(best.values())) == 1 else "NOT the same"
    n = {s: len(ts) for s, ts in trials.items()}
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load_before:.1f} before, {load_after:.1f} after); {date}.  ",
        f"Sweep: sweep defaults (embedded tiny backbone, mixed guidance) with `{' '.join(BUDGET)}`"
        f"{' ' + ' '.join(args.overrides) if args.overrides else ''}; clusters add `{' '.join(CLUSTER)}`. "
        f"Finished trials per run: {', '.join(f'{s} {k}' for s, k in n.items())}. All three wrote {same} "
        "best.yaml.",
        "",
        "Wall: the sweep process, start to exit (a cluster's `ray start` comes before, not counted). Start-up: "
        "to the first trial's start (config, checkpoint check, connecting or starting Ray, the actors; the FID "
        "reference was cached beforehand). Trial phase: first "
        "trial start to last trial end. Busy: worker time / (workers x trial phase), the share of the actors' "
        "capacity spent on trials; it does not depend on how fast the shared cores ran, the wall times do (the "
        "summed worker time of the same trials moves with the other jobs' load). Overhead per trial: the driver's "
        "time on the trial minus the worker's, median (min-max) over all trials; the last column is its median "
        "minus the local sweep's.",
        "",
        "| run | nodes used | wall s | vs local | start-up s | trial phase s | vs local | worker s (sum) | busy | "
        "overhead s / trial | vs local |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])
    print(body)
    if args.write:
        write_section(BENCHMARKS, SECTION, body)
        print(f"wrote the ## {SECTION} section of {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
