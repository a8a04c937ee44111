"""Each step's numbers to TensorBoard and Weights & Biases, beside the run directory (`report_to`).

metrics.jsonl stays the run's record; these are views of it for people who live in those tools:
every numeric field of a step record becomes a scalar of the same name at that step; text fields
(algo, warning, checkpoint, run_dir) are left out.

- tensorboard: event files in `<run>/tensorboard/` (`tensorboard --logdir runs`). On resume the
  writer purges the steps after the last checkpoint, as `run_files.truncate_jsonl` drops them from
  the jsonl logs, so the curves show no doubled steps.
- wandb: one W&B run per process, in project $WANDB_PROJECT (default popo_lite), named and grouped by
  the run directory's name; a resumed run is a second W&B run in the same group.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from popo_lite.config import Config, ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to value -> package it needs


def check_reporters(report_to: list[str]) -> None:
    """Raise a ConfigError naming `pip install ...` for each asked sink whose package is missing.

    Imports nothing: the trainer calls it before loading the model, so a missing package fails in
    milliseconds, not after a long load.
    """
    for name in report_to:
        package = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to: {name!r} needs the {package} package, which is not installed: "
                f"pip install {package}"
            )


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a step record except `step` (bools and non-finite values dropped)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class Reporter:
    """Writes step records to the sinks in `config.report_to`; with none it does nothing."""

    def __init__(self, config: Config, run_dir: Path, first_step: int = 0) -> None:
        check_reporters(config.report_to)
        self.writer = None
        self.wandb_run = None
        if "tensorboard" in config.report_to:
            from torch.utils.tensorboard import SummaryWriter  # imported here: it loads tensorboard

            # purge_step: events at steps >= first_step + 1 from an interrupted earlier process are hidden.
            purge = first_step + 1 if first_step > 0 else None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in config.report_to:
            import wandb

            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "popo_lite"),
                name=run_dir.name,
                group=run_dir.name,
                dir=str(run_dir),
                config=config.to_dict(),
            )

    def log(self, record: dict) -> None:
        step, values = int(record["step"]), scalars(record)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # a notebook may stop iterating at any step: nothing waits for close()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
