"""What a training step reports: reward and weight statistics, peak memory, evaluation results.

The trainer puts these into each step's record (`metrics.jsonl`, the yielded dict, the reporters).
"""

from __future__ import annotations

import json
import resource

import torch

from popo_lite.config import Config
from popo_lite.evaluation.benchmarks import EvalSettings, evaluate_problems
from popo_lite.training.checkpoint import checkpoint_name


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
    folder = session.run_dir / "eval"
    folder.mkdir(exist_ok=True)
    summary = {name: {k: v for k, v in result.items() if k != "records"} for name, result in results.items()}
    (folder / f"{checkpoint_name(session.step)}.json").write_text(json.dumps(summary, indent=1))
    with open(folder / f"{checkpoint_name(session.step)}-records.jsonl", "w") as handle:
        for result in results.values():
            handle.writelines(json.dumps(record) + "\n" for record in result["records"])
    return {f"eval_{name}": result["score"] for name, result in results.items()}
