"""The end-of-run summary, read from a run directory: what the CLI prints last and the panel shows atop Watch.

steps, train reward first -> last, held-out accuracy before -> after (when `eval_every` measured it),
seconds per step, the last checkpoint, and the commands that come next.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from popo_lite.training.run_paths import CHECKPOINT, RunsError, entries, scan_checkpoints
from popo_lite.training.runs import read_jsonl, read_run_text

LAST = 3  # steps averaged for "reward over the last steps": one step's reward is noisy


def _eval_scores(path: Path) -> dict[str, float]:
    try:
        results = json.loads(read_run_text(path.parent.parent, "eval", path.name) or "{}")
        return {name: float(result["score"]) for name, result in results.items() if "score" in result}
    except (AttributeError, TypeError, ValueError):  # not what the trainer writes
        return {}


def run_summary(run_dir: str | Path) -> dict | None:
    """The run's summary as a dict, or None when it has no step yet."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    if not records:
        return None
    rewards = [float(r["reward_mean"]) for r in records]
    try:
        evaluations = [
            p for p in entries(run_dir, "eval") if CHECKPOINT.fullmatch(p.stem) and p.suffix == ".json"
        ]
    except RunsError:  # eval/ is a link or a file: not read
        evaluations = []
    before = _eval_scores(evaluations[0]) if evaluations and evaluations[0].stem == "step-000000" else {}
    after = _eval_scores(evaluations[-1]) if evaluations and evaluations[-1].stem != "step-000000" else {}
    checkpoints = scan_checkpoints(run_dir, None)[0]  # newest first
    seconds = [float(r["seconds_step"]) for r in records if "seconds_step" in r]
    return {
        "run_dir": str(run_dir),
        "algo": records[-1].get("algo"),
        "steps": int(records[-1]["step"]),
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_last_mean": sum(rewards[-LAST:]) / len(rewards[-LAST:]),
        "steps_with_positive": sum(float(r.get("positive_rate", 0)) > 0 for r in records),
        "heldout_before": before,
        "heldout_after": after,
        "seconds_per_step": sum(seconds) / len(seconds) if seconds else None,
        "checkpoint": str(checkpoints[0][1]) if checkpoints else None,
    }


def next_commands(summary: dict) -> list[str]:
    """What a user runs next: evaluate the last checkpoint's adapter, open the panel on the runs folder."""
    commands = []
    if summary["checkpoint"]:
        adapter = shlex.quote(str(Path(summary["checkpoint"]) / "policy"))
        benchmarks = ",".join(summary["heldout_after"] or summary["heldout_before"]) or "arithmetic"
        commands.append(f"python -m popo_lite.evaluate --adapter {adapter} --benchmarks {benchmarks}")
    runs_dir = shlex.quote(str(Path(summary["run_dir"]).parent))
    commands.append(f"python app.py --runs-dir {runs_dir}")
    return commands


def render_summary(summary: dict) -> str:
    """The summary as plain text lines."""
    lines = [
        f"{summary['algo']}: {summary['steps']} steps, "
        f"{summary['steps_with_positive']} with a positive rollout",
        f"train reward: {summary['reward_first']:.3f} at step 1 -> {summary['reward_last']:.3f} at step "
        f"{summary['steps']} (mean of the last {min(LAST, summary['steps'])} steps: "
        f"{summary['reward_last_mean']:.3f})",
    ]
    for name in dict.fromkeys([*summary["heldout_before"], *summary["heldout_after"]]):
        before = summary["heldout_before"].get(name)
        after = summary["heldout_after"].get(name)
        shown = [f"{value:.1%}" if value is not None else "-" for value in (before, after)]
        lines.append(f"held-out {name} (greedy pass@1): {shown[0]} before -> {shown[1]} after")
    if summary["seconds_per_step"] is not None:
        lines.append(f"time per step: {summary['seconds_per_step']:.0f} s")
    lines.append(f"run directory: {summary['run_dir']}")
    if summary["checkpoint"]:
        lines.append(f"last checkpoint: {summary['checkpoint']}")
    lines.append("next:")
    lines += [f"  {command}" for command in next_commands(summary)]
    return "\n".join(lines)
