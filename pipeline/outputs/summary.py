"""The summary of several finished sweeps (the jobs of a multirun, or any sweeps): per sweep its answer with the FID
interval, the backbone's published default CFG and the gain over it; per backbone the best guidance of them all.

``summarize`` is pure data (best.yaml contents in, the summary out); ``summary_markdown`` and ``summary_png`` render
it; the rest reads the sweeps, writes summary.yaml, summary.md and summary.png, and logs one MLflow run. After the
jobs of ``python -m pipeline.sweep -m ...`` pipeline.callbacks does all of it; afterwards the same command builds it
again, or for any sweeps:

    python -m pipeline.outputs.summary PATH [PATH ...] [--out DIR] [--tracking-uri URI]

PATH: a multirun folder (``<root>/hydra/multirun/<time>``: every job in it), a sweep folder
(``<root>/sweeps/<name>``) or a best.yaml. The last line printed is ``summary: <path to summary.yaml>``. Bad input:
one line on stderr naming the problem and the fix, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.schema import ConfigError, compose_config
from pipeline.core.guidance import KINDS
from pipeline.core.render import log_weight_axis
from pipeline.data.files import atomic_write, store_lock
from pipeline.outputs.best import Best, CurveRecord, plain, read_best
from pipeline.runtime.tracking import ROLE_TAG, artifact_root
from tuners.screen import Rho
from tuners.space import Candidate

EXPERIMENT = "guidetune-summaries"  # the MLflow experiment of every summary (one run each)
FOLDER_TAG = "guidetune.summary"  # the summary's folder, on its run
MULTIRUN_YAML = "multirun.yaml"  # what Hydra writes in the folder of a multirun
FILES = ("summary.yaml", "summary.md", "summary.png")
DEFAULT_COLOR = "lightgray"  # the published default CFG's bar


# ------------------------------------------------------------------------------------------------ data


def _num(x: float | None) -> float:
    """A value to compare: a missing or non-finite FID ranks last."""
    return math.inf if x is None or not math.isfinite(x) else x


@dataclass
class Answer:
    """A sweep's answer: its guidance and its FID with the interval at N (on N hold-out images from image
    `holdout_from` when it is set: Best.holdout_from)."""

    sweep: str
    guidance: str
    kind: str
    w_cfg: float | None
    w_igg: float | None
    window: int | None
    fid: float
    fid_low: float
    fid_high: float
    num_images: int
    holdout_from: int | None = None

    @property
    def images(self) -> str:
        """N, and whether the FID is on hold-out images."""
        return f"{self.num_images}" + (" hold-out" if self.holdout_from is not None else "")


@dataclass
class JobRow(Answer):
    """One sweep's line of the summary: its answer and FID interval, the default CFG's, and the gain over it."""

    backbone: str = ""
    separated: bool | None = None  # from the sweep's runner-up
    default_w_cfg: float | None = None
    default_fid: float | None = None
    default_fid_low: float | None = None
    default_fid_high: float | None = None
    default_num_images: int | None = None
    gain: float | None = None  # FID(default) - FID(answer) on the same images, at default_num_images: > 0 is better
    gain_pct: float | None = None
    versus: str | None = None  # IGG against CFG on this backbone, with its interval
    proxy: str | None = None  # the proxy's direction on this backbone

    @classmethod
    def of(cls, best: Best, sweep: str) -> JobRow:
        d = best.default
        gain = None if d is None else d.gain
        return cls(
            sweep=sweep, backbone=best.backbone, guidance=best.guidance, kind=best.kind, w_cfg=best.w_cfg,
            w_igg=best.w_igg, window=best.window, fid=best.fid, fid_low=best.fid_low, fid_high=best.fid_high,
            num_images=best.num_images, holdout_from=best.holdout_from,
            separated=None if best.margin is None else best.margin.separated,
            default_w_cfg=None if d is None else d.w_cfg, default_fid=None if d is None else d.fid,
            default_fid_low=None if d is None else d.fid_low, default_fid_high=None if d is None else d.fid_high,
            default_num_images=None if d is None else d.num_images, gain=gain,
            gain_pct=None if gain is None or d is None or not d.fid else 100.0 * gain / d.fid,
            versus=None if best.versus is None else best.versus.verdict,
            proxy=None if best.proxy_rho is None else Rho(**asdict(best.proxy_rho)).verdict())


@dataclass
class RunnerUp:
    sweep: str
    kind: str
    fid: float
    fid_low: float
    fid_high: float


@dataclass
class BackboneBest(Answer):
    """The best guidance among one backbone's sweeps (lowest FID), and whether its interval clears the runner-up's."""

    gain: float | None = None
    gain_pct: float | None = None
    runner_up: RunnerUp | None = None
    separated: bool | None = None  # the two intervals do not overlap
    same_num_images: bool = True  # FID falls with N: compare at one N

    @classmethod
    def of(cls, rows: Sequence[JobRow]) -> BackboneBest:
        ranked = sorted(rows, key=lambda r: _num(r.fid))
        best, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
        separated = None
        if runner is not None and best.fid_high is not None and runner.fid_low is not None:
            separated = runner.fid_low > best.fid_high
        return cls(
            **{f.name: getattr(best, f.name) for f in fields(Answer)}, gain=best.gain, gain_pct=best.gain_pct,
            runner_up=None if runner is None else RunnerUp(runner.sweep, runner.kind, runner.fid, runner.fid_low,
                                                           runner.fid_high),
            separated=separated, same_num_images=len({r.images for r in ranked}) == 1)


@dataclass
class Summary:
    """The summary of finished sweeps: one row per sweep (in the order given), each backbone's best guidance over
    its sweeps, the confidence of the intervals, and each sweep's screen curves over the whole range."""

    level: float | None
    jobs: list[JobRow]
    backbones: dict[str, BackboneBest]
    curves: dict[str, dict[str, CurveRecord]]


def summarize(bests: Sequence[Best], names: Sequence[str] | None = None) -> Summary:
    """The summary of finished sweeps (their best.yaml records; names default to ``<backbone>-<guidance>``, the
    default sweep.name)."""
    if not bests:
        raise ValueError("no sweeps to summarize")
    names = list(names) if names is not None else [f"{b.backbone}-{b.guidance}" for b in bests]
    rows = [JobRow.of(best, name) for best, name in zip(bests, names, strict=True)]
    backbones = {b: BackboneBest.of([r for r in rows if r.backbone == b])
                 for b in dict.fromkeys(r.backbone for r in rows)}
    curves = {r.sweep: best.curves for r, best in zip(rows, bests, strict=True)}
    return Summary(bests[0].sampling.level, rows, backbones, curves)


# ------------------------------------------------------------------------------------------------ rendering


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _answer(row: JobRow | BackboneBest) -> str:
    return f"{row.kind} {Candidate(row.w_cfg, row.w_igg, row.window).label()}"


def _fid(row: Any, prefix: str = "") -> str:
    return f"{_f(getattr(row, f'{prefix}fid'))} [{_f(getattr(row, f'{prefix}fid_low'))}, " \
           f"{_f(getattr(row, f'{prefix}fid_high'))}]"


def summary_markdown(summary: Summary) -> str:
    """summary.md: one row per sweep, then the best guidance of each backbone in words."""
    level = summary.level
    interval = f"{level:.0%} interval" if level is not None else "interval"
    lines = ["# guidetune summary", "",
             f"| sweep | backbone | guidance | best kind | w | w′ | window | FID [{interval}] | N | "
             f"default CFG | default FID [{interval}] | N | gain over the default |",
             "|---|---|---|---|---:|---:|---|---|---:|---|---|---:|---|"]
    for r in summary.jobs:
        window = "-" if r.w_igg is None else "global" if r.window is None else str(r.window)
        default = "-" if r.default_fid is None else f"w={_f(r.default_w_cfg)}"
        gain = "-" if r.gain is None else f"{r.gain:+.2f} ({_f(r.gain_pct, 0)} %)"
        lines.append(
            f"| {r.sweep} | {r.backbone} | {r.guidance} | {r.kind} | {_f(r.w_cfg)} | {_f(r.w_igg)} | "
            f"{window} | {_fid(r)} | {r.images} | {default} | "
            f"{'-' if r.default_fid is None else _fid(r, 'default_')} | {r.default_num_images or '-'} | {gain} |")
    lines += ["", "A gain is FID(default CFG) − FID(answer) on the same images (at the default's N): > 0, the answer "
              "is better. An N marked hold-out: the answer's FID is on the images the race's last rung added, which "
              "no stage saw before choosing it (its own earlier images flatter it).", ""]
    checks = [r for r in summary.jobs if r.versus or r.proxy]
    if checks:
        lines += ["## IGG against CFG, and the proxy's direction, per sweep", ""]
        lines += [f"- **{r.sweep}**: " + "; ".join(x for x in (r.versus, r.proxy) if x) + "." for r in checks]
        lines.append("")
    lines += ["## Best guidance per backbone", ""]
    for backbone, b in summary.backbones.items():
        text = f"- **{backbone}**: {_answer(b)} (sweep {b.sweep}), FID {_fid(b)} at N={b.images}"
        runner = b.runner_up
        if runner is None:
            text += "; the only sweep of this backbone."
        elif b.separated:
            text += (f"; separated from the runner-up {runner.sweep} ({runner.kind}, FID {_fid(runner)}): "
                     "the intervals do not overlap.")
        else:
            text += (f"; **not separated** from the runner-up {runner.sweep} ({runner.kind}, FID "
                     f"{_fid(runner)}): the intervals overlap, either is as good as these sweeps can tell.")
        if not b.same_num_images:
            text += (" Its sweeps end at different N, or not all on hold-out images (FID falls as N grows, and an "
                     "answer's own images flatter it): compare them with care.")
        lines.append(text)
    return "\n".join(lines) + "\n"


def summary_png(summary: Summary) -> bytes:
    """summary.png: per sweep, the answer's FID and the default CFG's, each with its interval (bars); below, per
    backbone, each kind's FID over the whole range (the screen's curves, with their intervals)."""
    rows, curves = summary.jobs, summary.curves
    backbones = [b for b in summary.backbones if any(curves.get(r.sweep) for r in rows if r.backbone == b)]
    fig = Figure(figsize=(max(4.5 * max(len(backbones), 1), 1.2 * len(rows) + 2.0), 8.0 if backbones else 4.0))
    grid = fig.add_gridspec(2 if backbones else 1, max(len(backbones), 1))
    ax = fig.add_subplot(grid[0, :])
    width = 0.38

    def bars(offset: float, prefix: str, colors: list[str], hatch: str | None) -> None:
        x = [i + offset for i in range(len(rows))]
        fid = [_nan(getattr(r, f"{prefix}fid")) for r in rows]
        low = [f - _nan(getattr(r, f"{prefix}fid_low")) for f, r in zip(fid, rows, strict=True)]
        high = [_nan(getattr(r, f"{prefix}fid_high")) - f for f, r in zip(fid, rows, strict=True)]
        ax.bar(x, fid, width, yerr=[low, high], capsize=4, color=colors, hatch=hatch, edgecolor="black",
               linewidth=0.5)

    bars(-width / 2, "", [KINDS[r.kind].colour for r in rows], None)
    bars(width / 2, "default_", [DEFAULT_COLOR] * len(rows), "//")
    for i, r in enumerate(rows):
        if r.gain is not None:
            ax.annotate(f"{r.gain:+.2f}", (i, _nan(r.fid_high)), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r.sweep}\n{r.kind}" for r in rows], fontsize=8)
    level = summary.level
    ax.set_ylabel(f"FID ({level:.0%} interval)" if level is not None else "FID")
    ax.set_title("answer vs the published default CFG (annotated: the gain)", fontsize=9)
    kinds = dict.fromkeys(r.kind for r in rows)
    handles = [Patch(facecolor=KINDS[k].colour, edgecolor="black", label=f"answer: {k}") for k in kinds]
    handles.append(Patch(facecolor=DEFAULT_COLOR, edgecolor="black", hatch="//", label="published default CFG"))
    ax.legend(handles=handles, fontsize=8)
    for col, backbone in enumerate(backbones):
        curve_ax = fig.add_subplot(grid[1, col])
        mine = [r for r in rows if r.backbone == backbone and curves.get(r.sweep)]
        for r in mine:
            for label, c in curves[r.sweep].items():
                low = [f - lo for f, lo in zip(c.fid, c.fid_low, strict=True)]
                high = [hi - f for f, hi in zip(c.fid, c.fid_high, strict=True)]
                curve_ax.errorbar(c.total, c.fid, yerr=[low, high], fmt="o", ms=3, capsize=2, alpha=0.4,
                                  color=KINDS[c.kind].colour)
                curve_ax.plot(c.total, c.smoothed, "-", color=KINDS[c.kind].colour,
                              label=label if len(mine) == 1 else f"{r.sweep}: {label}")
            answer = sum(w for w in (r.w_cfg, r.w_igg) if w is not None)
            curve_ax.axvline(answer, color=KINDS[r.kind].colour, ls=":", lw=1)
        log_weight_axis(curve_ax, max(t for r in mine for c in curves[r.sweep].values() for t in c.total))
        curve_ax.set_xlabel("w + w' (log(1 + w) axis); dotted: the answer")
        curve_ax.set_ylabel(f"FID at {next(iter(curves[mine[0].sweep].values())).num_images} images")
        curve_ax.set_title(f"{backbone}: FID over the whole range", fontsize=9)
        curve_ax.legend(fontsize=6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


# ------------------------------------------------------------------------------------------------ sweeps and files


@dataclass(frozen=True)
class Source:
    """One finished sweep to summarize: its name and its best.yaml."""

    name: str
    best_yaml: Path


def _load(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}); give a multirun folder Hydra wrote") from None


def multirun_jobs(folder: Path) -> list[Source]:
    """The sweeps of a multirun folder, in job order: each job's .hydra/ names its sweep.name and output_dir."""
    jobs = []
    for hydra_yaml in folder.glob("*/.hydra/hydra.yaml"):
        hydra_cfg, cfg = _load(hydra_yaml).hydra, _load(hydra_yaml.with_name("config.yaml"))
        try:
            name, out = str(cfg.sweep.name), Path(str(cfg.sweep.output_dir))
            num, cwd = int(hydra_cfg.job.num), Path(str(hydra_cfg.runtime.cwd))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{hydra_yaml.parent}: not a guidetune job ({err}); give a multirun folder of "
                              "`python -m pipeline.sweep -m`") from None
        jobs.append((num, Source(name, (out if out.is_absolute() else cwd / out) / "best.yaml")))
    if not jobs:
        raise ConfigError(f"{folder}: no job folders (*/.hydra/hydra.yaml) in this multirun folder; give the folder "
                          "`python -m pipeline.sweep -m` wrote (hydra.sweep.dir)")
    return [source for _, source in sorted(jobs, key=lambda job: job[0])]


def find_sources(paths: Sequence[Path]) -> list[Source]:
    """The sweeps named by the command line: multirun folders, sweep folders and best.yaml files."""
    sources: list[Source] = []
    for path in paths:
        if path.is_file():
            sources.append(Source(path.parent.name, path))
        elif (path / "best.yaml").is_file():
            sources.append(Source(path.name, path / "best.yaml"))
        elif (path / MULTIRUN_YAML).is_file():
            sources += multirun_jobs(path)
        else:
            raise ConfigError(f"{path}: not a best.yaml, a sweep folder (with best.yaml) or a multirun folder (with "
                              f"{MULTIRUN_YAML}); give one of those, e.g. mlruns/hydra/multirun/<time>")
    return sources


def read_sources(sources: Sequence[Source]) -> list[Best]:
    """The best.yaml of each sweep; ConfigError for a sweep that has none (not finished) or a file that is not one."""
    bests = []
    for source in sources:
        if not source.best_yaml.is_file():
            raise ConfigError(f"sweep {source.name} has no {source.best_yaml}: it has not finished; rerun its command "
                              "(the same command resumes it)")
        try:
            bests.append(read_best(source.best_yaml))
        except (ValueError, yaml.YAMLError) as err:
            raise ConfigError(str(err).splitlines()[0]) from None
    return bests


def write_summary(folder: Path, summary: Summary) -> list[Path]:
    """summary.yaml, summary.md and summary.png in folder (each written atomically); their paths, yaml first."""
    data = (yaml.safe_dump(plain(asdict(summary)), sort_keys=False).encode(), summary_markdown(summary).encode(),
            summary_png(summary))
    return [atomic_write(folder / name, content) for name, content in zip(FILES, data, strict=True)]


def log_summary(uri: str, folder: Path, summary: Summary, files: Sequence[Path]) -> str:
    """One MLflow run per summary folder in the experiment guidetune-summaries: per-sweep metrics, the table, the
    files; its id. A summary built again for the same folder replaces that folder's earlier run."""
    with store_lock(uri):  # the client creates a fresh SQLite store; concurrent creators would crash
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(EXPERIMENT)
        experiment = found.experiment_id if found else client.create_experiment(
            EXPERIMENT, artifact_location=artifact_root(uri))
    for old in client.search_runs([experiment], f"tags.`{FOLDER_TAG}` = '{folder.resolve()}'"):
        client.delete_run(old.info.run_id)
    run_id = client.create_run(experiment, run_name=folder.name,
                               tags={ROLE_TAG: "summary", FOLDER_TAG: str(folder.resolve())}).info.run_id
    rows = [asdict(r) for r in summary.jobs]
    now = int(time.time() * 1000)
    metrics = [Metric(f"{r['sweep']}.{k}", float(r[k]), now, 0) for r in rows
               for k in ("fid", "fid_low", "fid_high", "default_fid", "gain")
               if r[k] is not None and math.isfinite(r[k])]
    tags = [RunTag(f"guidetune.best.{backbone}", f"{b.sweep}: {_answer(b)}")
            for backbone, b in summary.backbones.items()]
    tags += [RunTag(f"guidetune.separated.{backbone}", str(b.separated)) for backbone, b in summary.backbones.items()]
    client.log_batch(run_id, metrics=metrics, tags=tags)
    client.log_table(run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file="summary_table.json")
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def build(sources: Sequence[Source], folder: Path, uri: str) -> Path:
    """Read the sweeps, write the summary files into folder and log them to MLflow at uri; the path of summary.yaml.

    Every sweep is read (and every refusal raised) before anything is written.
    """
    summary = summarize(read_sources(sources), [s.name for s in sources])
    files = write_summary(folder, summary)
    log_summary(uri, folder, summary, files)
    return files[0]


# ------------------------------------------------------------------------------------------------ command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see `python -m pipeline.outputs.summary --help`")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m pipeline.outputs.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="a multirun folder (every job in it), a sweep folder or a best.yaml")
    parser.add_argument("--out", type=Path, help="where summary.* go (default: the multirun folder, when PATH is one)")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the multirun's tracking.uri, or the "
                        "sweep configuration's default)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        sources = find_sources(args.paths)
        multiruns = [p for p in args.paths if (p / MULTIRUN_YAML).is_file()]
        out = args.out or (multiruns[0] if len(args.paths) == 1 and multiruns else None)
        if out is None:
            raise ConfigError("--out is needed when PATH is not one multirun folder; e.g. --out mlruns/summary")
        uri = args.tracking_uri or str((_load(multiruns[0] / MULTIRUN_YAML) if multiruns
                                        else compose_config([])).tracking.uri)
        path = build(sources, out, uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
