"""Command line: `python -m popo_lite.plan --config FILE [--FIELD VALUE ...] [--gpu_gib 24] [--json]`.

A thin shell over `planning/estimate.py`: prints the predicted peak GPU memory of a training config per
phase and whether it fits the card.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from popo_lite.config import ConfigError, add_config_options, load_config
from popo_lite.planning.estimate import estimate, render


def build_parser() -> argparse.ArgumentParser:
    """The training options (every Config field) plus --gpu_gib, --json and --processes."""
    parser = argparse.ArgumentParser(
        prog="python -m popo_lite.plan",
        description="Predict the peak GPU memory of a training config before launch (worst-case lengths), "
        "per phase, and whether it fits a card. Exit status 0 if it fits, 1 if not, 2 on a config error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file whose keys are the option names below (see configs/).")
    add_config_options(parser)
    parser.add_argument("--gpu_gib", type=float, default=24.0, help="GPU memory of the card, in GiB.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON instead of a table.")
    parser.add_argument(
        "--processes", type=int, default=1, help="GPUs of a data-parallel `accelerate launch` run (per GPU)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    config_path, gpu_gib, as_json = arguments.pop("config"), arguments.pop("gpu_gib"), arguments.pop("json")
    processes = arguments.pop("processes")
    try:
        config = load_config(config_path, arguments)
        plan = estimate(config, processes=processes, gpu_gib=gpu_gib)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({**asdict(plan), "gpu_gib": gpu_gib, "fits": plan.fits(gpu_gib)}, indent=1))
    else:
        print(render(plan, config, gpu_gib))
    return 0 if plan.fits(gpu_gib) else 1


if __name__ == "__main__":
    sys.exit(main())
