"""What a training step reports: its record (reward and weight statistics, the objective's metrics,
learning rate, seconds and tokens/s per phase, peak memory) and evaluation during training.

Each step's record is one flat dict of numbers: a line of `metrics.jsonl`, the dict `train` yields and
what the reporters log.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from popo_lite.config import Config
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.updates import Update
from popo_lite.data.problems import Problem
from popo_lite.evaluation.benchmarks import EvalSettings, evaluate_problems
from popo_lite.training.checkpoint import checkpoint_name
from popo_lite.training.run_paths import make_folder, open_file, write_text


class PhaseTimer:
    """Wall seconds of a step's named phases (`with timer.phase("generate"): ...`)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@dataclass
class StepResult:
    """What one optimizer step produced, for its record and its files."""

    batch: list[Problem]  # (B,) this process's problems
    prompts: list[str]  # (B,)
    rollouts: Rollouts  # B*G rows, grouped
    rewards: torch.Tensor  # (B, G)
    answers: list[str | None]  # (B*G,) the answer extracted from each completion
    update: Update  # metrics, per-row weights or advantages, token log-probs
    grad_norm: float | None  # the policy adapter's gradient norm before clipping
    skipped: str | None  # why the optimizer step was skipped (a non-finite loss or gradient), or None
    timer: PhaseTimer
    monitors: dict[str, float] = field(default_factory=dict)  # e.g. kl_policy_ema, before the update


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "gpu"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss"  # ru_maxrss is KiB on Linux


def step_statistics(
    rewards: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, config: Config, popo: bool
) -> dict:
    """Reward, positive-set and weight statistics of one step (rewards (B, G), weights and lengths (B*G,))."""
    positive = rewards > config.reward_threshold  # (B, G)
    stats = {
        "reward_mean": float(rewards.mean()),
        "positive_rate": float(positive.float().mean()),
        "groups_with_positive": float(positive.any(1).float().mean()),
        "completion_length": float(lengths.float().mean()),
    }
    if not positive.any():
        stats["warning"] = "no positive rollout in this step: POPO has nothing to learn from"
    elif popo:
        positive_weights = weights.detach().cpu()[positive.flatten()]
        stats.update(weight_max=float(positive_weights.max()), weight_min=float(positive_weights.min()))
    return stats


def evaluate_during_training(session) -> dict[str, float]:
    """Greedy pass@1 of the policy on each eval benchmark; full results in `eval/step-NNNNNN.json`.

    Runs on the training process's main thread (math-verify's timeouts need it). Evaluation seeds each
    batch inside `torch.random.fork_rng`, so a run with evaluation samples the same rollouts as one without.
    """
    config = session.config
    settings = EvalSettings(
        max_new_tokens=config.eval_max_new_tokens or config.max_new_tokens,
        prompt_template=config.prompt_template,
        batch_size=config.generation_batch_size or config.rollouts_per_step,
        max_prompt_tokens=config.max_prompt_tokens,
    )
    results = {
        name: evaluate_problems(session.model, session.tokenizer, problems, settings, name=name)
        for name, problems in session.eval_problems.items()
    }
    run_dir, stem = session.run_dir, checkpoint_name(session.step)
    make_folder(run_dir, "eval")
    summary = {name: {k: v for k, v in result.items() if k != "records"} for name, result in results.items()}
    write_text(run_dir, "eval", f"{stem}.json", text=json.dumps(summary, indent=1))
    with open_file(run_dir, "eval", f"{stem}-records.jsonl", mode="w") as handle:
        for result in results.values():
            handle.writelines(json.dumps(record) + "\n" for record in result["records"])
    return {f"eval_{name}": result["score"] for name, result in results.items()}


def step_record(session, result: StepResult) -> dict:
    """The step's record; under `accelerate launch`, statistics over every process's groups."""
    config, replicas = session.config, session.replicas
    metrics = {**result.monitors, **result.update.metrics}
    if result.grad_norm is not None:
        metrics["grad_norm"] = result.grad_norm
    if result.skipped is not None:
        metrics.update(skipped=1.0, warning=f"step skipped: {result.skipped}")
    rewards, weights = result.rewards, result.update.row_weights
    lengths = result.rollouts.completion_mask.sum(1)
    if replicas is not None:
        metrics = replicas.mean_metrics(metrics)
        rewards, weights, lengths = replicas.gather(rewards, weights, lengths)
    record = {"step": session.step, "algo": config.algo}
    record.update(step_statistics(rewards, weights, lengths, config, popo=config.algo == "popo"))
    record.update(metrics)
    seconds, rollouts = result.timer.seconds, result.rollouts
    memory, memory_kind = peak_memory_gib(session.device)
    record["lr"] = session.scheduler.get_last_lr()[0]
    # seconds_generate (below) is the phase's wall time; the throughput uses the engine's own clock
    record["generation_tokens_per_s"] = rollouts.num_completion_tokens / max(rollouts.seconds, 1e-9)
    if result.update.metrics:  # a forward and backward ran: throughput of the update phase
        record["train_tokens_per_s"] = int(rollouts.attention_mask.sum()) / max(seconds["update"], 1e-9)
    record.update({f"seconds_{name}": value for name, value in seconds.items()})
    record["seconds_step"] = time.perf_counter() - result.timer.started
    record[f"peak_memory_gib_{memory_kind}"] = memory
    return record
