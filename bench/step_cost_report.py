"""bench/step_cost.py's results: per-phase means, floors and ratios (`summarise`) and the Markdown."""

from __future__ import annotations

import statistics

# A step's phases as the trainer's record names them (`seconds_<phase>`); update = weights + loss +
# similarity (POPO) or reference (GRPO) + optimizer (with the EMA update) in code that times them apart.
PHASES = (
    "generate",
    "reward",
    "weights",
    "loss",
    "similarity",
    "reference",
    "kl",
    "optimizer",
    "update",
    "step",
)
COUNTED = ("generate", "weights", "loss", "similarity", "reference", "kl")  # with matmul FLOPs of their own
PARTS = {"update": ("weights", "loss", "similarity", "reference"), "step": COUNTED}


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def phase_row(steps: list[dict], phase: str, gflops: float, optimizer_floor: float) -> dict:
    """Mean seconds (over the steps that timed the phase), mean GFLOP, floor seconds and their ratio."""
    timed = [entry for entry in steps if phase in entry["seconds"]]
    seconds = _mean([entry["seconds"][phase] for entry in timed])
    counted = timed or steps
    parts = PARTS.get(phase, (phase,) if phase in COUNTED else ())
    with_work = [entry for entry in counted if any(part in entry["flops"] for part in parts)]
    gflop = _mean([sum(entry["flops"].get(p, 0) for p in parts) / 1e9 for entry in with_work])
    unshared = _mean(
        [sum(entry["flops_one_prompt_per_rollout"].get(p, 0) for p in parts) / 1e9 for entry in with_work]
    )
    floor = gflop / gflops if gflop is not None else None
    if phase in ("optimizer", "update", "step"):  # elementwise: the bare AdamW step is its floor
        floor = (floor or 0.0) + optimizer_floor
    ratio = seconds / floor if seconds is not None and floor else None
    return {
        "seconds": seconds,
        "gflop": gflop,
        "gflop_one_prompt_per_rollout": unshared,
        "floor_seconds": floor,
        "ratio": ratio,
    }


def run_summary(run: dict, gflops: float) -> dict:
    steps = run["steps"]
    phases = {phase: phase_row(steps, phase, gflops, run["optimizer_floor_seconds"]) for phase in PHASES}
    return {
        "config": run["config"],
        "algo": run["algo"],
        "path": run["path"],
        "steps": len(steps),
        "prompt_tokens": _mean([statistics.mean(entry["prompt_tokens"]) for entry in steps]),
        "completion_tokens": _mean([statistics.mean(entry["completion_tokens"]) for entry in steps]),
        "positives": _mean([entry["positives"] for entry in steps]),
        "phases": {
            phase: row for phase, row in phases.items() if row["seconds"] is not None or row["floor_seconds"]
        },
    }


def summarise(results: dict) -> dict:
    """Per-run phase tables, each path's speed-up over the first path, and TRL's step over ours."""
    gflops = results["gemm"]["gflops"]
    runs = [run_summary(run, gflops) for run in results["runs"] if run["steps"]]
    paths = list(results["paths"])
    speedups = []
    for run in runs:
        baseline = next(
            (
                r
                for r in runs
                if (r["config"], r["algo"], r["path"]) == (run["config"], run["algo"], paths[0])
            ),
            None,
        )
        if baseline is None or run is baseline:
            continue
        ratios = {
            phase: baseline["phases"][phase]["seconds"] / row["seconds"]
            for phase, row in run["phases"].items()
            if row["seconds"] and (baseline["phases"].get(phase) or {}).get("seconds") is not None
        }
        speedups.append(
            {"config": run["config"], "algo": run["algo"], "path": run["path"], "over": paths[0]}
            | {"speedup": ratios}
        )
    peers = []
    for trl in results["trl"]:
        seconds = _mean(trl["seconds_step"])
        ours = {
            run["path"]: run["phases"]["step"]["seconds"]
            for run in runs
            if run["config"] == trl["config"] and run["algo"] == "grpo"
        }
        peers.append(
            {
                "config": trl["config"],
                "trl_seconds_step": seconds,
                "ours_seconds_step": ours,
                "trl_over_ours": {path: seconds / value for path, value in ours.items() if seconds and value},
            }
        )
    return {"runs": runs, "speedups": speedups, "trl": peers}


def _number(value: float | None, form: str = ".1f") -> str:
    return "-" if value is None else format(value, form)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(results: dict) -> str:
    summary, machine = results["summary"], results["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    rates = "; ".join(
        f"{when}: " + ", ".join(f"{name} {rate:.1f}" for name, rate in measured.items())
        for when, measured in results["gemm"].items()
        if isinstance(measured, dict)
    )
    paths = "; ".join(f"`{path}` = {overrides}" for path, overrides in results["paths"].items())
    lines = [
        "# step_cost: a training step's phases against this CPU's compute floor",
        "",
        f"{results['date']}; {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch "
        f"threads; {versions}.",
        f"Command: `{results['command']}` ({results['warmup']} untimed warm-up step(s) per path first).",
        "",
        f"Dense fp32 GEMM rate, best of its calls (GFLOP/s): {rates}. Floors use the best, "
        f"{results['gemm']['gflops']:.1f} GFLOP/s. Paths, stepping in turn and seeded alike: {paths}.",
        "",
        "GFLOP: the matmuls the phase must do with a group's prompt run once (bench/step_flops.py); the next "
        "column counts one prompt per rollout. Generation is counted with the LoRA weights merged; GRPO's "
        "reference is the base with the adapter off; similarity is the EMA adapter's features of the "
        "positives (no LM head). floor s = GFLOP / rate (optimizer: a bare AdamW step with "
        "clipping over the same tensors); ratio = seconds / floor. Means over the timed steps; '-': the "
        "code does not time that phase apart (or it has no floor: reward is math-verify).",
    ]
    lines += [f"- note: {note}" for note in results["notes"]]
    for run in summary["runs"]:
        lines += [
            "",
            f"## {run['config']} / {run['algo']} / {run['path']}",
            "",
            f"{run['steps']} timed step(s); mean prompt: {_number(run['prompt_tokens'])} tokens, mean "
            f"completion: {_number(run['completion_tokens'])} tokens; {_number(run['positives'])} positive "
            "rollouts per step.",
            "",
            "| phase | seconds | GFLOP | GFLOP, one prompt per rollout | floor s | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for phase, row in run["phases"].items():
            gflop, unshared = row["gflop"], row["gflop_one_prompt_per_rollout"]
            lines.append(
                f"| {phase} | {_number(row['seconds'])} | {_number(gflop, ',.1f')} | "
                f"{_number(unshared, ',.1f')} | {_number(row['floor_seconds'], '.2f')} | "
                f"{_times(row['ratio'])} |"
            )
    if summary["speedups"]:
        lines += ["", "## Speed-ups (seconds of the first path / seconds of this one)", ""]
        lines += ["| config | algo | path | " + " | ".join(PHASES) + " |"]
        lines += ["| --- | --- | --- |" + " ---: |" * len(PHASES)]
        for row in summary["speedups"]:
            cells = " | ".join(_times(row["speedup"].get(phase)) for phase in PHASES)
            lines.append(f"| {row['config']} | {row['algo']} | {row['path']} over {row['over']} | {cells} |")
    if summary["trl"]:
        lines += [
            "",
            "## Peer: TRL's GRPOTrainer on the same work (its s/step over ours: > 1 = ours faster)",
            "",
        ]
        lines += ["| config | TRL s/step | ours s/step (GRPO) | TRL / ours |", "| --- | ---: | --- | --- |"]
        for row in summary["trl"]:
            ours = ", ".join(f"{path} {seconds:.1f}" for path, seconds in row["ours_seconds_step"].items())
            ratio = ", ".join(f"{path} {value:.2f}x" for path, value in row["trl_over_ours"].items())
            lines.append(
                f"| {row['config']} | {_number(row['trl_seconds_step'])} | {ours or '-'} | {ratio or '-'} |"
            )
    return "\n".join(lines) + "\n"
