"""The command line and the config: options, YAML, clear errors naming the bad key or value."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_ENV, ROOT

from popo_lite.config import Config, ConfigError, load_config
from popo_lite.panel import jobs
from popo_lite.train import build_parser


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **CLI_ENV}
    return subprocess.run(
        [sys.executable, "-m", "popo_lite.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_subprocess_trains_tiny_model_and_writes_run_directory(tiny_cli_args, tmp_path):
    result = _cli(
        *tiny_cli_args,
        "--prompts_per_step",
        "2",
        "--rollouts_per_prompt",
        "4",
        "--steps",
        "2",
        "--predictor_dim",
        "8",
        "--lora_rank",
        "2",
        "--output_dir",
        str(tmp_path / "runs"),
        "--run_name",
        "cli",
        "--no-log_rollouts",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "cli"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (run_dir / "rollouts.jsonl").exists()
    assert (run_dir / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    assert load_config(run_dir / "config.yaml").lora_rank == 2  # the resolved config round-trips
    assert not list((tmp_path / "runs").glob(".active-*"))  # its slot was held, and is free again


def test_cli_bad_config_key_exits_nonzero_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\nsteps: 2\n")
    result = _cli("--config", str(bad), cwd=tmp_path)
    assert result.returncode != 0
    assert "lerning_rate" in result.stderr and "learning_rate" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for field in dataclasses.fields(Config):
        assert f"--{field.name}" in text, field.name
    assert "--qlora" in text and "--no-qlora" in text and "--resume" in text


def test_cli_options_override_yaml_with_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nalgo: grpo\nlevels: [3, 4]\n")
    args = vars(
        build_parser().parse_args(
            ["--steps", "7", "--qlora", "--learning_rate", "3e-5", "--run_name", "none"]
        )
    )
    config = load_config(path, {k: v for k, v in args.items() if k not in ("config", "resume", "restart")})
    assert (config.steps, config.algo, config.levels, config.qlora) == (7, "grpo", [3, 4], True)
    assert config.learning_rate == 3e-5 and config.run_name is None


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"algo": "ppo"}, "algo"),
        ({"steps": 0}, "steps"),
        ({"tau": 1.5}, "tau"),
        ({"alpha": "big"}, "alpha"),
        ({"qlora": "yes"}, "qlora"),
        ({"algo": "grpo", "rollouts_per_prompt": 1}, "rollouts_per_prompt"),
        ({"weight_mode": "max"}, "weight_mode"),
        ({"run_name": "../escape"}, "run_name"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(values, named):
    with pytest.raises(ConfigError, match=named):
        Config(**values)


def test_malformed_yaml_and_missing_file_are_clear_errors(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


def test_cli_refuses_a_slot_another_run_holds(tiny_cli_args, tmp_path):
    """One job per GPU (or CPU), as in the panel: a second command-line run is refused by name, and the
    panel will not stop a command-line run it did not start."""
    root = tmp_path / "runs"
    (root / "other").mkdir(parents=True)
    Config(device="cpu", output_dir=str(root), run_name="other").save(root / "other" / "config.yaml")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "popo_lite.train"])
    try:
        lock = {"run": "other", "kind": "training", "module": "popo_lite.train", "origin": "command line"}
        (root / ".active-cpu.json").write_text(
            json.dumps({**lock, "pid": holder.pid, "started": time.time()})
        )
        result = _cli(
            *tiny_cli_args, "--device", "cpu", "--output_dir", str(root), "--run_name", "b", cwd=tmp_path
        )
        assert result.returncode == 2
        assert "cpu is busy" in result.stderr and "'other'" in result.stderr, result.stderr[-1000:]
        assert not (root / "b").exists()
        assert "started from the command line" in jobs.stop_run(root, "other")
        assert holder.poll() is None  # not killed
    finally:
        holder.kill()
        holder.wait()


def test_the_default_recipe_writes_out_the_config_defaults():
    """configs/default.yaml says `python -m popo_lite.train` with no option runs the same: every key,
    the learning rate the fair study chose for POPO included."""
    assert load_config(ROOT / "configs" / "default.yaml").to_dict() == Config().to_dict()
    assert Config().learning_rate == 4e-4
