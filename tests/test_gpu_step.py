"""bench/gpu_step.py end to end at its tiniest: every phase runs and the table holds what the issue asks."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_step.py"
PHASES = [
    "build",
    "rollout_eager",
    "rollout_full",
    "rollout_static",
    "rollout_paged",
    "popo_step",
    "popo_step_entropy_positives",
    "popo_step_packed",
    "grpo_step",
]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # nothing runs at import
    return module


@pytest.mark.slow  # every phase of the bench, each timed: 4 to 23 s on 2 CPU cores
def test_gpu_step_tiny_run_reports_every_phase_and_a_finite_popo_grpo_ratio(tmp_path, capsys):
    bench = load_bench()
    sizes = ["--prompts", "2", "--rollouts", "2", "--new-tokens", "8", "--timed-tokens", "4"]
    results = bench.main(["--shape", "tiny", *sizes, "--out", str(tmp_path)])

    assert [row["key"] for row in results["phases"]] == PHASES
    ratio = results["popo_over_grpo_train_tokens_per_s"]
    assert math.isfinite(ratio) and ratio > 0
    assert results["static_over_eager_decode"] > 0 and results["paged_over_eager_decode"] > 0
    assert not any("not all" in note or "failed" in note for note in results["notes"]), results["notes"]
    printed = capsys.readouterr().out
    for label in (
        "rollout, eager",
        "rollout, static cache",
        "rollout, paged",
        "POPO step",
        "GRPO step",
        "POPO / GRPO",
    ):
        assert label in printed
    slug = bench.device_slug(results["device"])
    saved = json.loads((tmp_path / f"gpu_step-{slug}.json").read_text())
    assert saved["phases"] == results["phases"] and (tmp_path / f"gpu_step-{slug}.md").is_file()
    if not torch.cuda.is_available():
        assert "still to be measured" in printed
