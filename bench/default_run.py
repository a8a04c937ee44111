"""The main command as a new user runs it, measured: `python -m popo_lite.train` (fp32 LoRA) and
`python -m popo_lite.train --qlora` (NF4 base) with no other option, over several seeds.

    python bench/default_run.py                       # seeds 0 1 2, both modes, interleaved
    python bench/default_run.py --seeds 3 --modes qlora
    python bench/default_run.py --seeds 0 --modes fp32 fp32-per-rollout --output bench/results/default_speed
    python bench/default_run.py --modes fp32-lr2e-4 fp32-lr4e-4 qlora-lr2e-4 qlora-lr4e-4 \
        --output bench/results/default_lr

Each run is the real command line in a subprocess (only --seed, --run_name and --output_dir added), so
its wall time is what a user waits, model load included. Resumable: a (mode, seed) already in the JSON
is skipped, and the JSON and the Markdown table are rewritten as each run ends. Output:
bench/results/default_run.{json,md}; the runs themselves under --runs_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from popo_lite.training.runs import read_jsonl  # noqa: E402
from popo_lite.training.summary import run_summary  # noqa: E402

PER_ROLLOUT = [  # the step before shared prompts: one prompt forward per rollout, every row decoded,
    "--no-shared_prompts",  # one forward per micro-batch
    "--gradient_checkpointing",
    "true",
    "--decode_unfinished_rows",
    "false",
    "--no-split_by_length",
]
MODES = {
    "fp32": [],
    "qlora": ["--qlora"],
    "fp32-per-rollout": PER_ROLLOUT,  # for the speed comparison: --modes fp32 fp32-per-rollout
    "qlora-per-rollout": ["--qlora", *PER_ROLLOUT],
    # the default's rate (the fair study's for POPO, bench/results/sweep.md) against the one before it;
    # bench/results/default_lr: --modes fp32-lr2e-4 fp32-lr4e-4 qlora-lr2e-4 qlora-lr4e-4
    "fp32-lr2e-4": ["--learning_rate", "2e-4"],
    "fp32-lr4e-4": ["--learning_rate", "4e-4"],
    "qlora-lr2e-4": ["--qlora", "--learning_rate", "2e-4"],
    "qlora-lr4e-4": ["--qlora", "--learning_rate", "4e-4"],
}
DEFAULT_MODES = ["fp32", "qlora"]


def run_one(mode: str, seed: int, runs_dir: Path) -> dict:
    name = f"default-{mode}-seed{seed}"
    command = [sys.executable, "-m", "popo_lite.train", *MODES[mode], "--seed", str(seed)]
    command += ["--run_name", name, "--output_dir", str(runs_dir)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr.decode()[-3000:]}")
    records = read_jsonl(runs_dir / name / "metrics.jsonl")
    summary = run_summary(runs_dir / name)
    return {
        "mode": mode,
        "seed": seed,
        "wall_seconds": round(seconds, 1),
        "rewards": [round(float(r["reward_mean"]), 4) for r in records],
        "positive_rate": [round(float(r["positive_rate"]), 4) for r in records],
        "seconds_step": [round(float(r["seconds_step"]), 1) for r in records],
        "heldout_before": summary["heldout_before"],
        "heldout_after": summary["heldout_after"],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5


def render(results: dict) -> str:
    runs = results["runs"]
    lines = [
        "# The default run, measured",
        "",
        f"`{results['command']}` on {results['machine']}, {results['date']}.",
        "",
        "Options per mode: "
        + "; ".join(
            f"{mode} `{' '.join(MODES[mode]) or '(none)'}`"
            for mode in MODES
            if any(run["mode"] == mode for run in runs)
        )
        + ".",
        "",
        "| mode | seed | train reward by step | held-out before -> after | wall time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        name = next(iter(run["heldout_after"] or run["heldout_before"] or {"-": 0}))
        before, after = run["heldout_before"].get(name), run["heldout_after"].get(name)
        heldout = f"{before:.1%} -> {after:.1%}" if before is not None and after is not None else "-"
        rewards = " ".join(f"{r:.2f}" for r in run["rewards"])
        lines.append(
            f"| {run['mode']} | {run['seed']} | {rewards} | {heldout} | {run['wall_seconds']:.0f} s |"
        )
    lines += [
        "",
        "| mode | seeds | first step reward | mean of the last 3 steps | held-out before | after "
        "| seconds per step (median) | wall time |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        chosen = [run for run in runs if run["mode"] == mode]
        if not chosen:
            continue
        first = [run["rewards"][0] for run in chosen]
        last = [_mean(run["rewards"][-3:]) for run in chosen]
        before = [next(iter(run["heldout_before"].values()), 0.0) for run in chosen]
        after = [next(iter(run["heldout_after"].values()), 0.0) for run in chosen]
        steps = sorted(seconds for run in chosen for seconds in run.get("seconds_step", []))
        median = f"{steps[len(steps) // 2]:.1f} s" if steps else "-"
        walls = [run["wall_seconds"] for run in chosen]
        lines.append(
            f"| {mode} | {len(chosen)} | {_mean(first):.3f} ± {_std(first):.3f} | "
            f"{_mean(last):.3f} ± {_std(last):.3f} | {_mean(before):.1%} | "
            f"{_mean(after):.1%} ± {_std(after):.1%} | {median} | {min(walls):.0f}-{max(walls):.0f} s |"
        )
    lines += [
        "",
        "Mean ± standard deviation over seeds. Held-out: greedy pass@1 on the task's held-out split.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=DEFAULT_MODES)
    parser.add_argument("--runs_dir", default=str(ROOT / "runs" / "bench-default"))
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "default_run"))
    args = parser.parse_args()
    output = Path(args.output)
    path = output.with_suffix(".json")
    results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    results.update(
        command="python -m popo_lite.train OPTIONS --seed S",
        machine=f"{platform.machine()} ({cpu_name()}), {os.cpu_count()} CPU cores, no GPU",
        date=str(date.today()),
    )
    done = {(run["mode"], run["seed"]) for run in results["runs"]}
    for seed in args.seeds:
        for mode in args.modes:  # interleaved: both modes meet the same machine load
            if (mode, seed) in done:
                continue
            results["runs"].append(run_one(mode, seed, Path(args.runs_dir)))
            results["runs"].sort(key=lambda run: (run["mode"], run["seed"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=1))
            output.with_suffix(".md").write_text(render(results))
            print(render(results), flush=True)


if __name__ == "__main__":
    main()
