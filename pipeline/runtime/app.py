"""Hydra plumbing of the sweep's entry point: the command line parsed as Hydra parses it, the jobs of ``-m`` expanded
as Hydra's basic sweeper expands them, and a ``@hydra.main`` application run on an argv with an exit status.

Hydra reports bad input with a traceback (or its first lines) and exit code 1, after it may have created its output
folder. The entry point checks the command line with these functions first, so that bad input is one line naming the
problem and the fix (a ConfigError), before Hydra runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from pipeline.config.schema import ConfigError
from pipeline.runtime.internals import hydra_args_parser, hydra_jobs

# Hydra flags that would compose another config than conf/sweep.yaml, which the checks before Hydra do not see.
OTHER_CONFIG_FLAGS = ("config_path", "config_name", "config_dir", "experimental_rerun")
COMMANDS = "--run, --multirun, --cfg, --info, --shell-completion"
HELP = "see `python -m pipeline.sweep --help`"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Hydra's flags and overrides, parsed by Hydra's own parser; ConfigError for what Hydra would refuse."""
    parser = hydra_args_parser()
    parser.exit_on_error = False
    try:
        args, extra = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err}; {HELP}") from None
    if extra and extra[0].startswith("-"):
        raise ConfigError(f"{extra[0]} is not a flag of this command; {HELP}")
    if extra:  # Hydra's parser takes one run of overrides
        raise ConfigError(f"{extra[0]}: give the overrides together, after the flags; e.g. python -m pipeline.sweep "
                          "-m guidance=cfg,igg seed=1")
    for flag in OTHER_CONFIG_FLAGS:
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} is not supported: the sweep composes conf/sweep.yaml; "
                              "add an option to conf/<group>/ or set keys with key=value")
    commands = args.run + (args.cfg is not None) + args.multirun + args.shell_completion + (args.info is not None)
    if commands > 1:
        raise ConfigError(f"give at most one of {COMMANDS}; e.g. --cfg job, or -m to run several sweeps")
    if args.resolve and args.cfg is None and not args.help:
        raise ConfigError("--resolve goes with --cfg or --help; e.g. --cfg job --resolve")
    return args


def _parse(parser: OverridesParser, text: str) -> Override:
    try:
        [override] = parser.parse_overrides([text])
    except HydraException as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{text}: {reason}; write group=option or key=value (key=a,b sweeps with -m)") from None
    return override


def job_overrides(args: argparse.Namespace, config_dir: Path) -> list[list[str]]:
    """The overrides of every job the command runs: one job, or with -m one per point of the sweeps' product.

    The expansion is Hydra's basic sweeper's (``key=a,b``, ``range(...)``, ``choice(...)``, ``glob(...)`` over a
    group's options), so the jobs checked here are the jobs Hydra launches. Raises ConfigError.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = [_parse(parser, text) for text in args.overrides]
        if not args.multirun:
            sweeps = [o.input_line for o in overrides if o.is_sweep_override()]
            if sweeps:
                raise ConfigError(f"{sweeps[0]} gives several values: add -m to run one sweep per value, or write a "
                                  "list as key=[a,b]")
            return [list(args.overrides)]
        try:
            jobs = hydra_jobs(overrides)
        except HydraException as err:
            raise ConfigError(f"{err}; sweep with key=a,b, range(...), choice(...) or glob(...)") from None
    return jobs


def run_app(app: Callable[[], object], argv: Sequence[str]) -> int:
    """Run a ``@hydra.main`` application on ``argv`` (in place of ``sys.argv[1:]``); returns its exit status."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "", *argv]
    GlobalHydra.instance().clear()  # a composition before (the checks) must not look like a running Hydra
    try:
        app()
    except SystemExit as done:  # --help, a job's refusal (2), or Hydra's own error (1)
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        sys.argv = saved
    return 0
