"""Sampler benchmark: token parity with the reference samplers, speed against VAR's, IGG's overhead over CFG.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_sampler.py --reference /tmp/VAR \
        --igg-reference /tmp/infoground-guidance --write

``--reference`` is a checkout of FoundationVision/VAR, ``--igg-reference`` one of dnngky/infoground-guidance (the
IGG authors' fork); neither is needed by the tests, nor committed. Their ``models`` package is imported from the
given folder as it is; only its ``huggingface_hub`` import (used by a hub wrapper class we do not touch) is
satisfied with an empty stand-in when that package is not installed. Without references only IGG's overhead is
measured.

1. Parity: the same random tiny weights (official key layout, loaded with ``strict=True`` into both models),
   the same labels, ``top_k=1``: tokens at every scale, ours vs the reference (CFG) and vs the IGG fork (CFG, IGG,
   mixed); and seeded runs with top-k/top-p filtering (top_k 50, top_p 0.9, the same generator seed).
2. Speed: d16-sized random weights at 256 px (``--resolution 512``: VAR's 512 px schedule, 1024 tokens at the last
   scale), VAR's evaluation settings (cfg 1.5, top_k 900, top_p 0.96), our sampler and VAR's
   ``autoregressive_infer_cfg`` interleaved; best seconds per batch: CPU time of the process on a CPU, wall time
   after ``torch.cuda.synchronize`` on a GPU (both samplers under the same float16 autocast there).
3. IGG overhead: our sampler with CFG vs IGG (global, window 3) and mixed, same weights, interleaved.
4. Peak memory (``--memory``): the high-water mark of what a run allocates above the resident weights and inputs
   (``torch.cuda.max_memory_allocated`` on a GPU, live tensor storages on a CPU, see ``livebytes.py``), for
   ``guide()`` alone on a 32 x 32 map (1024 tokens, V 4096) with global vs windowed attention, and whole samples
   at 512 px.

``--write`` replaces the ``## Sampler`` section of docs/BENCHMARKS.md with the tables (``## Sampler (cuda, 512 px)``
and so on for other devices and resolutions).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from benchdoc import BENCHMARKS, write_section
from livebytes import LiveTensorBytes

from pipeline.backbones.var import VARBackbone, VARConfig, random_var
from pipeline.backbones.vqvae import VQVAEConfig
from pipeline.core.guidance import guide
from pipeline.core.sampling import sample

SECTION = "Sampler"
REFERENCE_CH_MULT = (1, 1, 2, 2, 4)      # hard-coded in VAR's VQVAE
PARITY_PN = (1, 2, 3, 4, 5)
GUIDANCE = {
    "CFG 1.5": {"w_cfg": 1.5, "w_igg": None},
    "IGG 1.5 (global)": {"w_cfg": None, "w_igg": 1.5},
    "IGG 1.5 (window 3)": {"w_cfg": None, "w_igg": 1.5, "window": 3},
    "mixed 1.5 + 1.5 (global)": {"w_cfg": 1.5, "w_igg": 1.5},
}
VAR_RUN = "VAR autoregressive_infer_cfg, cfg 1.5"
GUIDE_REPEATS = 20
SCHEDULES = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
MEMORY_WINDOWS = (None, 3, 5, 7)     # guide() alone
SAMPLE_MEMORY_WINDOWS = (None, 3)    # whole samples


@dataclass
class Reference:
    """A reference sampler loaded from a checkout, with the tokens it drew in its last run."""

    var: torch.nn.Module
    drawn: list[torch.Tensor]


def describe(path: Path) -> str:
    """``path`` and its git commit, for the record."""
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"`{path}` at commit {head.stdout.strip()}" if head.returncode == 0 else f"`{path}` (not a git checkout)"


def import_models(path: Path) -> types.ModuleType:
    """Import the ``models`` package of a VAR checkout (isolated from any previously imported one)."""
    for name in [m for m in sys.modules if m in ("models", "dist") or m.startswith("models.")]:
        del sys.modules[name]
    try:
        importlib.import_module("huggingface_hub")
    except ImportError:
        sys.modules["huggingface_hub"] = types.SimpleNamespace(PyTorchModelHubMixin=object)
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("models")
    finally:
        sys.path.remove(str(path))


def load_reference(path: Path, ours: VARBackbone) -> Reference:
    """Build the checkout's VQVAE + VAR with our hyper-parameters and load our state dicts (strict)."""
    vae_cfg, var_cfg = ours.vae.cfg, ours.var.cfg
    if vae_cfg.ch_mult != REFERENCE_CH_MULT or vae_cfg.num_res_blocks != 2:
        raise ValueError(f"the reference VQVAE hard-codes ch_mult={REFERENCE_CH_MULT} and 2 res blocks")
    models = import_models(path)
    with contextlib.redirect_stdout(io.StringIO()):
        vae = models.VQVAE(vocab_size=vae_cfg.vocab_size, z_channels=vae_cfg.z_channels, ch=vae_cfg.ch,
                           share_quant_resi=vae_cfg.share_quant_resi, v_patch_nums=vae_cfg.patch_nums,
                           test_mode=True)
        var = models.VAR(vae, num_classes=var_cfg.num_classes, depth=var_cfg.depth, embed_dim=var_cfg.embed_dim,
                         num_heads=var_cfg.num_heads, mlp_ratio=var_cfg.mlp_ratio, shared_aln=var_cfg.shared_aln,
                         attn_l2_norm=True, patch_nums=var_cfg.patch_nums, flash_if_available=False,
                         fused_if_available=False)
    vae.load_state_dict(ours.vae.state_dict(), strict=True)
    var.load_state_dict(ours.var.state_dict(), strict=True)
    var.eval().requires_grad_(False)
    ref = Reference(var, [])
    draw = models.var.sample_with_top_k_top_p_

    def recording_draw(*args, **kwargs):
        idx_Bl1 = draw(*args, **kwargs)
        ref.drawn.append(idx_Bl1[:, :, 0].clone())
        return idx_Bl1

    models.var.sample_with_top_k_top_p_ = recording_draw
    return ref


def run_reference(ref: Reference, labels: torch.Tensor, *, w_cfg: float | None, w_igg: float | None, igg: bool,
                  top_k: int, top_p: float, seed: int) -> list[torch.Tensor]:
    ref.drawn.clear()
    guidance = {"w_cfg": w_cfg, "w_igg": w_igg} if igg else {"cfg": w_cfg}
    with torch.no_grad():
        ref.var.autoregressive_infer_cfg(len(labels), labels, g_seed=seed, top_k=top_k, top_p=top_p, **guidance)
    return list(ref.drawn)


def agreement(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> tuple[int, int, int]:
    """(scales with every token equal, number of scales, first scale with a difference or -1)."""
    equal = [torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)]
    return sum(equal), len(equal), equal.index(False) if False in equal else -1


def parity(var_path: Path | None, igg_path: Path | None, batch: int) -> list[str]:
    vae_cfg = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=REFERENCE_CH_MULT, patch_nums=PARITY_PN)
    var_cfg = VARConfig(vocab_size=512, z_channels=16, depth=3, embed_dim=128, num_heads=4, num_classes=10,
                        patch_nums=PARITY_PN)
    ours = random_var(vae_cfg, var_cfg, seed=0)
    labels = torch.arange(batch) % var_cfg.num_classes
    rows = ["| reference | w_cfg | w_igg | top_k / top_p | scales with equal tokens |", "|---|---|---|---|---|"]
    cases = []
    if var_path is not None:
        cases += [("VAR", var_path, False, w, None) for w in (0.0, 1.5, 4.0)]
    if igg_path is not None:
        cases += [("IGG fork", igg_path, True, wc, wi) for wc, wi in ((1.5, None), (None, 3.0), (1.5, 3.0), (4.0, 1.0))]
    loaded: dict[Path, Reference] = {}
    for name, path, igg, w_cfg, w_igg in cases:
        if path not in loaded:
            loaded[path] = load_reference(path, ours)
        ref = loaded[path]
        for top_k, top_p in ((1, 0.0), (50, 0.9)):
            theirs = run_reference(ref, labels, w_cfg=w_cfg, w_igg=w_igg, igg=igg, top_k=top_k, top_p=top_p, seed=0)
            mine = sample(ours, labels, w_cfg=w_cfg, w_igg=w_igg, top_k=top_k, top_p=top_p, seed=0).indices
            n_eq, n, first = agreement(mine, theirs)
            where = "" if first < 0 else f" (first difference at scale {first})"
            rows.append(f"| {name} | {w_cfg} | {w_igg} | {top_k} / {top_p} | {n_eq}/{n}{where} |")
    return rows


@dataclass
class Timing:
    wall: list[float]     # seconds of wall-clock time, one per round
    cpu: list[float]      # seconds of this process's CPU time (all threads), one per round

    @property
    def best_wall(self) -> float:
        return min(self.wall)

    @property
    def best_cpu(self) -> float:
        return min(self.cpu)

    def cost(self, device: torch.device) -> float:
        """The measure of cost on ``device``: best CPU time on a CPU, best wall time (synchronised) on a GPU."""
        return self.best_cpu if device.type == "cpu" else self.best_wall


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int,
                device: torch.device | None = None) -> dict[str, Timing]:
    """Time each run ``repeats`` times; the runs are interleaved and each round starts one run later than the
    previous one, so that a drift of the machine's load spreads over all of them."""
    names = list(runs)
    timings = {name: Timing([], []) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device or torch.device("cpu"))
            wall, cpu = time.perf_counter(), time.process_time()
            runs[name]()
            synchronize(device or torch.device("cpu"))
            timings[name].cpu.append(time.process_time() - cpu)
            timings[name].wall.append(time.perf_counter() - wall)
    return timings


def guide_runs(batch: int, vocab: int, patch_nums: tuple[int, ...],
               device: torch.device) -> dict[str, Callable[[], object]]:
    """The guidance combination alone, over all scales of one sample, on random d16-shaped logits."""
    gen = torch.Generator(device).manual_seed(0)
    logits = [tuple(torch.randn(batch, pn * pn, vocab, generator=gen, device=device) for _ in range(2))
              for pn in patch_nums]
    K = len(patch_nums)

    def combine(kw: dict) -> None:
        for k, ((cond, uncond), pn) in enumerate(zip(logits, patch_nums, strict=True)):
            guide(cond, uncond, ratio=k / (K - 1), hw=(pn, pn), **kw)

    return {name: (lambda kw=kw: combine(kw)) for name, kw in GUIDANCE.items()}


def d16(resolution: int, device: torch.device) -> VARBackbone:
    """VAR-d16-sized random weights with the patch schedule of ``resolution``."""
    pn = SCHEDULES[resolution]
    return random_var(VQVAEConfig(patch_nums=pn), VARConfig.official(16, patch_nums=pn), seed=0).to(device)


def speed(var_path: Path | None, batch: int, repeats: int, resolution: int,
          device: torch.device) -> tuple[list[str], list[str]]:
    ours = d16(resolution, device)
    labels = (torch.arange(batch) * 97 % 1000).to(device)
    settings = {"top_k": 900, "top_p": 0.96, "seed": 0}
    runs: dict[str, Callable[[], object]] = {
        f"ours {name}": (lambda kw=kw: sample(ours, labels, **kw, **settings)) for name, kw in GUIDANCE.items()}
    runs["ours CFG 1.5, with_signals=False"] = lambda: sample(ours, labels, **GUIDANCE["CFG 1.5"], **settings,
                                                             with_signals=False)
    ref = None
    # VAR's own scripts wrap its sampler in float16 autocast on a GPU; ours sets the same autocast itself.
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def run_var() -> list[torch.Tensor]:
        with autocast:
            return run_reference(ref, labels, w_cfg=1.5, w_igg=None, igg=False, **settings)

    if var_path is not None:
        ref = load_reference(var_path, ours)
        runs[VAR_RUN] = run_var
    for run in runs.values():   # warm-up (allocator, kernels)
        run()
    t = interleaved(runs, repeats, device)
    cost = "CPU" if device.type == "cpu" else "wall"

    def best(name: str) -> float:
        return t[name].cost(device)

    speed_rows = [f"| sampler | best CPU s / batch | best wall s / batch | median wall s | speed vs VAR ({cost}) | "
                  "images / s (best wall) |", "|---|---|---|---|---|---|"]
    for name in ("ours CFG 1.5", "ours CFG 1.5, with_signals=False", VAR_RUN):
        if name in t:
            ratio = f"{best(VAR_RUN) / best(name):.3f}" if VAR_RUN in t else "n/a"
            speed_rows.append(f"| {name} | {t[name].best_cpu:.3f} | {t[name].best_wall:.3f} | "
                              f"{statistics.median(t[name].wall):.3f} | {ratio} | {batch / t[name].best_wall:.2f} |")
    if ref is not None:
        mine = sample(ours, labels, w_cfg=1.5, w_igg=None, **settings).indices
        n_eq, n, _ = agreement(mine, run_var())
        speed_rows += ["", f"Same seed, same d16 weights: {n_eq}/{n} scales with every token equal to VAR's."]

    cfg = best("ours CFG 1.5")
    g = interleaved(guide_runs(batch, ours.vocab_size, ours.patch_nums, device), GUIDE_REPEATS, device)
    g_best = {name: g[name].cost(device) for name in g}
    overhead_rows = [f"| ours | best {cost} s / batch | end-to-end overhead | guide() {cost} s / batch | "
                     f"guide() extra ÷ CFG sample {cost} time |", "|---|---|---|---|---|"]
    for name in GUIDANCE:
        extra = g_best[name] - g_best["CFG 1.5"]
        overhead_rows.append(f"| {name} | {best(f'ours {name}'):.3f} | {100 * (best(f'ours {name}') / cfg - 1):+.1f} % "
                             f"| {g_best[name]:.4f} | {100 * extra / cfg:+.2f} % |")
    return speed_rows, overhead_rows


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated while ``run`` executes, above what was allocated before it (bytes)."""
    if device.type == "cpu":
        with LiveTensorBytes() as live:
            run()
        return live.peak
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def guide_memory(batch: int, device: torch.device) -> list[str]:
    """Peak memory of guide() alone, global vs windowed IGG, on the last scale of the 512 px schedule."""
    side, vocab = SCHEDULES[512][-1], VQVAEConfig().vocab_size
    gen = torch.Generator(device).manual_seed(0)
    cond, uncond = (torch.randn(batch, side * side, vocab, generator=gen, device=device) for _ in range(2))
    inputs_mib = 2 * cond.numel() * cond.element_size() / 2**20
    rows = [f"guide() alone on a {side} x {side} map ({side * side} tokens, V {vocab}, batch {batch}, float32; the "
            f"two logit tensors, {inputs_mib:.0f} MiB, are not counted):", "",
            "| IGG w_igg 1.5 | peak extra MiB | vs global |", "|---|---:|---:|"]
    peaks = {w: peak_bytes(lambda w=w: guide(cond, uncond, w_cfg=None, w_igg=1.5, window=w, hw=(side, side),
                                             ratio=1.0), device) for w in MEMORY_WINDOWS}
    rows += [f"| {'global' if w is None else f'window {w}'} | {peaks[w] / 2**20:.1f} | {peaks[w] / peaks[None]:.2f} |"
             for w in MEMORY_WINDOWS]
    return rows


def sample_memory(batch: int, device: torch.device) -> list[str]:
    """Peak memory of whole 512 px samples: CFG vs IGG global and windowed."""
    ours = d16(512, device)
    labels = (torch.arange(batch) * 97 % 1000).to(device)
    runs = {"CFG 1.5": {"w_cfg": 1.5, "w_igg": None}, **{
        f"IGG 1.5 ({'global' if w is None else f'window {w}'})": {"w_cfg": None, "w_igg": 1.5, "window": w}
        for w in SAMPLE_MEMORY_WINDOWS}}
    sample_peaks = {name: peak_bytes(lambda kw=kw: sample(ours, labels, **kw, top_k=900, top_p=0.96, seed=0), device)
                    for name, kw in runs.items()}
    rows = [f"Whole samples, d16-sized random weights, 512 px schedule, batch {batch} (weights not counted):", "",
             "| sampler | peak extra MiB | vs CFG |", "|---|---:|---:|"]
    rows += [f"| {name} | {b / 2**20:.1f} | {b / sample_peaks['CFG 1.5']:.2f} |" for name, b in sample_peaks.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="checkout of FoundationVision/VAR")
    parser.add_argument("--igg-reference", type=Path, help="checkout of dnngky/infoground-guidance")
    parser.add_argument("--batch", type=int, default=1, help="images per batch in the speed runs")
    parser.add_argument("--parity-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, runs interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--resolution", type=int, choices=sorted(SCHEDULES), default=256)
    parser.add_argument("--no-parity", action="store_true", help="skip the token-parity table")
    parser.add_argument("--memory", action="store_true", help="add the peak-memory tables")
    parser.add_argument("--memory-batch", type=int, default=1, help="images per batch in the memory runs")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    wait = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={wait} " if wait else "") + "python bench/bench_sampler.py " + " ".join(sys.argv[1:])
    machine = (f"{platform.processor() or platform.machine()}, {args.threads} CPU threads, float32"
               if device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, float16 autocast")
    parts = [f"Command: `{command}`  ", f"Machine: {machine}, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
             ""]
    if (args.reference or args.igg_reference) and not args.no_parity:
        parts += ["References: " + "; ".join(describe(p) for p in (args.reference, args.igg_reference) if p) + ".",
                  "","Token parity, same random tiny weights (V 512, depth 3, patch_nums "
                  f"{PARITY_PN}, {args.parity_batch} images, seed 0):", "",
                  *parity(args.reference, args.igg_reference, args.parity_batch), ""]
    speed_rows, overhead_rows = speed(args.reference, args.batch, args.repeats, args.resolution, device)
    cost = ("the best CPU time (this process, all threads) is the cost; wall times show the noise" if
            device.type == "cpu" else "the best wall time after synchronising the GPU is the cost")
    parts += [f"Speed, d16-sized random weights at {args.resolution} px (VAE decode included), batch {args.batch}, "
              f"top_k 900, top_p 0.96, {args.repeats} interleaved rounds; {cost}.", "", *speed_rows, "",
              "IGG overhead over CFG (ours, same rounds). The guide() columns time the combination alone on "
              f"random d16-shaped logits (best of {GUIDE_REPEATS}) and give its extra cost over CFG's as a share "
              "of the CFG sample's time:", "", *overhead_rows, ""]
    if args.memory:
        parts += ["Peak memory:", "", *guide_memory(args.memory_batch, device), "",
                  *sample_memory(args.memory_batch, device), ""]
    text = "\n".join(parts)
    print(text)
    if args.write:
        title = SECTION if (device.type, args.resolution) == ("cpu", 256) else \
            f"{SECTION} ({device.type}, {args.resolution} px)"
        write_section(BENCHMARKS, title, text)


if __name__ == "__main__":
    main()
