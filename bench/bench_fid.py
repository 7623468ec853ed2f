"""Images/s of the in-memory FID path vs writing PNGs and scoring the folder with torch-fidelity.

Both paths score the same generated images (float in [0, 1], as the sampler returns them) against the same
reference, with the same extractor, in the same run; the reference statistics are prepared beforehand for both
(our disk cache / torch-fidelity's ``input2_cache_name``), so only the generated side is timed:

- in memory: ``FidEvaluator.score(batches, reference)`` (quantise, extract, FID);
- PNG folder: ``torchvision.utils.save_image`` per image, then ``torch_fidelity.calculate_metrics`` on the folder
  (its defaults, so its DataLoader workers decode the PNGs).

Run: ``.venv/bin/python bench/bench_fid.py [--sizes 32 64] [--num-images 1024] [--write]``; ``--write``
replaces the ``## FID`` section of docs/BENCHMARKS.md with the table and this command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchdoc import BENCHMARKS, write_section
from torch_fidelity import KEY_METRIC_FID, calculate_metrics
from torchvision.utils import save_image

from pipeline.data.classifier import SHIPPED_CLASSIFIER, ClassifierConfig, ShapeClassifier, save_classifier
from pipeline.data.shapes import ShapesConfig, make_batch, random_labels
from pipeline.fid.fidelity import TINY_EXTRACTOR, BatchSource, FidEvaluator

SECTION = "FID"


def time_in_memory(evaluator: FidEvaluator, generated: torch.Tensor, reference, batch_size: int) -> tuple[float, float]:
    start = time.perf_counter()
    fid = evaluator.score(generated.split(batch_size), reference)["fid"]
    return time.perf_counter() - start, fid


def time_png_folder(generated: torch.Tensor, folder: Path, kwargs: dict) -> tuple[float, float, float]:
    """(seconds writing PNGs, seconds scoring the folder, FID)."""
    folder.mkdir()
    start = time.perf_counter()
    for i, image in enumerate(generated):
        save_image(image, folder / f"{i:06d}.png")
    written = time.perf_counter()
    fid = calculate_metrics(input1=str(folder), **kwargs)[KEY_METRIC_FID]
    return written - start, time.perf_counter() - written, fid


def run(size: int, num_images: int, batch_size: int, repeats: int, weights: Path, work: Path) -> dict:
    config = ShapesConfig(size=size)
    generated = (make_batch(random_labels(num_images, 1), 1, config=config) * 0.9 + 0.05).clamp(0, 1)
    real = make_batch(random_labels(num_images, 2), 2, config=config)
    evaluator = FidEvaluator(TINY_EXTRACTOR, weights_path=weights, batch_size=batch_size, progress=False)
    reference = evaluator.reference(BatchSource(f"bench-{size}-{num_images}", lambda: real.split(batch_size)))

    real_dir = work / f"real-{size}"
    real_dir.mkdir()
    for i, image in enumerate(real):
        save_image(image, real_dir / f"{i:06d}.png")
    kwargs = dict(input2=str(real_dir), input2_cache_name=f"bench-real-{size}-{num_images}", cache_root=str(work),
                  fid=True, feature_extractor=TINY_EXTRACTOR, feature_extractor_weights_path=str(weights),
                  cuda=False, verbose=False, batch_size=batch_size)
    calculate_metrics(input1=str(real_dir), **kwargs)  # fills torch-fidelity's cache of the reference statistics

    memory, png, fid_diffs = [], [], []
    for r in range(repeats):  # alternate which path runs first, so background load hits both alike
        if r % 2:
            png.append(time_png_folder(generated, work / f"generated-{size}-{r}", kwargs))
            memory.append(time_in_memory(evaluator, generated, reference, batch_size))
        else:
            memory.append(time_in_memory(evaluator, generated, reference, batch_size))
            png.append(time_png_folder(generated, work / f"generated-{size}-{r}", kwargs))
        fid_diffs.append(abs(memory[-1][1] - png[-1][2]))
    write_s, score_s, _ = min(png, key=lambda t: t[0] + t[1])
    return {"size": size, "memory": min(t[0] for t in memory), "write": write_s, "score": score_s,
            "fid": memory[0][1], "fid_diff": max(fid_diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image side(s), pixels")
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per path; the fastest is reported")
    parser.add_argument("--write", action="store_true", help="update the ## FID section of docs/BENCHMARKS.md")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights, weights_note = SHIPPED_CLASSIFIER, "shipped tiny_classifier.pt"
        if not weights.is_file():  # same architecture and cost as the shipped classifier
            weights, weights_note = work / "classifier.pt", "randomly initialised ShapeClassifier (default config)"
            save_classifier(ShapeClassifier(ClassifierConfig()).eval(), weights)
        rows = [run(size, args.num_images, args.batch_size, args.repeats, weights, work) for size in args.sizes]

    n = args.num_images
    lines = [
        f"Command: `{shlex.join(['.venv/bin/python', 'bench/bench_fid.py', *sys.argv[1:]])}`",
        "",
        f"{n} generated images (float in [0, 1], in memory) scored by FID against {n} reference images with the "
        f"`{TINY_EXTRACTOR}` extractor ({weights_note}), batch size {args.batch_size}, CPU, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; best of {args.repeats} runs, same "
        "images and same run for both paths; reference statistics prepared beforehand for both. PNG path = "
        "`save_image` per image + `torch_fidelity.calculate_metrics` on the folder (its default DataLoader workers). "
        f"Load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (a shared machine: ratios from the "
        "same run are the comparable numbers). On CPU the extractor dominates both paths; the in-memory path saves "
        "the PNG encode (write column) and decode, and needs no folder.",
        "",
        "| image side | in memory (img/s) | PNG folder (img/s) | of which: write PNGs (s) | score folder (s) "
        "| speed-up | FID | abs FID difference |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        png = row["write"] + row["score"]
        lines.append(f"| {row['size']} | {n / row['memory']:.0f} | {n / png:.0f} | {row['write']:.2f} "
                     f"| {row['score']:.2f} | {png / row['memory']:.1f}x | {row['fid']:.4g} | {row['fid_diff']:.1e} |")
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(BENCHMARKS, SECTION, body)
        print(f"wrote the ## {SECTION} section of {BENCHMARKS}")


if __name__ == "__main__":
    main()
