"""The files of a run directory, written after each step (`write_step`) and read by the panel (runs.py)
and the CLI.

<output_dir>/<run_name>/config.yaml        resolved config
                        metrics.jsonl      one record per step
                        rollouts.jsonl     every rollout of every step
                        eval/              evaluation during training
                        checkpoints/       see checkpoint.py
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import torch

from popo_lite.config import Config, ConfigError
from popo_lite.core.rollouts import Rollouts
from popo_lite.data.problems import Problem
from popo_lite.training.checkpoint import checkpoint_name, latest_checkpoint, save_checkpoint
from popo_lite.training.failures import TrainingError
from popo_lite.training.job_slot import WRITER_LOCK
from popo_lite.training.records import StepResult, evaluate_during_training


def run_directory(config: Config, resume: bool) -> Path:
    """The run directory: must exist on resume, must not hold a run otherwise. Creates nothing."""
    root = Path(config.output_dir)
    if resume and config.run_name is None:
        raise ConfigError("--resume needs --run_name: the name of the run to continue")
    name = config.run_name or f"{config.algo}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = root / name
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume: no run to resume at {run_dir} (give --run_name of an existing run)")
    elif run_dir.is_dir() and any(p.name != WRITER_LOCK for p in run_dir.iterdir()):
        raise ConfigError(f"run directory {run_dir} already holds a run: use --resume or another --run_name")
    elif run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a folder: use another --run_name")
    return run_dir


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after `last_step`, so a resumed run's logs match an uninterrupted run's."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    path.write_text("".join(line + "\n" for line in kept))


def write_rollouts(
    path: Path,
    step: int,
    tokenizer,
    batch: list[Problem],
    prompts: list[str],
    rollouts: Rollouts,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    extracted: list[str | None],
    token_logprobs: dict[int, list[float]],
) -> None:
    """Append every rollout of the step; rows the update scored also get their tokens and log-probs."""
    group = rollouts.group_size
    flat_rewards, flat_weights = rewards.flatten().tolist(), weights.detach().cpu().flatten().tolist()
    with open(path, "a") as handle:
        for i, text in enumerate(rollouts.texts):
            problem = batch[i // group]
            row = {
                "step": step,
                "group": i // group,
                "problem_id": problem.id,
                "prompt": prompts[i // group],
                "completion": text,
                "reward": flat_rewards[i],
                "weight": flat_weights[i],
                "extracted": extracted[i],
                "gold": problem.answer,
            }
            if i in token_logprobs:
                ids = rollouts.completion_ids[i, : len(token_logprobs[i])].tolist()
                row["tokens"] = [tokenizer.decode([token]) for token in ids]
                row["token_logprobs"] = [round(value, 4) for value in token_logprobs[i]]
            handle.write(json.dumps(row) + "\n")


def write_step(session, result: StepResult, record: dict) -> None:
    """Everything one step leaves in the run directory, main process only: its rollouts, the evaluation
    when due (its scores join the record), the record in `metrics.jsonl` and the reporters, and the
    checkpoint when due (after the logs, so its step is fully logged; its path joins the record)."""
    config, run_dir, step = session.config, session.run_dir, session.step
    if not session.is_main:
        return
    if config.log_rollouts:  # the main process's own share of the rollouts
        write_rollouts(
            run_dir / "rollouts.jsonl",
            step,
            session.tokenizer,
            result.batch,
            result.prompts,
            result.rollouts,
            result.rewards,
            result.update.row_weights,
            result.answers,
            result.update.token_logprobs,
        )
    if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
        record.update(evaluate_during_training(session))
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    session.reporter.log(record)
    if step == config.steps or (config.save_every and step % config.save_every == 0):
        record["checkpoint"] = str(save_checkpoint_of(session))


def save_checkpoint_of(session) -> Path:
    """Checkpoint the session; a failed write (disk full) removes itself and leaves the last one valid."""
    extra = {
        "sampler": session.sampler.state_dict(),
        "noise_generator": session.generator.get_state(),
        "shuffle_generator": session.shuffle_generator.get_state(),
    }
    folder = session.run_dir / "checkpoints"
    try:
        return save_checkpoint(
            folder,
            session.step,
            session.model,
            session.predictor,
            session.optimizer,
            session.scheduler,
            extra,
            session.adapters,
        )
    except OSError as error:
        shutil.rmtree(folder / f"{checkpoint_name(session.step)}.partial", ignore_errors=True)
        raise TrainingError(
            f"could not write the step {session.step} checkpoint ({error}); the last complete checkpoint "
            f"({latest_checkpoint(folder)}) is intact: free disk space and --resume"
        ) from None
