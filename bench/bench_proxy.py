"""Proxy validity on the embedded backbone: does the evenness-divergence equilibrium gap rank guidance like FID?

For every configuration of a grid (pure CFG over w, pure IGG over w' with global and windowed attention, CFG + IGG
mixed) it runs the sweep's own jobs on the sweep's own worker (pipeline.distributed.Worker, no Ray):

- proxy trials: ``Job(candidate, proxy.num_images, seed)`` for several seeds, exactly a stage-1 trial (trial-level
  vocabulary and token evenness, divergence from the unconditional and from the conditional logits);
- one FID evaluation: ``Job(candidate, --num-images, --fid-seed, fid=True)`` in the embedded extractor's space
  against the embedded shapes reference (the sweep's ``fid_reference``), same labels and seed for every
  configuration.

The gap is calibrated as the default sweep does it (tuners.proxy.Calibration): min-max ranges of each signal over
the stage-0 design points of ``guidance=mixed`` (tuners.space.design_points) plus the baselines
(tuners.confirm.baselines), measured with the same proxy jobs. Results are cached per configuration in a JSON file
(``--results``) that bench/bench_search.py reads.

    python bench/bench_proxy.py --write    # docs/BENCHMARKS.md "## Proxy validity" and docs/proxy_equilibrium.png
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
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
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from benchdoc import BENCHMARKS, write_section
from scipy.stats import spearmanr

from pipeline.config import SweepConfig, load_config
from pipeline.distributed import Worker
from pipeline.sweep import fid_reference
from tuners.confirm import baselines
from tuners.jobs import DIVERGENCE_SIGNAL, EVENNESS_SIGNAL, SIGNALS, Job
from tuners.proxy import Calibration, gap_name
from tuners.space import Candidate, design_points

ROOT = Path(__file__).resolve().parent.parent
SECTION = "Proxy validity"
PLOT = ROOT / "docs" / "proxy_equilibrium.png"
DEFAULT_RESULTS = Path(tempfile.gettempdir()) / "guidetune_bench_proxy.json"
PAIRS = [(e, r) for e in EVENNESS_SIGNAL for r in DIVERGENCE_SIGNAL]


def family(c: Candidate) -> str:
    """cfg | igg global | igg window s | mixed global | mixed window s."""
    kind = "cfg" if c.w_igg is None else "igg" if c.w_cfg is None else "mixed"
    if kind == "cfg":
        return kind
    return f"{kind} {'global' if c.window is None else f'window {c.window}'}"


def grid(cfg_w: list[float], igg_w: list[float], window_w: list[float], windows: list[int],
         mixed: list[float]) -> list[Candidate]:
    """Pure CFG over cfg_w; pure IGG (global) over igg_w and windowed over window_w for each window; mixed
    CFG + IGG on the diagonal w = w' over `mixed`, global and (at the two middle weights) windowed."""
    out = [Candidate(w, None, None) for w in cfg_w]
    out += [Candidate(None, w, None) for w in igg_w]
    out += [Candidate(None, w, s) for s in windows for w in window_w]
    out += [Candidate(w, w, None) for w in mixed]
    middle = mixed[len(mixed) // 2 - 1: len(mixed) // 2 + 1] if len(mixed) > 1 else mixed
    out += [Candidate(w, w, s) for s in windows for w in middle]
    return list(dict.fromkeys(out))


def key_of(c: Candidate) -> str:
    return json.dumps([c.w_cfg, c.w_igg, c.window])


def file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def provenance(path: str) -> str:
    """Where a checkpoint comes from: the last commit that changed it, when it is the committed file; else its path."""
    resolved = Path(path).resolve()
    if resolved.is_relative_to(ROOT):
        unchanged = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", str(resolved)])
        commit = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", str(resolved)],
                                capture_output=True, text=True).stdout.strip()
        if unchanged.returncode == 0 and commit:
            return f"{resolved.relative_to(ROOT)} as committed in {commit}"
    return str(path)


class Results:
    """Per-configuration results, cached in a JSON file keyed by checkpoint, image count and seeds."""

    def __init__(self, path: Path, setup: dict):
        self.path, self.setup = path, setup
        stored = json.loads(path.read_text()) if path.is_file() else {}
        same = stored.get("setup") == setup
        self.entries: dict[str, dict] = stored.get("entries", {}) if same else {}
        self.runs: list[dict] = stored.get("runs", []) if same else []  # the invocations that measured entries
        self.fresh = 0  # entries measured by this process

    def get(self, c: Candidate, compute: Callable[[], dict], needs: str = "proxy") -> dict:
        """The cached entry of `c` if it holds `needs`, else `compute()`'s, stored."""
        key = key_of(c)
        if needs not in self.entries.get(key, {}):
            self.entries[key] = {"candidate": c.as_dict(), **compute(),
                                 "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
            self.fresh += 1
            self.save()
        return self.entries[key]

    def record_run(self, run: dict) -> None:
        """Remember how this invocation measured its entries (time, machine load), if it measured any."""
        if self.fresh:
            self.runs.append({**run, "configurations": self.fresh})
            self.save()

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"setup": self.setup, "runs": self.runs, "entries": self.entries}, indent=1))
        os.replace(tmp, self.path)


def evaluate(worker: Worker, c: Candidate, cfg: SweepConfig, seeds: list[int], num_images: int,
             fid_seed: int | None) -> dict:
    """Proxy trials at every seed and (unless fid_seed is None) one FID evaluation, as the sweep runs them."""
    proxy = []
    for seed in seeds:
        ev = worker.evaluate(Job(c, cfg.proxy.num_images, seed))
        if ev.error:
            raise RuntimeError(f"proxy trial {c.label()} seed {seed}: {ev.error}")
        proxy.append({"seed": seed, "signals": ev.signals, "wall_s": ev.wall_s})
    out: dict = {"proxy": proxy}
    if fid_seed is not None:
        ev = worker.evaluate(Job(c, num_images, fid_seed, fid=True))
        if ev.error:
            raise RuntimeError(f"FID {c.label()}: {ev.error}")
        out.update(fid=ev.fid_metrics["fid"], fid_wall_s=ev.wall_s)
    return out


def calibration_of(points: list[dict], seed_index: int) -> Calibration:
    """The sweep's Calibration (min-max ranges over the design points) from the design points' proxy trials."""
    signals = [p["proxy"][seed_index]["signals"] for p in points]
    ranges = {name: (min(s[name] for s in signals), max(s[name] for s in signals)) for name in SIGNALS}
    return Calibration(ranges=ranges, points={})


def rho(x: list[float], y: list[float]) -> float:
    return float(spearmanr(x, y).statistic)


def fmt_spread(values: list[float]) -> str:
    return f"{statistics.median(values):+.2f} ({min(values):+.2f} to {max(values):+.2f})"


def plot(rows: list[dict], calibration: Calibration, path: Path, fid_images: int, gap: str) -> None:
    """Scaled E and D (mean over proxy seeds) against the weight for pure CFG and pure IGG (global), FID overlaid;
    dashed: the weight of the smallest `gap` (mean over seeds), grey: the lowest FID."""
    panels = [("cfg", "w_cfg", "CFG weight w (pure CFG)"), ("igg global", "w_igg", "IGG weight w' (pure IGG, global)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 5), layout="constrained")
    styles = [("vocab_evenness", "E: vocabulary evenness", "tab:blue", "-"),
              ("token_evenness", "E: token evenness", "tab:blue", ":"),
              ("div_uncond", "D: JSD(guided, uncond)", "tab:red", "-"),
              ("div_cond", "D: JSD(guided, cond)", "tab:red", "--")]
    for ax, (fam, weight, label) in zip(axes, panels, strict=True):
        chosen = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["candidate"][weight])
        w = [r["candidate"][weight] for r in chosen]
        for name, text, color, ls in styles:
            lo, hi = calibration.ranges[name]
            ax.plot(w, [(r["signals"][name] - lo) / (hi - lo) for r in chosen], ls, color=color, marker=".",
                    label=text)
        ax.set_xlabel(label)
        ax.set_ylabel("min-max scaled by the sweep's calibration")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        fids = [r["fid"] for r in chosen]
        twin.plot(w, fids, "-", color="black", marker="o", label=f"FID ({fid_images} images)")
        best = min(range(len(w)), key=lambda i: fids[i])
        twin.axvline(w[best], color="black", alpha=0.3, lw=3, label="lowest FID")
        gaps = [statistics.fmean(g[gap] for g in r["gaps"]) for r in chosen]
        twin.axvline(w[min(range(len(w)), key=lambda i: gaps[i])], color="tab:purple", ls="--",
                     label=f"smallest {gap}")
        twin.set_ylabel("FID (guidetune-tiny features)")
        ax.set_title(f"{label.split(' (')[0]}: equilibrium vs FID")
    lines = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    fig.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="outside lower center", ncol=4)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the sweep config (e.g. backbone.var_ckpt=...)")
    p.add_argument("--cfg", type=float, nargs="+", default=[x / 2 for x in range(13)], help="pure CFG weights")
    p.add_argument("--igg", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0, 6.0], help="pure IGG, global")
    p.add_argument("--igg-windowed", type=float, nargs="+", default=[1.0, 3.0, 6.0], help="pure IGG, windowed")
    p.add_argument("--windows", type=int, nargs="+", default=[3], help="IGG windows of the windowed rows")
    p.add_argument("--mixed", type=float, nargs="+", default=None,
                   help="mixed w = w' (default: the guidance=mixed calibration diagonal)")
    p.add_argument("--num-images", type=int, default=512, help="FID sample count per configuration")
    p.add_argument("--fid-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="proxy-trial seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSON cache, read by bench_search.py")
    p.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md and docs/proxy_equilibrium.png")
    args = p.parse_args(argv)
    command = "python bench/bench_proxy.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start, load_before = time.monotonic(), os.getloadavg()[0]
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")

    root = Path(tempfile.mkdtemp(prefix="guidetune-proxy-"))  # the sweep root: FID reference cache only
    atexit.register(shutil.rmtree, root, True)
    base = [f"root={root}", "confirm.metrics=[fid]", f"launcher.cpus_per_worker={args.threads}", *args.overrides]
    cfg = load_config(["guidance=mixed", *base])
    mixed_points = design_points(cfg.guidance, cfg.search, cfg.proxy.calibration)
    calib_candidates = mixed_points + [c for c, _ in baselines(cfg.backbone)]
    mixed_w = args.mixed if args.mixed is not None else [c.w_cfg for c in mixed_points]
    candidates = grid(args.cfg, args.igg, args.igg_windowed, args.windows, mixed_w)
    setup = {"vae": file_sha(cfg.backbone.vae_ckpt), "var": file_sha(cfg.backbone.var_ckpt),
             "num_images": args.num_images, "fid_seed": args.fid_seed, "seeds": args.seeds,
             "proxy_images": cfg.proxy.num_images, "reference": cfg.confirm.reference,
             "reference_images": cfg.confirm.reference_num_images}
    results = Results(args.results, setup)
    worker = Worker(cfg, fid_reference(cfg))
    for i, c in enumerate(candidates):
        t = time.monotonic()
        r = results.get(c, lambda c=c: evaluate(worker, c, cfg, args.seeds, args.num_images, args.fid_seed),
                        needs="fid")
        print(f"[{i + 1}/{len(candidates)}] {c.label()}: FID {r['fid']:.2f} ({time.monotonic() - t:.0f} s)",
              flush=True)
    points = [results.get(c, lambda c=c: evaluate(worker, c, cfg, args.seeds, args.num_images, None))
              for c in calib_candidates]

    results.record_run({"start": started_at, "end": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                        "minutes": round((time.monotonic() - start) / 60, 1), "load_start": load_before,
                        "load_end": os.getloadavg()[0]})
    measured = "; ".join(f"{r['configurations']} configurations {r['start']} to {r['end']} ({r['minutes']:g} min, "
                         f"load average {r['load_start']:.1f} at start, {r['load_end']:.1f} at end)"
                         for r in results.runs)
    calibrations = [calibration_of(points, i) for i in range(len(args.seeds))]
    rows = []
    for c in candidates:
        r = results.entries[key_of(c)]
        per_seed = [calibrations[i].gaps(trial["signals"]) for i, trial in enumerate(r["proxy"])]
        mean_signals = {n: statistics.fmean(t["signals"][n] for t in r["proxy"]) for n in SIGNALS}
        rows.append({"candidate": c.as_dict(), "label": c.label(), "family": family(c), "fid": r["fid"],
                     "gaps": per_seed, "signals": mean_signals, "fid_wall_s": r["fid_wall_s"],
                     "proxy_wall_s": [t["wall_s"] for t in r["proxy"]]})
    fids = [r["fid"] for r in rows]
    best_fid = min(fids)
    s0 = 0  # the sweep's own seed (seed=0) for the per-configuration table

    pair_lines, all_rhos = [], {}
    for e, ref in PAIRS:
        name = gap_name(e, ref)
        rhos = [rho([r["gaps"][i][name] for r in rows], fids) for i in range(len(args.seeds))]
        all_rhos[name] = rhos
        picks = [min(rows, key=lambda r, i=i: r["gaps"][i][name]) for i in range(len(args.seeds))]
        pick_ratio = [pk["fid"] / best_fid for pk in picks]
        cfg_rows = [r for r in rows if r["family"] == "cfg"]
        cfg_rhos = [rho([r["gaps"][i][name] for r in cfg_rows], [r["fid"] for r in cfg_rows])
                    for i in range(len(args.seeds))]
        default = " (sweep default)" if (e, ref) == (cfg.proxy.evenness, cfg.proxy.reference) else ""
        pair_lines.append(
            f"| gap: {EVENNESS_SIGNAL[e]} vs {DIVERGENCE_SIGNAL[ref]}{default} | {fmt_spread(rhos)} | "
            f"{fmt_spread(cfg_rhos)} | {statistics.median(pick_ratio):.3f} ({min(pick_ratio):.3f}-"
            f"{max(pick_ratio):.3f}) |")
    signal_lines = []
    for name in SIGNALS:
        values = [[t["signals"][name] for t in results.entries[key_of(from_row(r))]["proxy"]] for r in rows]
        rhos = [rho([v[i] for v in values], fids) for i in range(len(args.seeds))]
        all_rhos[name] = rhos
        cfg_idx = [j for j, r in enumerate(rows) if r["family"] == "cfg"]
        cfg_rhos = [rho([values[j][i] for j in cfg_idx], [fids[j] for j in cfg_idx]) for i in range(len(args.seeds))]
        signal_lines.append(f"| {name} alone | {fmt_spread(rhos)} | {fmt_spread(cfg_rhos)} | |")

    default_gap = gap_name(cfg.proxy.evenness, cfg.proxy.reference)
    median_rho = {name: statistics.median(v) for name, v in all_rhos.items()}
    d = median_rho[default_gap]
    verdict = ("predicts FID" if d >= 0.5 else "predicts FID only weakly" if d > 0.2
               else "does not predict FID" + (" (it is anti-correlated)" if d < -0.2 else ""))
    ref_rho = {ref: median_rho[gap_name(cfg.proxy.evenness, ref)] for ref in DIVERGENCE_SIGNAL}
    better_ref = max(ref_rho, key=lambda ref: ref_rho[ref])
    if max(ref_rho.values()) - min(ref_rho.values()) < 0.01:
        better_ref = "neither"
    top = max(median_rho, key=lambda name: abs(median_rho[name]))
    conclusion = (
        f"On this backbone and grid the default gap ({default_gap}) {verdict}: median rho {d:+.2f}. Divergence "
        f"reference ({cfg.proxy.evenness} evenness): rho {', '.join(f'{r} {v:+.2f}' for r, v in ref_rho.items())}; "
        f"{better_ref} ranks FID {'better' if max(ref_rho.values()) > 0.2 else 'less badly (neither is useful)'}. "
        f"Strongest monotone relation to FID (largest |median rho|; a negative "
        f"rho means a higher value goes with a lower FID): {top} ({median_rho[top]:+.2f})."
    )
    table = [f"| {r['label']} | {r['family']} | {r['signals']['vocab_evenness']:.4f} | "
             f"{r['signals']['token_evenness']:.4f} | {r['signals']['div_uncond']:.4f} | "
             f"{r['signals']['div_cond']:.4f} | {r['gaps'][s0][default_gap]:.3f} | "
             f"{r['gaps'][s0][gap_name('vocab', 'cond')]:.3f} | {r['fid']:.2f} |"
             for r in sorted(rows, key=lambda r: r["fid"])]
    fid_s = statistics.median(r["fid_wall_s"] for r in rows)
    proxy_s = statistics.median(w for r in rows for w in r["proxy_wall_s"])
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    ranges = calibrations[s0].ranges
    body = "\n".join([
        f"Command: `{command}` (results cached in `{args.results.name}`; measured by invocations of this "
        f"command: {measured or 'unknown'}; written {date})  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}, "
        f"{args.threads} threads.  ",
        f"Checkpoints: VAE sha256 {setup['vae']}… (`{provenance(cfg.backbone.vae_ckpt)}`), VAR sha256 "
        f"{setup['var']}… (`{provenance(cfg.backbone.var_ckpt)}`).",
        "",
        f"{len(rows)} configurations. Proxy: the sweep's stage-1 trial (`Job(candidate, {cfg.proxy.num_images}, "
        f"seed)` on pipeline.distributed.Worker: {cfg.proxy.num_images} images, trial-level signals = mean over "
        f"images of the mean over scales 1..K-1) at seeds {args.seeds}; the gap is calibrated as the default sweep "
        f"(guidance=mixed) does it, min-max over its {len(calib_candidates)} stage-0 design points "
        f"({', '.join(c.label() for c in calib_candidates)}), measured at the same seed. FID: one "
        f"`Job(candidate, {args.num_images}, {args.fid_seed}, fid=True)` per configuration (same labels and "
        f"sampler seeds for all), `{cfg.backbone.fid_extractor}` features against "
        f"{cfg.confirm.reference_num_images} real images of the shapes generator. Sampling: top_k "
        f"{cfg.backbone.top_k}, top_p {cfg.backbone.top_p}, {cfg.guidance.schedule} schedule. Median wall time: "
        f"{proxy_s:.1f} s per proxy trial, {fid_s:.1f} s per FID evaluation.",
        "",
        "Spearman rho against FID (positive = a smaller gap or value goes with a lower FID), median (min to max) "
        f"over the {len(args.seeds)} proxy seeds, on all configurations and on the pure-CFG subset; "
        "\"pick / best\": FID of the configuration with the smallest gap divided by the best FID of the grid.",
        "",
        f"| signal | rho, all {len(rows)} | rho, pure CFG | pick / best FID |",
        "|---|---:|---:|---:|",
        *pair_lines,
        *signal_lines,
        "",
        conclusion,
        "",
        f"Per configuration (signals: mean over the {len(args.seeds)} seeds; gaps at seed {args.seeds[s0]}; "
        f"calibration ranges at that seed: vocab evenness {ranges['vocab_evenness'][0]:.4f}-"
        f"{ranges['vocab_evenness'][1]:.4f}, div_uncond {ranges['div_uncond'][0]:.4f}-"
        f"{ranges['div_uncond'][1]:.4f}, div_cond {ranges['div_cond'][0]:.4f}-{ranges['div_cond'][1]:.4f}), "
        "sorted by FID:",
        "",
        "| configuration | family | vocab E | token E | D uncond | D cond | gap (vocab, uncond) | "
        f"gap (vocab, cond) | FID ({args.num_images}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *table,
        "",
        "![equilibrium](proxy_equilibrium.png)",
        "",
        "`docs/proxy_equilibrium.png`: scaled E and D (mean over the proxy seeds, scaled by the seed-0 "
        "calibration) against the weight, FID on the right axis; grey bar: the lowest FID; dashed: the smallest "
        "default gap (mean over the seeds).",
    ])
    print(body)
    if args.write:
        plot(rows, calibrations[s0], PLOT, args.num_images, default_gap)
        write_section(BENCHMARKS, SECTION, body)
        print(f"wrote the ## {SECTION} section of {BENCHMARKS} and {PLOT}")
    return 0


def from_row(row: dict) -> Candidate:
    c = row["candidate"]
    return Candidate(c["w_cfg"], c["w_igg"], c["window"])


if __name__ == "__main__":
    sys.exit(main())
