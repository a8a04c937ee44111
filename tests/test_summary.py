"""The end-of-run summary: read from the run directory, printed by the CLI."""

from __future__ import annotations

import json

from popo_lite.train import main
from popo_lite.training.summary import render_summary, run_summary
from popo_lite.training.trainer import train


def test_summary_gives_reward_first_to_last_heldout_before_and_after_and_next_commands(
    tiny_config, digit_problems
):
    config = tiny_config(steps=3, eval_every=3, eval_benchmarks=[str(digit_problems)], eval_limit=6)
    records = list(train(config))
    run_dir = records[-1]["run_dir"]
    summary = run_summary(run_dir)
    rewards = [r["reward_mean"] for r in records]
    assert summary["steps"] == 3 and summary["algo"] == "popo"
    assert (summary["reward_first"], summary["reward_last"]) == (rewards[0], rewards[-1])
    assert summary["reward_last_mean"] == sum(rewards) / 3
    with open(f"{run_dir}/eval/step-000000.json") as handle:
        before = json.load(handle)
    name = str(digit_problems)
    assert summary["heldout_before"] == {name: before[name]["score"]}
    assert summary["heldout_after"] == {name: records[-1][f"eval_{name}"]}
    assert summary["checkpoint"].endswith("step-000003")
    text = render_summary(summary)
    assert f"train reward: {rewards[0]:.3f} at step 1 -> {rewards[-1]:.3f} at step 3" in text
    assert "before ->" in text and f"run directory: {run_dir}" in text
    assert f"python -m popo_lite.evaluate --adapter {summary['checkpoint']}/policy" in text


def test_a_run_with_no_step_has_no_summary(tmp_path):
    assert run_summary(tmp_path) is None


def test_the_cli_ends_with_the_summary(tiny_cli_args, tmp_path, capsys):
    assert main([*tiny_cli_args, "--steps", "1", "--output_dir", str(tmp_path), "--run_name", "s"]) == 0
    out = capsys.readouterr().out
    assert "train reward:" in out and f"run directory: {tmp_path / 's'}" in out
    assert "python app.py --runs-dir" in out
