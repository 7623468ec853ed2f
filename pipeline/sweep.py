"""Placeholder entry point until the sweep lands (issue 6)."""

import sys

if __name__ == "__main__":
    print("pipeline.sweep is not built yet: the sweep (Hydra + Optuna + Ray + MLflow) is in progress", file=sys.stderr)
    sys.exit(2)
