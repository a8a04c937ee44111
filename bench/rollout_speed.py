"""Rollout tokens/s of each generation cache on a real model: one config, the same prompts, in turn.

    python bench/rollout_speed.py                                   # the embedded model, CPU or GPU
    python bench/rollout_speed.py --config configs/qwen2.5-math-7b-qlora.yaml --caches dynamic paged

Loads the config's model as training does (`load_policy`: NF4 with qlora), takes its first
prompts_per_step training problems and samples prompts_per_step x rollouts_per_prompt completions of up
to max_new_tokens with each cache (Config.generation_cache) in turn. After --warmup calls per cache, the
caches take --rounds timed calls each, interleaved (so machine drift hits all alike) and seeded alike per
round. Real completions stop at EOS, so continuous batching's gain from finished rows shows here
(bench/gpu_step.py runs every completion to its end). Writes bench/results/rollout_speed-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from gpu_step import device_slug, sample, versions  # noqa: E402

from popo_lite.config import load_config  # noqa: E402
from popo_lite.data.problems import format_prompt, training_problems  # noqa: E402
from popo_lite.engine.choose import load_policy  # noqa: E402
from popo_lite.engine.rollouts import CACHES  # noqa: E402


def timed(session: tuple, cache: str, seed: int) -> dict:
    """Seconds, completion tokens and mean completion length of one rollout call (gpu_step.sample)."""
    model, tokenizer, prompts, config = session
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    rollouts = sample(model, tokenizer, prompts, config, config.max_new_tokens, cache, seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    lengths = rollouts.completion_mask.sum(1).float()
    return {
        "seconds": time.perf_counter() - started,
        "tokens": rollouts.num_completion_tokens,
        "mean_length": float(lengths.mean()),
    }


def measure(args: argparse.Namespace) -> dict:
    config = load_config(args.config, {})
    model, tokenizer, device = load_policy(config)
    problems = training_problems(config)[: config.prompts_per_step]
    prompts = [format_prompt(p.problem, config.prompt_template, tokenizer) for p in problems]
    session = (model, tokenizer, prompts, config)
    for cache in args.caches:
        for _ in range(args.warmup):
            timed(session, cache, args.seed)
    calls: dict[str, list[dict]] = {cache: [] for cache in args.caches}
    for round_ in range(args.rounds):
        for cache in args.caches:
            calls[cache].append(timed(session, cache, args.seed + round_))
    rows = []
    for cache, done in calls.items():
        speeds = [call["tokens"] / call["seconds"] for call in done]
        rows.append(
            {
                "cache": cache,
                "tokens_per_s": statistics.median(speeds),
                "tokens_per_s_each": speeds,
                "mean_length": statistics.mean(call["mean_length"] for call in done),
                "seconds_per_call": statistics.median(call["seconds"] for call in done),
            }
        )
    baseline = next((row["tokens_per_s"] for row in rows if row["cache"] == "dynamic"), None)
    for row in rows:
        row["over_dynamic"] = row["tokens_per_s"] / baseline if baseline else None
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "config": str(args.config) if args.config else "defaults (the embedded model)",
        "model": config.model,
        "qlora": config.qlora,
        "sizes": f"{config.prompts_per_step} prompts x {config.rollouts_per_prompt} rollouts, up to "
        f"{config.max_new_tokens} new tokens, temperature {config.temperature}",
        "warmup": args.warmup,
        "rounds": args.rounds,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        f"# rollout_speed: {results['model']} on {results['device']}",
        "",
        f"{results['date']}; "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items())
        + f"; config {results['config']} (NF4: {results['qlora']}); "
        f"{results['sizes']}; {results['warmup']} warm-up and {results['rounds']} timed calls per cache, "
        "interleaved.",
        "",
        "| cache | tokens/s (median) | each call | mean completion tokens | seconds per call | vs dynamic |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        each = ", ".join(f"{speed:,.0f}" for speed in row["tokens_per_s_each"])
        ratio = f"{row['over_dynamic']:.2f}x" if row["over_dynamic"] is not None else ""
        lines.append(
            f"| {row['cache']} | {row['tokens_per_s']:,.0f} | {each} | {row['mean_length']:.1f} | "
            f"{row['seconds_per_call']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="a training config (default: the defaults)")
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--rounds", type=int, default=2, help="timed calls per cache")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per cache first (compiles)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = measure(args)
    slug = device_slug(results["device"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rollout_speed-{slug}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"rollout_speed-{slug}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out / f'rollout_speed-{slug}.md'} and .json")
    return results


if __name__ == "__main__":
    main()
