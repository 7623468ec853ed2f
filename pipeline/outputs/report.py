"""What a sweep shows: sample grids and guidance heat maps (PNG bytes), plots, best.yaml and report.md.

Rendering functions are pure (tensors/numbers in, PNG bytes out) so workers can call them; file writers are
atomic (temp file in the same folder, fsync, os.replace): a crash never leaves a half-written best.yaml.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from pipeline.core.render import figure_png, log_weight_axis
from pipeline.outputs.best import Best, CurveRecord
from tuners.confirm import Margin, Racer
from tuners.scoring import FidScore
from tuners.screen import ScreenResult
from tuners.space import Candidate, interval_code


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _score(score: FidScore) -> str:
    return f"{_fmt(score.fid)} [{_fmt(score.fid_low)}, {_fmt(score.fid_high)}]"


def _images(margin: Margin) -> str:
    return (f"at N={margin.num_images}" if margin.start == 0 else
            f"on the same {margin.num_images} hold-out image indices ({margin.start}..)")


def race_table(racers: list[Racer], winner: Racer) -> dict[str, list]:
    """The race as columns (for ``MlflowClient.log_table``): one row per finalist and rung it reached (its images
    0..num_images-1) and one for its hold-out images (from images_from), with the FID and its interval there, its
    refinement FID (raw and smoothed), and how it left."""
    columns: dict[str, list] = {k: [] for k in ("candidate", "kind", "role", "w_cfg", "w_igg", "window", "interval",
                                                "refine_fid", "refine_smoothed", "images_from", "num_images", "fid",
                                                "fid_low", "fid_high", "outcome")}
    for r in racers:
        c = r.candidate
        rows = [(0, n, score) for n, score in sorted(r.scores.items())]
        if r.holdout is not None:
            rows.append((r.holdout.start, r.holdout.num_images, r.holdout.score))
        for start, n, score in rows:
            row = {"candidate": c.label(), "kind": c.kind, "role": r.role, "w_cfg": c.w_cfg, "w_igg": c.w_igg,
                   "window": c.window, "interval": None if c.interval is None else interval_code(c.interval),
                   "refine_fid": r.refine_fid, "refine_smoothed": r.refine_smoothed, "images_from": start,
                   "num_images": n, "fid": score.fid, "fid_low": score.fid_low, "fid_high": score.fid_high,
                   "outcome": "winner" if r is winner else r.left or "-"}
            for k, v in row.items():
                columns[k].append(v)
    return columns


def report_markdown(title: str, racers: list[Racer], winner: Racer, margin: Margin | None, best: Best,
                    screen: ScreenResult) -> str:
    """report.md: the answer in words, then one row per finalist (winner first), the whole range, the cost."""
    n = best.num_images
    where = (f"at N={n}" if best.holdout_from is None else
             f"on its {n} hold-out images ({best.holdout_from}..{best.holdout_from + n - 1}: the race's last rung, "
             "which no stage saw before choosing it)")
    lines = [f"# {title}", "",
             f"Best: **{winner.candidate.label()}** ({best.kind}), FID {_fmt(best.fid)} "
             f"[{_fmt(best.fid_low)}, {_fmt(best.fid_high)}] {where} ({best.sampling.level:.0%} interval)"
             + (f"; CLIP score {_fmt(best.clip_score.value)} [{_fmt(best.clip_score.low)}, "
                f"{_fmt(best.clip_score.high)}]" if best.clip_score else "") + ".", ""]
    if margin is None:
        lines.append("No runner-up was scored: the winner is not compared with anything.")
    elif margin.separated:
        lines.append(f"Separated from the runner-up {margin.runner_up.candidate.label()}: FID +{_fmt(margin.diff)} "
                     f"[{_fmt(margin.low)}, {_fmt(margin.high)}] {_images(margin)}.")
    else:
        lines.append(f"**Not statistically separated** from the runner-up {margin.runner_up.candidate.label()}: "
                     f"FID difference {_fmt(margin.diff)} [{_fmt(margin.low)}, {_fmt(margin.high)}] "
                     f"{_images(margin)} includes 0; either is as good as this sweep can tell.")
    capped = [w for w, where in best.at_bound.items() if where == "cap"]
    if capped:
        lines.append(f"**Warning:** {', '.join(capped)} sits at search.max_weight: the optimum may lie beyond it.")
    rungs = sorted({m for r in racers for m in r.scores})
    held = sorted({f"{r.holdout.start}..{r.holdout.end - 1}" for r in racers if r.holdout is not None})
    heads = [f"FID@{m}" for m in rungs] + [f"hold-out FID ({', '.join(held)})"] * bool(held)
    lines += ["", "| candidate | kind | role | FID (refine) | smoothed | " + " | ".join(heads)
              + " | IS | KID | precision | recall | left |",
              "|---|---|---|---|---|" + "---|" * len(heads) + "---|---|---|---|---|"]
    for r in sorted(racers, key=lambda r: (r is not winner, -r.reached, r.fid)):
        final = r.scores[r.reached].extra if r.scores else {}  # torch-fidelity's other metrics, by its names
        left = "winner" if r is winner else r.left or "-"
        cells = [_score(r.scores[m]) if m in r.scores else "-" for m in rungs]
        cells += [_score(r.holdout.score) if r.holdout is not None else "-"] * bool(held)
        lines.append(f"| {r.candidate.label()} | {r.candidate.kind} | {r.role} | {_fmt(r.refine_fid)} | "
                     f"{_fmt(r.refine_smoothed)} | "
                     + " | ".join(cells) + f" | {_fmt(final.get('isc'))} | {_fmt(final.get('kid'), 4)} | "
                     f"{_fmt(final.get('precision'))} | {_fmt(final.get('recall'))} | {left} |")
    lines += ["", *screen_markdown(screen, best)]
    lines += ["", "| stage | trials | images sampled | worker s |", "|---|---:|---:|---:|"]
    for stage, c in best.cost.items():
        lines.append(f"| {stage} | {c.trials} | {c.images} | {c.worker_s:.1f} |")
    return "\n".join(lines) + "\n"


def screen_markdown(screen: ScreenResult, best: Best) -> list[str]:
    """The whole range: IGG against CFG, the proxy's direction, the basins, and every curve's screened FID."""
    first, n = min(p for q in screen.points for p in q.scores), screen.num_images
    lines = ["## The whole range (screen)", "",
             f"Every kind from w={_fmt(screen.points[0].total, 2)} to {_fmt(max(p.total for p in screen.points), 2)}, "
             f"{screen.spacing:.2f} apart in log(1 + w), at {first} images; the best of each curve extended to {n} "
             "(curves.png)."]
    if best.versus is not None:
        v = best.versus
        lines += ["", f"- {v.verdict} at N={v.num_images} (CFG {v.cfg}: {_fmt(v.fid_cfg)}, IGG {v.igg}: "
                      f"{_fmt(v.fid_igg)})."]
    lines += ["", f"- Proxy: {screen.rho.verdict()}." if screen.rho else
              "- Proxy: too few screened points with a gap for ρ(gap, FID)."]
    lines += ["", f"Basins (local minima of a curve's smoothed FID), best first, at N={n}:", "",
              "| curve | point | FID | smoothed | vs the best [interval] | refined |", "|---|---|---:|---:|---|---|"]
    for b in screen.basins:
        worse = "-" if b.worse is None else f"{b.worse.diff:+.3g} [{b.worse.low:+.3g}, {b.worse.high:+.3g}]"
        lines.append(f"| {b.point.curve.label()} | {b.point.candidate.label()} | {_fmt(b.point.scores[n].fid)} | "
                     f"{_fmt(b.smoothed)} | {worse} | {'yes' if b in screen.refined else 'no'} |")
    lines += ["", f"Screened points: FID [interval] at {first} images (smoothed), and at {n} for the survivors:", "",
              "| curve | w + w' | FID@" + str(first) + " | smoothed | FID@" + str(n) + " |", "|---|---:|---|---:|---|"]
    for p in screen.points:
        cells = [_score(p.scores[m]) if m in p.scores else "-" for m in (first, n)]
        lines.append(f"| {p.curve.label()} | {p.total:.3g} | {cells[0]} | {_fmt(p.smoothed.get(first))} | "
                     f"{cells[1]} |")
    return lines


def screen_table(screen: ScreenResult) -> dict[str, list]:
    """Every screened point at every rung it reached (for ``MlflowClient.log_table``): the FID curves."""
    columns: dict[str, list] = {k: [] for k in ("curve", "kind", "total", "w_cfg", "w_igg", "window", "num_images",
                                                "fid", "fid_low", "fid_high", "smoothed", "gap", "basin")}
    for p in screen.points:
        c = p.candidate
        for m, score in sorted(p.scores.items()):
            row = {"curve": p.curve.label(), "kind": p.curve.kind, "total": p.total, "w_cfg": c.w_cfg,
                   "w_igg": c.w_igg, "window": c.window, "num_images": m, "fid": score.fid,
                   "fid_low": score.fid_low, "fid_high": score.fid_high, "smoothed": p.smoothed.get(m),
                   "gap": p.gap, "basin": p.basin}
            for k, v in row.items():
                columns[k].append(v)
    return columns


def curves_png(screen: ScreenResult, winner: Candidate) -> bytes:
    """Each curve's FID over the whole range (log(1 + w) axis) with its intervals: the first rung's points, the
    smoothed curve, the survivors at the last rung, the basins kept for refinement (rings) and the winner (star)."""
    first, n = min(p for q in screen.points for p in q.scores), screen.num_images
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    curves = list(dict.fromkeys(p.curve for p in screen.points))
    for i, curve in enumerate(curves):
        colour = f"C{i}"
        mine = [p for p in screen.points if p.curve == curve and first in p.scores]
        x = [p.total for p in mine]
        ax.errorbar(x, [p.scores[first].fid for p in mine],
                    yerr=[[p.scores[first].fid - p.scores[first].fid_low for p in mine],
                          [p.scores[first].fid_high - p.scores[first].fid for p in mine]],
                    fmt="o", color=colour, alpha=0.35, capsize=2, ms=4)
        ax.plot(x, [p.smoothed[first] for p in mine], "-", color=colour, label=f"{curve.label()} (N={first})")
        top = [p for p in mine if n in p.scores]
        if n != first and top:
            ax.errorbar([p.total for p in top], [p.scores[n].fid for p in top],
                        yerr=[[p.scores[n].fid - p.scores[n].fid_low for p in top],
                              [p.scores[n].fid_high - p.scores[n].fid for p in top]],
                        fmt="s", color=colour, capsize=2, ms=5, label=f"{curve.kind}: the best, N={n}")
        for b in screen.refined:
            if b.point.curve == curve:
                ax.plot([b.point.total], [b.point.scores[n].fid], "o", ms=14, mfc="none", color=colour)
    ax.axvline(sum(winner.weights().values()), color="k", ls=":", lw=1)
    ax.plot([], [], "o", ms=10, mfc="none", color="grey", label="basin refined")
    ax.plot([], [], "k:", label=f"winner: {winner.label()}")
    log_weight_axis(ax, max(p.total for p in screen.points))
    ax.set_xlabel("guidance weight w + w' (log(1 + w) axis)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    return figure_png(fig)


def screen_curves(screen: ScreenResult) -> dict[str, CurveRecord]:
    """best.yaml's ``curves``: per curve, its points at the first rung (every point has it) in order of weight."""
    first = min(n for p in screen.points for n in p.scores)
    out: dict[str, CurveRecord] = {}
    for p in screen.points:
        if first in p.scores:
            curve = out.setdefault(p.curve.label(), CurveRecord(p.curve.kind, first))
            score = p.scores[first]
            curve.total.append(p.total)
            curve.fid.append(score.fid)
            curve.fid_low.append(score.fid_low)
            curve.fid_high.append(score.fid_high)
            curve.smoothed.append(p.smoothed[first])
    return out
