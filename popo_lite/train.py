"""Command line: `python -m popo_lite.train [--config FILE] [--FIELD VALUE ...] [--resume | --restart]`.

A thin shell over `trainer.train`: every Config field is an option (help text from the field), YAML
values are overridden by options, and a progress bar shows the per-step records.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from popo_lite.config import Config, ConfigError, add_config_options, load_config
from popo_lite.training.run_paths import RunsError, file_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m popo_lite.train",
        usage="%(prog)s [--config FILE] [--resume] [--FIELD VALUE ...]  (all options: --help)",
        description="Train a LoRA policy on math problems with POPO (positive-only policy optimisation) or "
        "GRPO. With no option it trains the embedded SmolLM2-135M-Instruct on arithmetic, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file whose keys are the option names below (see configs/).")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue the run named by --run_name (or the config) from its last checkpoint that loads "
        "and fits the config; stops, changing nothing, when the run has a history but no such checkpoint.",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="Start the run named by --run_name over from step 0; its old metrics, rollouts, checkpoints "
        "and evaluations are moved into <run>/restarted-<time>/, not deleted.",
    )
    add_config_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = vars(build_parser().parse_args(argv))
    config_path, resume, restart = arguments.pop("config"), arguments.pop("resume"), arguments.pop("restart")
    if resume and restart:
        print(
            "error: --resume and --restart exclude each other: continue the run, or start it over",
            file=sys.stderr,
        )
        return 2
    if (resume or restart) and config_path is None and arguments.get("run_name"):
        # Resuming by name alone continues with the run's own resolved config (options still override).
        run_dir = Path(arguments.get("output_dir", Config.output_dir)) / arguments["run_name"]
        try:  # never read through a link: the run's own config.yaml only
            config_path = file_path(run_dir, "config.yaml") if run_dir.is_dir() else None
        except RunsError as error:
            print(f"error: {error}; nothing was changed", file=sys.stderr)
            return 2
    try:
        config = load_config(config_path, arguments)
        if (resume or restart) and config.run_name is None:
            flag = "--resume" if resume else "--restart"
            raise ConfigError(f"{flag} needs --run_name: the name of the run to continue or start over")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if config.model_loader == "unsloth":
        _import_unsloth_first()
    # Heavy imports (torch, transformers) only once the config is known to be good: --help stays fast.
    from popo_lite.data.problems import DataError
    from popo_lite.engine.model import ModelError
    from popo_lite.training.distributed import is_main_process
    from popo_lite.training.failures import TrainingError
    from popo_lite.training.job_slot import holding_slot, slot_of
    from popo_lite.training.trainer import train

    main_process = is_main_process()  # under `accelerate launch` only one process prints
    # One job per GPU, as the web panel keeps it; under `accelerate launch` the main process holds it.
    slot = holding_slot(config.output_dir, slot_of(config.device), config.run_name or config.algo)
    try:
        with slot if main_process else nullcontext():
            record = _train_with_progress(train, config, resume, restart, main_process)
    except (ConfigError, DataError, ModelError, RunsError, TrainingError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if main_process and record:
        from popo_lite.training.summary import render_summary, run_summary

        summary = run_summary(record["run_dir"])  # None when metrics.jsonl cannot be read back
        print(render_summary(summary) if summary else f"run directory: {record['run_dir']}")
    elif main_process:
        print(f"nothing to do: the run already has {config.steps} steps")
    return 0


def _import_unsloth_first() -> None:
    """Unsloth patches transformers and peft when it is imported before them, as it asks to be."""
    try:
        import unsloth  # noqa: F401
    except Exception:  # not installed, or no GPU: unsloth_backend says so with the remedy
        pass


def _train_with_progress(train, config: Config, resume: bool, restart: bool, show: bool) -> dict:
    """Run `train(config)` under a progress bar; returns the last step's record ({} if none ran)."""
    record: dict = {}
    progress = tqdm(total=config.steps, desc=f"{config.algo} {config.model}", unit="step", disable=not show)
    try:  # closed on an error too, so the error's line is a line of its own
        for record in train(config, resume=resume, restart=restart):
            progress.n = record["step"]
            progress.set_postfix(
                reward=f"{record['reward_mean']:.3f}",
                pos=f"{record['positive_rate']:.2f}",
                loss=f"{record['loss']:.4f}" if "loss" in record else "-",
            )
            if "warning" in record and show:
                tqdm.write(f"step {record['step']}: {record['warning']}")
    finally:
        progress.close()
    return record


if __name__ == "__main__":
    sys.exit(main())
