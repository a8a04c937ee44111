"""Data-parallel training under `accelerate launch`: 2 CPU processes (gloo) must end identical.

Each process trains on its own prompt groups; DDP averages the gradients, so the policy adapter, the
EMA adapter and the predictor must be bit-for-bit equal on both processes, and must have moved.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, ROOT

from popo_lite.config import ConfigError
from popo_lite.training.distributed import check_split, shard
from popo_lite.training.trainer import prepare

WORKER = ROOT / "tests" / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 processes; on a machine without CUDA they run on the CPU over gloo."""
    env = {**os.environ, **CLI_ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _errors(result: subprocess.CompletedProcess) -> str:
    """The processes' stderr without the launcher's warnings and progress bars."""
    lines = result.stderr.splitlines()
    return "\n".join(line for line in lines if not line.startswith(("W1", "Writing")))[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "packing",
    [
        {"micro_batch_size": 4},  # the reference's micro-batches: every process runs the same count
        {"micro_batch_size": 1, "pack_positives": True, "entropy_over": "positives"},  # counts differ
    ],
    ids=["plain", "packed"],
)
def test_two_processes_hold_identical_adapters_ema_and_predictor(tiny_config, tmp_path, packing):
    config = tiny_config(prompts_per_step=4, rollouts_per_prompt=6, steps=2, lora_dropout=0.0, **packing)
    config.save(tmp_path / "config.yaml")
    result = _launch(str(WORKER), str(tmp_path / "config.yaml"), str(tmp_path), "train", cwd=tmp_path)
    assert result.returncode == 0, _errors(result)
    ranks = [torch.load(tmp_path / f"train-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    first, second = (r["state"] for r in ranks)
    assert (
        first.keys() == second.keys()
        and any(".ema." in k for k in first)
        and any("predictor" in k for k in first)
    )
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between the processes"
    moved = [name for name, before in ranks[0]["initial"].items() if not torch.equal(before, first[name])]
    assert any(".policy." in name for name in moved), "the policy adapter never changed"
    assert sum(rec["positive_rate"] for rec in ranks[0]["records"]) > 0  # something was learned from

    # Each process took 2 whole prompts per step, never the other's (groups are not split).
    for step in range(2):
        mine = [r["problems"][2 * step : 2 * step + 2] for r in ranks]
        assert len(mine[0]) == len(mine[1]) == 2 and not set(mine[0]) & set(mine[1])
    # Step statistics are over all 4 x 4 rollouts, the same on both processes; files from the main only.
    assert [rec["reward_mean"] for rec in ranks[0]["records"]] == [
        rec["reward_mean"] for rec in ranks[1]["records"]
    ]
    run_dir = Path(config.output_dir) / config.run_name
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()


@pytest.mark.slow
def test_two_processes_average_to_the_single_process_gradient(tiny_config, tmp_path):
    """Sharded by whole groups, with a zero-positive micro-batch on one process: the all-reduced gradient
    equals one process's gradient over all groups (POPO weights are per group, so nothing is lost)."""
    from distributed_worker import REWARDS, fixed_rollouts, gradients

    config = tiny_config(
        prompts_per_step=4,
        rollouts_per_prompt=4,
        micro_batch_size=4,
        lora_dropout=0.0,
        noise_std=0.0,
        shuffle_micro_batches=False,  # each process shuffles its own share: the split would differ
    )
    config.save(tmp_path / "config.yaml")
    result = _launch(str(WORKER), str(tmp_path / "config.yaml"), str(tmp_path), "gradient", cwd=tmp_path)
    assert result.returncode == 0, _errors(result)
    shared = [torch.load(tmp_path / f"gradient-rank{rank}.pt") for rank in (0, 1)]

    single_config = type(config)(**{**config.to_dict(), "output_dir": str(tmp_path / "single")})
    session = prepare(single_config)  # the same seed: the same initial adapters and predictor
    single = gradients(session, single_config, world=1, rank=0)
    assert fixed_rollouts(session.tokenizer.vocab_size).completion_ids.shape[0] == REWARDS.numel()
    assert single.keys() == shared[0].keys() and any("predictor" in k for k in single)
    for name, grad in single.items():
        torch.testing.assert_close(shared[0][name], shared[1][name], rtol=0, atol=0)  # all-reduced
        torch.testing.assert_close(shared[0][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(grad.abs().sum() > 0 for name, grad in single.items() if ".policy." in name)


@pytest.mark.slow
def test_accelerate_launch_of_the_cli_trains_grpo_and_resumes(tiny_cli_args, tmp_path):
    options = [*tiny_cli_args, "--algo", "grpo", "--prompts_per_step", "2", "--rollouts_per_prompt", "4"]
    options += ["--lora_rank", "2", "--output_dir", str(tmp_path / "runs"), "--run_name", "ddp"]
    result = _launch("-m", "popo_lite.train", *options, "--steps", "1", cwd=tmp_path)
    assert result.returncode == 0, _errors(result)
    run_dir = tmp_path / "runs" / "ddp"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert result.stdout.count("run directory:") == 1  # one process prints

    resumed = _launch("-m", "popo_lite.train", *options, "--steps", "2", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, _errors(resumed)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # continued from the checkpoint, not restarted
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()


def test_prompts_split_into_whole_groups_per_process():
    steps_prompts = list(range(6))
    shares = [shard(steps_prompts, rank, 3) for rank in range(3)]
    assert shares == [[0, 1], [2, 3], [4, 5]]
    check_split(6, 3)
    with pytest.raises(ConfigError, match="prompts_per_step=6 must be a multiple of the 4 processes"):
        check_split(6, 4)
