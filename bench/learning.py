"""POPO against GRPO on the embedded real model: held-out accuracy before and after, per seed.

    python bench/learning.py --seeds 0 1 2 --steps 5
    python bench/learning.py --config configs/ablations/no-ema.yaml --algos popo   # any ablation

For each algorithm and seed the same config is trained (the embedded SmolLM2-135M-Instruct on 2-digit
+ 1-digit additions, 8 prompts x 8 rollouts per step: the same rollout budget for both), then scored
greedily on held-out additions that share no (a, b) pair with training. It also tracks the
implicit-negative diagnostic of docs/algorithm.md section 5.3: the mean token log-probability, under the
policy, of a fixed set of held-out NEGATIVE rollouts (wrong answers sampled once from the base
model), which POPO never trains on. Writes bench/results/learning.{json,md}; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_lite.config import load_config  # noqa: E402
from popo_lite.core.rollouts import Rollouts  # noqa: E402
from popo_lite.core.siamese import ema_forward  # noqa: E402
from popo_lite.core.updates import sequence_logprobs  # noqa: E402
from popo_lite.data.problems import format_prompt, load_problems  # noqa: E402
from popo_lite.engine.rollouts import generate_rollouts  # noqa: E402
from popo_lite.evaluation.benchmarks import EvalSettings, evaluate_problems  # noqa: E402
from popo_lite.training.trainer import prepare, reward, run  # noqa: E402


def held_out_accuracy(session, problems, max_new_tokens: int) -> float:
    settings = EvalSettings(max_new_tokens=max_new_tokens, prompt_template="chat", batch_size=len(problems))
    return evaluate_problems(session.model, session.tokenizer, problems, settings, name="heldout")["score"]


def sample_negatives(session, problems, count: int) -> tuple[Rollouts, torch.Tensor]:
    """Wrong completions sampled from the untrained policy (= the base) on held-out problems."""
    config = session.config
    prompts = [format_prompt(p.problem, config.prompt_template, session.tokenizer) for p in problems]
    torch.manual_seed(12345)
    rollouts = generate_rollouts(
        session.model,
        session.tokenizer,
        prompts,
        4,
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        config.max_prompt_tokens,
    )
    rewards, _ = reward(rollouts, problems)
    negative_rows = (rewards.flatten() == 0).nonzero().flatten()[:count]
    return rollouts, negative_rows


def negative_logprob(session, negatives: tuple[Rollouts, torch.Tensor]) -> float:
    means, _, _ = sequence_logprobs(
        session.model, negatives[0], negatives[1], session.config.micro_batch_size, session.config.temperature
    )
    return float(means.mean())


def one_run(args, algo: str, seed: int, heldout, negatives_source) -> dict:
    overrides = {
        "algo": algo,
        "seed": seed,
        "steps": args.steps,
        "qlora": args.qlora,
        "max_new_tokens": args.max_new_tokens,
        "kl_every": 0,
        "save_every": 0,
        "output_dir": str(ROOT / "bench" / "runs"),
        "run_name": f"learning-{algo}-seed{seed}-{int(time.time())}",
    }
    config = load_config(args.config, overrides)  # an ablation recipe, or the embedded default
    started = time.perf_counter()
    session = prepare(config)
    if negatives_source.get("rollouts") is None:  # sampled once, from the first (untrained) policy
        negatives_source["rollouts"] = sample_negatives(session, heldout[: args.negative_prompts], 32)
        negatives_source["before_accuracy"] = held_out_accuracy(session, heldout, args.max_new_tokens)
    negatives = negatives_source["rollouts"]
    curve = [negative_logprob(session, negatives)]
    rewards = []
    for record in run(session):
        rewards.append(record["reward_mean"])
        curve.append(negative_logprob(session, negatives))
        print(
            f"  {algo} seed {seed} step {record['step']}: reward {record['reward_mean']:.3f} "
            f"negative log-prob {curve[-1]:.4f}",
            flush=True,
        )
    result = {
        "algo": algo,
        "seed": seed,
        "train_reward": rewards,
        "negative_logprob": curve,
        "after_accuracy": held_out_accuracy(session, heldout, args.max_new_tokens),
    }
    if algo == "popo":
        with torch.no_grad(), ema_forward(session.model):
            result["after_accuracy_ema"] = held_out_accuracy(session, heldout, args.max_new_tokens)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(results: list[dict], before: float, heldout_count: int) -> str:
    lines = [
        "| algorithm | seeds | held-out before | held-out after (policy) | after (EMA adapter) | "
        "negative log-prob start -> end | train reward first -> last step | wall time per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for algo in ("popo", "grpo"):
        rows = [r for r in results if r["algo"] == algo]
        if not rows:
            continue
        ema = spread([r["after_accuracy_ema"] for r in rows]) + " %" if algo == "popo" else "-"
        after = spread([r["after_accuracy"] for r in rows])
        lines.append(
            f"| {algo.upper()} | {len(rows)} | {100 * before:.1f} % | {after} % "
            f"| {ema} | {statistics.mean(r['negative_logprob'][0] for r in rows):.3f} -> "
            f"{statistics.mean(r['negative_logprob'][-1] for r in rows):.3f} "
            f"| {statistics.mean(r['train_reward'][0] for r in rows):.3f} -> "
            f"{statistics.mean(r['train_reward'][-1] for r in rows):.3f} "
            f"| {statistics.mean(r['wall_seconds'] for r in rows):.0f} s |"
        )
    lines.append(f"\nHeld-out: {heldout_count} additions, greedy, accuracy in % (mean ± std over seeds).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algos", nargs="+", default=["popo", "grpo"], choices=["popo", "grpo"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=40, help="held-out problems scored greedily")
    parser.add_argument("--negative_prompts", type=int, default=16)
    parser.add_argument("--qlora", action="store_true")
    parser.add_argument(
        "--config", help="base recipe, e.g. configs/ablations/no-ema.yaml (default: the defaults)"
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "learning"))
    args = parser.parse_args()

    heldout = load_problems("arithmetic", split="test", limit=args.heldout)
    negatives_source: dict = {}
    results: list[dict] = []
    for seed in args.seeds:
        for algo in args.algos:
            results.append(one_run(args, algo, seed, heldout, negatives_source))
            text = write_results(args, results, negatives_source["before_accuracy"], len(heldout))
    print(text)


def write_results(args, results: list[dict], before: float, heldout_count: int) -> str:
    """Rewritten after every run, so an interrupted benchmark keeps what it measured."""
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    command = "python " + " ".join(sys.argv).replace(str(ROOT) + "/", "")
    header = (
        f"Measured {date.today()} on {platform.machine()} {device}, torch {torch.__version__}.\n"
        f"Command: `{command}`\n"
    )
    text = header + "\n" + table(results, before, heldout_count) + "\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(
        json.dumps(
            {"command": command, "device": device, "before_accuracy": before, "runs": results}, indent=1
        )
    )
    Path(args.output + ".md").write_text(text)
    return text


if __name__ == "__main__":
    main()
