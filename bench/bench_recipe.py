"""Choosing the embedded backbone's recipe: which tokenizer and transformer sizes learn the shapes, per step budget.

Each call trains one variant of one stage of :mod:`pipeline.backbones.tiny` (every other setting as in the recipe)
and writes ``OUT/<name>.json`` (options default to the recipe's values); ``table`` gathers them. Variants are
independent processes, so several share a GPU:

    python bench/bench_recipe.py vqvae --name vae_112 --ch-mult 1 1 2 --steps 1500 --device cuda --out /tmp/r
    python bench/bench_recipe.py var --name w192_b32 --vae /tmp/r/vae_112.pt --width 192 --batch 32 \
        --steps 3300 --device cuda --out /tmp/r
    python bench/bench_recipe.py classifier --name clf_1000 --steps 1000 --device cuda --out /tmp/r
    python bench/bench_recipe.py table /tmp/r --write --machine "one H200, six variants at a time"

A tokenizer is judged by PSNR and by how well the shipped classifiers (colour and shape-only) still recognise its
reconstructions: the ceiling of any transformer trained on its tokens. A transformer is judged by the two
classifiers' accuracy on its samples over a CFG grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from benchdoc import BENCHMARKS, write_section

from pipeline.backbones import tiny
from pipeline.backbones.var import VARBackbone
from pipeline.core.sampling import sample
from pipeline.data.classifier import SHIPPED_CLASSIFIER, SHIPPED_SHAPE_CLASSIFIER, accuracy, load_classifier
from pipeline.data.shapes import NUM_CLASSES, make_batch

EVAL_SEED = 3 * tiny.EVAL_SEED_OFFSET
SECTION = "Embedded backbone: choosing the recipe"


def judges(device: str) -> dict[str, torch.nn.Module]:
    return {"acc": load_classifier(SHIPPED_CLASSIFIER, device), "shape_acc": load_classifier(SHIPPED_SHAPE_CLASSIFIER,
                                                                                             device)}


def run_vqvae(args: argparse.Namespace, cfg: tiny.TinyConfig) -> dict:
    model = dataclasses.replace(cfg.vqvae.model, ch_mult=tuple(args.ch_mult), ch=args.ch)
    cfg.vqvae = dataclasses.replace(cfg.vqvae, steps=args.steps, batch_size=args.batch, model=model,
                                    minutes=args.minutes)
    vae, log = tiny.train_vqvae(cfg, args.out / f"{args.name}.pt", progress=False)
    labels_N = torch.arange(args.n) % NUM_CLASSES
    real_N3HW = make_batch(labels_N, EVAL_SEED)
    with torch.no_grad():
        recon_N3HW = (vae.idxBl_to_img(vae.img_to_idxBl(tiny.to_signed(real_N3HW.to(args.device)))) + 1) / 2
    out = {"stage": "vqvae", "ch_mult": args.ch_mult, "ch": args.ch, "params_M": sum(
        p.numel() for p in vae.parameters()) / 1e6, **log.metrics}
    out.update({f"recon_{k}": accuracy(m, recon_N3HW, labels_N) for k, m in judges(args.device).items()})
    return {**out, "steps": log.steps_done, "seconds": log.seconds}


def run_var(args: argparse.Namespace, cfg: tiny.TinyConfig) -> dict:
    vae = tiny.load_vqvae(args.vae, cfg.var.model.patch_nums).to(args.device)
    model = dataclasses.replace(cfg.var.model, embed_dim=args.width, num_heads=args.width // 64, depth=args.depth)
    cfg.var = dataclasses.replace(cfg.var, steps=args.steps, batch_size=args.batch, model=model, minutes=args.minutes,
                                  lr=args.lr)
    var, log = tiny.train_var(cfg, vae, args.out / f"{args.name}.pt", progress=False)
    backbone = VARBackbone(vae, var.eval())
    classifiers = judges(args.device)
    labels_N = torch.arange(args.n) % NUM_CLASSES
    out = {"stage": "var", "vae": args.vae.name, "width": args.width, "depth": args.depth, "batch": args.batch,
           "lr": args.lr, "params_M": sum(p.numel() for p in var.parameters()) / 1e6, "steps": log.steps_done,
           "seconds": log.seconds, "final_loss": sum(log.losses[-50:]) / len(log.losses[-50:]), "grid": {}}
    for w in args.cfg:
        images_N3HW = sample(backbone, labels_N, w_cfg=w, w_igg=None, seed=EVAL_SEED).images
        out["grid"][f"{w:g}"] = {k: accuracy(m, images_N3HW, labels_N) for k, m in classifiers.items()}
    return out


def run_classifier(args: argparse.Namespace, cfg: tiny.TinyConfig) -> dict:
    cfg.classifier = dataclasses.replace(cfg.classifier, steps=args.steps, minutes=args.minutes)
    out = {"stage": "classifier", "steps": args.steps}
    for hue_random, key in ((False, "acc"), (True, "shape_acc")):
        log = tiny.train_classifier(cfg, args.out / f"{args.name}_{key}.pt", hue_random=hue_random, progress=False)
        out[key], out[f"{key}_seconds"] = log.metrics["accuracy"], log.seconds
    return out


def table(folder: Path) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    lines = []
    vaes = {k: r for k, r in runs.items() if r["stage"] == "vqvae"}
    if vaes:
        lines += ["| tokenizer | ch_mult | params (M) | steps | PSNR (dB) | codes used | recon acc | recon shape acc |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {k} | {tuple(r['ch_mult'])} | {r['params_M']:.2f} | {r['steps']} | {r['psnr_db']:.2f} | "
                  f"{r['codes_used_pct']:.0f} % | {r['recon_acc']:.3f} | {r['recon_shape_acc']:.3f} |"
                  for k, r in vaes.items()]
    vars_ = {k: r for k, r in runs.items() if r["stage"] == "var"}
    if vars_:
        grid = list(next(iter(vars_.values()))["grid"])
        lines += ["", "| transformer | tokenizer | depth × width | params (M) | batch | steps | loss | "
                  + " | ".join(f"w={w} acc / shape" for w in grid) + " |",
                  "|---|---|---|---:|---:|---:|---:|" + "---:|" * len(grid)]
        lines += [f"| {k} | {r['vae']} | {r['depth']} × {r['width']} | {r['params_M']:.2f} | {r['batch']} | "
                  f"{r['steps']} | {r['final_loss']:.3f} | "
                  + " | ".join(f"{r['grid'][w]['acc']:.3f} / {r['grid'][w]['shape_acc']:.3f}" for w in grid) + " |"
                  for k, r in vars_.items()]
    clfs = {k: r for k, r in runs.items() if r["stage"] == "classifier"}
    if clfs:
        lines += ["", "| classifiers | steps | accuracy (fresh real) | shape-only accuracy (hue-randomised) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {r['steps']} | {r['acc']:.4f} | {r['shape_acc']:.4f} |" for k, r in clfs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    recipe, vae, var = tiny.TinyConfig(), tiny.tiny_vqvae_config(), tiny.tiny_var_config()   # the defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for stage in ("vqvae", "var", "classifier"):
        s = sub.add_parser(stage)
        s.add_argument("--name", required=True)
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--steps", type=int, required=True)
        s.add_argument("--minutes", type=float, default=60.0, help="wall-clock cap of the stage")
        s.add_argument("--device", default="cpu")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--n", type=int, default=800, help="evaluation images (balanced labels)")
        if stage == "vqvae":
            s.add_argument("--ch-mult", type=int, nargs="+", default=list(vae.ch_mult))
            s.add_argument("--ch", type=int, default=vae.ch)
            s.add_argument("--batch", type=int, default=recipe.vqvae.batch_size)
        if stage == "var":
            s.add_argument("--vae", type=Path, required=True)
            s.add_argument("--width", type=int, default=var.embed_dim)
            s.add_argument("--depth", type=int, default=var.depth)
            s.add_argument("--batch", type=int, default=recipe.var.batch_size)
            s.add_argument("--lr", type=float, default=recipe.var.lr)
            s.add_argument("--cfg", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
    t = sub.add_parser("table")
    t.add_argument("folder", type=Path)
    t.add_argument("--write", action="store_true", help=f"write the ## {SECTION} section of docs/BENCHMARKS.md")
    t.add_argument("--machine", default="", help="where the variants ran, for the record")
    args = p.parse_args(argv)
    if args.command == "table":
        body = table(args.folder)
        print(body)
        if args.write:
            intro = (f"Variants of one stage each, trained by `python bench/bench_recipe.py {{vqvae,var,classifier}} "
                     f"...` (steps and wall-clock cap per run; a run stopped by its cap shows fewer steps), gathered "
                     f"by `python bench/bench_recipe.py table`. Machine: {args.machine or 'not recorded'}. Judges: "
                     "the shipped classifiers; transformer samples with balanced labels, seeded.")
            write_section(BENCHMARKS, SECTION, intro + "\n\n" + body)
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = tiny.TinyConfig(seed=args.seed, threads=args.threads, device=args.device)
    start = time.monotonic()
    result = {"vqvae": run_vqvae, "var": run_var, "classifier": run_classifier}[args.command](args, cfg)
    result["total_seconds"] = time.monotonic() - start
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(args.name, json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
