"""Infinity benchmark: our sampler against the official ``Infinity.autoregressive_infer_cfg`` on the same weights and
batch (CPU, float32), and ours with and without slicing the batch after a CFG-off interval.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_infinity.py --official /path/to/Infinity --deps DIR [--rounds 3]

``--official`` is the checkout tests/infinity_reference.py uses (FoundationVision/Infinity at 4c27bbb), ``--deps`` the
folder with its extra packages; the reference script's stand-ins (flash-attn, eager ``torch.compile``, the ``cv2``
stub) let it run here. Two models, both built with the official classes and loaded into ours from their state dicts:
the committed fixtures (tests/data/infinity: depth 2, width 64) and a larger random one (``--depth``, 64 channels a
head), both with the fixtures' 16-bit BSQ VAE and one-layer T5 at the 256 px schedule (``0.06M``: 7 scales, 521
tokens). Each run encodes the prompts, samples and decodes. The settings: the CLI's cfg 4, tau 0.5, top_k 900, top_p
0.97 on every scale, and a cfg list that stops guiding at scale ``--off`` (cfg 1 after it): the official code keeps
both halves of the batch at every scale; ours slices the batch, the text and the KV caches to the conditional rows
(``drop_uncond``) or keeps them (no slicing). Interleaved rounds after a warm-up; the cost is the best CPU time of
the process (the machine may be shared; wall times show the noise; bench_sampler.interleaved). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_sampler import interleaved
from benchdoc import ROOT

from pipeline.backbones.infinity import (
    InfinityBackbone,
    load_bsq_decoder,
    load_infinity_model,
    load_t5,
    official_guidance,
    square_schedule,
)
from pipeline.core.sampling import sample

FIXTURES = ROOT / "tests" / "data" / "infinity"
CFG, TAU, TOP_K, TOP_P = 4.0, 0.5, 900, 0.97
PROMPTS = ["a red cat on the table", "the blue dog in the snow"]


def import_official(official: Path, deps: Path | None):
    """The reference script's module (stand-ins installed) and the official Infinity module."""
    sys.path[:0] = [str(ROOT / "tests"), str(official.resolve())] + ([str(deps.resolve())] if deps else [])
    import infinity_reference as ref
    from transformers import T5EncoderModel

    T5EncoderModel.__init__  # noqa: B018  (transformers' T5 modules load before the flash_attn stub exists)
    ref.install_stubs()
    with ref.eager_compile():
        import infinity.models.infinity  # noqa: F401
    return ref


def official_models(ref, depth: int | None):
    """The official VAE with the fixtures' weights, and the official Infinity: the fixtures' or a random one of
    ``depth`` blocks (64 channels a head, one block a chunk)."""
    vae = ref.official_vae(seed=1)
    vae.load_state_dict(torch.load(FIXTURES / "vae.pth", weights_only=True)["vae"])
    if depth is None:
        model = ref.official_infinity(vae, seed=2, lvl_embed_first_block_only=True)
        model.load_state_dict(torch.load(FIXTURES / "infinity.pth", weights_only=True))
        return vae, model
    sizes = dict(DEPTH=ref.DEPTH, WIDTH=ref.WIDTH, HEADS=ref.HEADS, CHUNKS=ref.CHUNKS)
    ref.DEPTH, ref.WIDTH, ref.HEADS, ref.CHUNKS = depth, 64 * depth, depth, depth
    try:
        return vae, ref.official_infinity(vae, seed=3, lvl_embed_first_block_only=True)
    finally:
        for name, value in sizes.items():
            setattr(ref, name, value)


def runs(ref, depth: int | None, off: int, batch: int) -> dict[str, Callable[[], object]]:
    """The timed runs of one model: official and ours, CFG on every scale and off from scale ``off``."""
    vae, model = official_models(ref, depth)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "infinity.pth")
        ours_model = load_infinity_model(Path(tmp) / "infinity.pth", square_schedule(ref.PN))
    text = load_t5(FIXTURES / "text_encoder", ref.TEXT_MAXLEN)
    ours = InfinityBackbone(ours_model, load_bsq_decoder(FIXTURES / "vae.pth"), text, tau=TAU)
    schedule = [(1, s, s) for s in square_schedule(ref.PN)]
    K, prompts = len(schedule), (PROMPTS * batch)[:batch]

    def official_run(cfg_K: list[float]) -> Callable[[], object]:
        def run() -> object:
            with contextlib.redirect_stdout(io.StringIO()):     # encode_prompt prints every prompt
                cond = ref.encode_batch(text.tokenizer, text.encoder, prompts)
            return model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=schedule, label_B_or_BLT=cond, B=batch, negative_label_B_or_BLT=None,
                g_seed=0, cfg_list=cfg_K, tau_list=[TAU] * K, top_k=TOP_K, top_p=TOP_P, returns_vemb=1,
                cfg_insertion_layer=[0], vae_type=ref.BITS, ret_img=True, gt_leak=0, inference_mode=True)
        return run

    def ours_run(cfg_K: list[float], drop: bool) -> Callable[[], object]:
        w_cfg, ratio_K = official_guidance(cfg_K, K)
        return lambda: sample(ours, prompts, w_cfg=w_cfg, w_igg=None, schedule=ratio_K, top_k=TOP_K, top_p=TOP_P,
                              seed=0, drop_uncond=drop, with_signals=False)

    on, cut = [CFG] * K, [CFG] * off + [1.0] * (K - off)
    return {f"official, cfg {CFG:g} on all {K} scales": official_run(on),
            f"ours, cfg {CFG:g} on all {K} scales": ours_run(on, True),
            f"official, cfg 1 from scale {off} (keeps both halves)": official_run(cut),
            f"ours, cfg 1 from scale {off}, batch sliced (drop_uncond)": ours_run(cut, True),
            f"ours, cfg 1 from scale {off}, not sliced": ours_run(cut, False)}


def speed_rows(ref, depth: int | None, off: int, batch: int, rounds: int) -> list[str]:
    timed_runs = runs(ref, depth, off, batch)
    with torch.no_grad():
        for fn in timed_runs.values():      # warm-up
            fn()
        times = interleaved(timed_runs, rounds)
    official_on, ours_on = (times[name].best_cpu for name in list(times)[:2])
    rows = []
    for name, t in times.items():
        versus_ours = f"{ours_on / t.best_cpu:.2f}" if name.startswith("ours") else ""
        rows.append(f"| {name} | {t.best_cpu:.3f} | {t.best_wall:.3f} | {statistics.median(t.wall):.3f} | "
                    f"{official_on / t.best_cpu:.2f} | {versus_ours} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of FoundationVision/Infinity")
    parser.add_argument("--deps", type=Path, help="folder with timm, einops, pytz, imageio")
    parser.add_argument("--depth", type=int, default=8, help="blocks of the larger random model")
    parser.add_argument("--off", type=int, default=4, help="first scale without guidance (cfg 1) of the cut runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    ref = import_official(args.official, args.deps)
    command = (f"python bench/bench_infinity.py --official {args.official}"
               + (f" --deps {args.deps}" if args.deps else "")
               + f" --depth {args.depth} --off {args.off} --batch {args.batch} --rounds {args.rounds}")
    lines = [f"Command: `OMP_WAIT_POLICY=PASSIVE {command}`  ",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
             f"float32; {time.strftime('%Y-%m-%d')}. Official code: {ref.COMMIT}.", ""]
    for depth, label in ((None, f"the fixtures' Infinity (depth {ref.DEPTH}, width {ref.WIDTH})"),
                         (args.depth, f"a random Infinity of depth {args.depth} (width {64 * args.depth}, "
                                      f"{args.depth} heads)")):
        lines += [f"{label}, 256 px schedule (7 scales, 521 tokens), 16 bits, batch {args.batch}, tau {TAU:g}, "
                  f"top_k {TOP_K}, top_p {TOP_P:g}; {args.rounds} interleaved rounds after a warm-up:", "",
                  "| run | best CPU s / batch | best wall s | median wall s | official all-scales ÷ run (CPU) "
                  "| ours all-scales ÷ run (CPU) |", "|---|---|---|---|---|---|",
                  *speed_rows(ref, depth, args.off, args.batch, args.rounds), ""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
