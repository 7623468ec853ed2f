"""The import graph of pipeline/ and tuners/ against the layer map: modules, layers, and every upward import.

Layers, bottom up (a module may import its own layer and the ones below), each a folder of pipeline/: data (files,
datasets, prompts); backbones; core (guidance, metrics, sampling, seeds, pictures); config; fid (FID, CLIP score); then
tuners/ (the stages); runtime (Ray, MLflow, library internals, Hydra's command line); outputs (best.yaml, report,
summary); the entry points at pipeline/'s top (preflight, sweep, generate, the Hydra callback). Only module-level
imports count (an import inside a function is a deliberate late binding).

    python bench/bench_layers.py            # the table and the upward imports
    python bench/bench_layers.py --git REV  # the same for a commit (e.g. the one before the redesign)
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [  # (layer, module prefixes), bottom first: pipeline/'s folders (and, for --git of an older commit, the
    # flat modules they held before the move), tuners/ between fid and runtime
    ("data", ["pipeline.data", "pipeline.files", "pipeline.prompts"]),
    ("backbones", ["pipeline.backbones"]),
    ("core", ["pipeline.core", "pipeline.seeds", "pipeline.guidance", "pipeline.metrics", "pipeline.sampling",
              "pipeline.render"]),
    ("config", ["pipeline.config"]),
    ("fid", ["pipeline.fid", "pipeline.clip_score"]),
    ("tuners", ["tuners"]),
    ("runtime", ["pipeline.runtime", "pipeline.distributed", "pipeline.tracking", "pipeline.internals",
                 "pipeline.app"]),
    ("outputs", ["pipeline.outputs", "pipeline.best", "pipeline.report", "pipeline.summary"]),
    ("entry", ["pipeline.preflight", "pipeline.sweep", "pipeline.generate", "pipeline.callbacks"]),
]


def layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def sources(rev: str | None) -> dict[str, str]:
    """module name -> source, of the working tree or of a commit."""
    if rev is None:
        files = [p.relative_to(ROOT).as_posix() for d in ("pipeline", "tuners") for p in (ROOT / d).rglob("*.py")]
        return {f[:-3].replace("/", ".").removesuffix(".__init__"): (ROOT / f).read_text() for f in files}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "pipeline", "tuners"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    return {f[:-3].replace("/", ".").removesuffix(".__init__"): subprocess.run(
        ["git", "show", f"{rev}:{f}"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
        for f in names if f.endswith(".py")}


def imports(source: str) -> set[str]:
    """Module-level imports of pipeline/ and tuners/ modules."""
    out = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] in ("pipeline", "tuners")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--git", default=None, help="a commit to read instead of the working tree")
    args = p.parse_args(argv)
    mods = sources(args.git)
    unplaced = sorted(m for m in mods if layer_of(m) is None and m not in ("pipeline", "tuners"))
    upward = sorted((m, t) for m, src in mods.items() for t in imports(src)
                    if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m))
    print("| layer | modules |\n|---|---:|")
    for i, (name, _) in enumerate(LAYERS):
        print(f"| {name} | {sum(layer_of(m) == i for m in mods)} |")
    print(f"\nmodules: {len(mods)}; outside the map: {', '.join(unplaced) or 'none'}")
    print(f"upward imports: {len(upward)}")
    for m, t in upward:
        print(f"- {m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
