"""Switti benchmark: token parity with the official pipeline, speed against it with and without dropping the
unconditional half after the CFG off-scale, and IGG's overhead at Switti's token counts.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_switti.py --official /tmp/switti [--rounds 3] [--write]

``--official`` is a checkout of yandex-research/switti (inside a git repository: its utils/arg_util.py asks git for
a branch name at import) in an environment that also has what it imports (diffusers, einops, typed-argument-parser,
pytz); it is not needed by the tests, nor committed. Without it only the parity table (from the committed fixtures)
and IGG's overhead are measured.

1. Parity: tests/data/switti/reference.pt, the official pipeline's tokens for 20 settings on tiny random weights
   (made by tests/switti_reference.py), against our sampler on the same Hub folders.
2. Speed: a random Switti of depth ``--depth`` and width 64 per head at the 256 px schedule (680 tokens), vocabulary
   4096, the tiny CLIP towers of the fixtures and a small VQVAE decoder, built once with the official classes and
   loaded into ours from the same Hub folder. Switti's defaults (cfg 6, top_k 400, top_p 0.95), CFG on at every
   scale (off-scale K) or off from ``--off`` on; ours with and without ``drop_uncond``. Interleaved rounds; the best
   CPU time of the process per batch is the cost (the machine may be shared; wall times show the noise).
3. IGG overhead: ``guide()`` alone on Switti-shaped logits (V 4096) summed over the scales of the 512 px and 1024 px
   schedules, CFG vs IGG (global, window 3) vs mixed, as a share of one CFG sample's CPU time of part 2 scaled to
   each schedule by its token count (a rough yardstick: the transformer's cost grows faster than linearly).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import ROOT, publish

from pipeline.backbones.switti import PATCH_NUMS, load_switti
from pipeline.core.guidance import guide, schedule_ratio
from pipeline.core.sampling import sample

SECTION = "Switti"
FIXTURES = ROOT / "tests" / "data" / "switti"
PROMPTS = ["a red cube on a table", "two cats and a dog in the snow at night"]
DEFAULTS = dict(top_k=400, top_p=0.95)
CFG = 6.0


def parity_rows() -> list[str]:
    ref = torch.load(FIXTURES / "reference.pt", weights_only=True)
    K = len(ref["patch_nums"])
    folders = [FIXTURES / f for f in ("vae", "text_encoder", "text_encoder_2")]
    backbones = {m: load_switti(FIXTURES / m, *folders) for m in ("switti", "switti_ar")}
    rows = []
    for case, tokens in zip(ref["cases"], ref["tokens"], strict=True):
        result = sample(backbones[case["model"]], ref["prompts"][case["prompts"]], w_cfg=case["cfg"], w_igg=None,
                        schedule="interval", interval_start=min(case["turn_on"], K),
                        interval_end=min(case["turn_off"], K), top_k=case["top_k"], top_p=case["top_p"],
                        seed=case["seed"], last_scale_temp=case["last_scale_temp"], drop_uncond=True,
                        with_signals=False)
        equal = sum(torch.equal(a, b) for a, b in zip(result.indices, tokens, strict=True))
        rows.append(f"| {case['model']} | {case['cfg']:g} | {case['turn_on']} | {case['turn_off']} | "
                    f"{case['last_scale_temp']} | {case['top_k']} / {case['top_p']:g} | {case['seed']} | "
                    f"{equal}/{K} |")
    return rows


def build_models(official: Path, out: Path, depth: int):
    """Random official Switti (256 px) + VQVAE in Hub folders under ``out``; returns the official pipeline."""
    sys.path.insert(0, str(official))
    sys.path.insert(0, str(ROOT / "tests"))
    cwd = os.getcwd()
    os.chdir(official)
    try:
        import switti_reference as ref
        from models.clip import FrozenCLIPEmbedder
        from models.pipeline import SwittiPipeline

        pn = PATCH_NUMS[256]
        with contextlib.redirect_stdout(io.StringIO()):
            model = ref.official_switti(False, seed=0, depth=depth, width=64 * depth, heads=depth, vocab=4096,
                                        cvae=32, patch_nums=pn)
        vae = ref.official_vae(seed=1, vocab=4096, cvae=32, patch_nums=pn)
        ref.save_hub(out / "switti", model, {"depth": depth, "use_ar": False})
        ref.save_hub(out / "vae", vae, {})
        encoders = [FrozenCLIPEmbedder(str(FIXTURES / r), device="cpu") for r in ("text_encoder", "text_encoder_2")]
        return SwittiPipeline(model, vae, *encoders, device="cpu")
    finally:
        os.chdir(cwd)


def timed(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def speed_rows(official: Path, depth: int, off: int, rounds: int) -> tuple[list[str], float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_models(official, Path(tmp), depth)
        ours = load_switti(Path(tmp) / "switti", Path(tmp) / "vae", FIXTURES / "text_encoder",
                           FIXTURES / "text_encoder_2")
    K = len(ours.patch_nums)

    def official_run(turn_off: int):
        return lambda: pipe(PROMPTS, cfg=CFG, seed=0, return_pil=False, turn_off_cfg_start_si=turn_off,
                            **DEFAULTS)

    def ours_run(turn_off: int, drop: bool, **guidance):
        guidance = guidance or {"w_cfg": CFG, "w_igg": None}
        return lambda: sample(ours, PROMPTS, schedule="interval", interval_start=0, interval_end=turn_off, seed=0,
                              drop_uncond=drop, with_signals=False, **guidance, **DEFAULTS)

    runs = {
        f"official, CFG on all {K} scales": official_run(K),
        f"ours, CFG on all {K} scales": ours_run(K, True),
        f"official, CFG off from scale {off} (drops the uncond half)": official_run(off),
        f"ours, CFG off from scale {off}, drop_uncond": ours_run(off, True),
        f"ours, CFG off from scale {off}, no drop": ours_run(off, False),
        f"ours, mixed 6 + 1 (global IGG), off from scale {off}, drop_uncond":
            ours_run(off, True, w_cfg=CFG, w_igg=1.0),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():      # warm-up
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    best = {name: min(c for c, _ in t) for name, t in times.items()}
    base_official, base_ours = best[f"official, CFG on all {K} scales"], best[f"ours, CFG on all {K} scales"]
    rows = []
    for name, t in times.items():
        base = base_official if name.startswith("official") else base_ours
        rows.append(f"| {name} | {best[name]:.2f} | {min(w for _, w in t):.2f} | "
                    f"{statistics.median(w for _, w in t):.2f} | {base / best[name]:.2f} |")
    return rows, best[f"ours, CFG on all {K} scales"], {"L": sum(p * p for p in ours.patch_nums), "K": K}


def igg_rows(cfg_sample_cpu: float | None, tokens_256: int) -> list[str]:
    settings = {"CFG 6": dict(w_cfg=6.0, w_igg=None), "IGG 1 (global)": dict(w_cfg=None, w_igg=1.0),
                "IGG 1 (window 3)": dict(w_cfg=None, w_igg=1.0, window=3),
                "mixed 6 + 1 (global)": dict(w_cfg=6.0, w_igg=1.0)}
    g = torch.Generator().manual_seed(0)
    rows = []
    for reso in (512, 1024):
        pns = PATCH_NUMS[reso]
        K, L = len(pns), sum(p * p for p in pns)
        logits = [(torch.randn(1, p * p, 4096, generator=g), torch.randn(1, p * p, 4096, generator=g)) for p in pns]
        costs = {}
        for name, kw in settings.items():
            def run(kw=kw, pns=pns, logits=logits, K=K):
                for k, (p, (c, u)) in enumerate(zip(pns, logits, strict=True)):
                    guide(c, u, ratio=schedule_ratio("linear", k, K), hw=(p, p), **kw)
            costs[name] = min(timed(run)[0] for _ in range(2))
        for name, cost in costs.items():
            extra = cost - costs["CFG 6"]
            share = ("n/a" if cfg_sample_cpu is None
                     else f"{100 * extra / (cfg_sample_cpu * L / tokens_256):+.1f} %")
            rows.append(f"| {reso} px ({L} tokens, last map {pns[-1]}²) | {name} | {cost:.3f} | {extra:+.3f} | "
                        f"{share} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, help="checkout of yandex-research/switti")
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--off", type=int, default=7, help="CFG off-scale of the dropping runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the ## Switti section of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    command = "python bench/bench_switti.py" + (f" --official {args.official}" if args.official else "") + \
        f" --depth {args.depth} --off {args.off} --rounds {args.rounds}"
    lines = [f"Command: `OMP_WAIT_POLICY=PASSIVE {command} --write`  ",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
             f"float32; {time.strftime('%Y-%m-%d')}.", ""]
    if args.official:
        head = subprocess.run(["git", "-C", str(args.official), "log", "-1", "--format=%s"], capture_output=True,
                              text=True).stdout.strip()
        lines += [f"Official code: `{args.official}` ({head}).", ""]
    lines += ["Token parity with the official `SwittiPipeline` on the committed fixtures (tests/data/switti: depth 2, "
              "width 32, vocabulary 64, patch_nums (1, 2, 3, 4, 6), tiny random CLIP towers; "
              "made by tests/switti_reference.py):", "",
              "| model | cfg | turn_on | turn_off | last_scale_temp | top_k / top_p | seed "
              "| scales with equal tokens |",
              "|---|---|---|---|---|---|---|---|", *parity_rows(), ""]
    cfg_cpu, tokens = None, sum(p * p for p in PATCH_NUMS[256])
    if args.official:
        rows, cfg_cpu, shape = speed_rows(args.official, args.depth, args.off, args.rounds)
        lines += [f"Speed, random Switti depth {args.depth} (width {64 * args.depth}, {args.depth} heads), 256 px "
                  f"schedule ({shape['L']} tokens, {shape['K']} scales), vocabulary 4096, batch {len(PROMPTS)}, "
                  f"cfg {CFG:g}, top_k 400, top_p 0.95, tiny CLIP towers, small VQVAE decoder; "
                  f"{args.rounds} interleaved rounds after a warm-up:", "",
                  "| run | best CPU s / batch | best wall s | median wall s | speed-up vs CFG on all scales (CPU) |",
                  "|---|---|---|---|---|", *rows, ""]
    lines += ["IGG overhead: `guide()` alone on random Switti-shaped logits (batch 1, V 4096) summed over the "
              "scales on the linear ramp, best of 2 CPU times; the last column sets the extra cost against one "
              "CFG sample of the speed table scaled to the schedule's token count:", "",
              "| schedule | guidance | guide() CPU s / image | extra over CFG (s) | extra ÷ CFG sample (scaled) |",
              "|---|---|---|---|---|", *igg_rows(cfg_cpu / len(PROMPTS) if cfg_cpu else None, tokens)]
    publish("\n".join(lines), SECTION, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
