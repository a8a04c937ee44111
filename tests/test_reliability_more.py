"""Lose nothing, fail clearly (continued): non-finite settings and parameters, one writer per run folder,
hostile YAML, corrupt checkpoints, and the small bad inputs that used to end in a traceback."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV

from popo_lite.config import Config, ConfigError, load_config
from popo_lite.data.problems import DataError, load_problems
from popo_lite.engine.model import ModelError, resolve_model_source
from popo_lite.panel import jobs, views
from popo_lite.training import job_slot
from popo_lite.training.checkpoint import latest_checkpoint
from popo_lite.training.failures import TrainingError
from popo_lite.training.runs import list_checkpoints, read_config, read_jsonl, read_rollouts, rollout_steps
from popo_lite.training.trainer import prepare, run


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "popo_lite.train", *args],
        cwd=cwd,
        env={**os.environ, **CLI_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(result: subprocess.CompletedProcess, named: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0], result.stderr[-2000:]


# ---- 1. non-finite settings and parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("max_grad_norm: .nan", "max_grad_norm"),
        ("learning_rate: .inf", "learning_rate"),
        ("learning_rate: .nan", "learning_rate"),
        ("alpha: .nan", "alpha"),
        ("temperature: .nan", "temperature"),
        ("temperature: .inf", "temperature"),
        ("reward_threshold: .nan", "reward_threshold"),
        ("reward_threshold: -.inf", "reward_threshold"),
        ("weight_temperature: .inf", "weight_temperature"),
        ("noise_std: .nan", "noise_std"),
        ("tau: .nan", "tau"),
    ],
)
def test_every_non_finite_float_setting_is_refused_at_config_time_naming_it(text, named, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=named) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


def test_cli_nan_max_grad_norm_exits_2_with_one_line_and_no_run_folder(tmp_path):
    runs = tmp_path / "runs"
    result = _cli(["--max_grad_norm", "nan", "--output_dir", str(runs), "--run_name", "r"], tmp_path)
    _one_line_error(result, "max_grad_norm")
    assert not runs.exists() or not any(runs.iterdir())


def test_an_update_that_makes_parameters_non_finite_stops_before_any_checkpoint_of_it(tiny_config):
    session = prepare(tiny_config(steps=3, save_every=1, rollouts_per_prompt=8, seed=2))
    steps = run(session)
    next(steps)  # step 1 trains and checkpoints normally
    session.config.max_grad_norm = float("nan")  # what `--max_grad_norm nan` did before config checks
    with pytest.raises(TrainingError, match="step 2") as caught:
        next(steps)
    assert "step-000001" in str(caught.value) and "intact" in str(caught.value)
    folder = session.run_dir / "checkpoints"
    assert latest_checkpoint(folder).name == "step-000001"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    assert [r["step"] for r in read_jsonl(session.run_dir / "metrics.jsonl")] == [1]
    from peft.utils import load_peft_weights

    for adapter in ("policy", "ema"):
        for tensor in load_peft_weights(str(folder / "step-000001" / adapter)).values():
            assert torch.isfinite(tensor).all()


# ---- 2. one writer per run directory -----------------------------------------------------------------


def test_auto_device_takes_the_cpu_slot_when_there_is_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert job_slot.slot_of("auto") == job_slot.slot_of("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert job_slot.slot_of("auto") == job_slot.slot_of("cuda") == "gpu0"
    assert job_slot.slot_of("cuda:1") == "gpu1"


HOLDER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from popo_lite.training.job_slot import hold_run_directory\n"
    "hold_run_directory(Path(sys.argv[1]), resume=False)\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_second_writer_of_a_run_folder_is_refused_whatever_its_device_spelling(tiny_config, tmp_path):
    run_dir = tmp_path / "runs" / "test"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **CLI_ENV},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for device in ("auto", "cpu"):
            with pytest.raises((ConfigError, job_slot.RunsError), match=rf"'test'.*pid {holder.pid}"):
                prepare(tiny_config(device=device))
        assert [p.name for p in run_dir.iterdir()] == [job_slot.WRITER_LOCK]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    session = prepare(tiny_config(steps=1))  # the holder died: its lock is stale and is taken over
    assert json.loads((run_dir / job_slot.WRITER_LOCK).read_text())["pid"] == os.getpid()
    list(run(session))
    assert not (run_dir / job_slot.WRITER_LOCK).exists()  # released when training ends
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-000001"


def test_a_run_that_fails_to_load_leaves_no_folder_and_no_lock(tiny_config, tmp_path):
    with pytest.raises(ModelError):
        prepare(tiny_config(model=str(tmp_path / "no-model")))
    assert not (tmp_path / "runs" / "test").exists()


# ---- 3. hostile YAML ---------------------------------------------------------------------------------

# 9 ** 8 = 43 million strings once expanded, in 300 bytes: every anchor inside one known key's value
BOMB = (
    "eval_benchmarks: [&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(7))
    + "]\n"
)


def test_a_yaml_alias_bomb_and_an_oversized_config_are_refused_in_well_under_a_second(tmp_path):
    bomb, big = tmp_path / "bomb.yaml", tmp_path / "big.yaml"
    bomb.write_text(BOMB)
    big.write_text("steps: 2\n" + "#" * 80 + "\n" * 1 + ("# padding\n" * 600_000))
    for path, message in ((bomb, "alias"), (big, "larger than")):
        started = time.monotonic()
        with pytest.raises(ConfigError, match=message):
            load_config(path)
        assert time.monotonic() - started < 1.0
    for text, message in ((BOMB, "alias"), (big.read_text(), "larger than")):
        started = time.monotonic()
        with pytest.raises(job_slot.RunsError, match=message):
            jobs._config_values(text)
        assert views.form_values(text) == {}
        assert time.monotonic() - started < 1.0
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(BOMB)  # a run folder's own config, as the panel reads it
    started = time.monotonic()
    assert read_config(tmp_path / "run") == {}
    assert time.monotonic() - started < 1.0


def test_duplicate_yaml_keys_and_non_utf8_configs_are_errors_naming_them(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("steps: 2\nalgo: popo\nsteps: 3\n")
    with pytest.raises(ConfigError, match=r"'steps'.*more than once"):
        load_config(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(latin)


def test_cli_resume_without_a_run_name_says_it_needs_one(tmp_path):
    _one_line_error(_cli(["--resume", "--output_dir", str(tmp_path / "runs")], tmp_path), "--run_name")


# ---- 4. corrupt checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "policy/adapter_model.safetensors", "predictor.pt"])
def test_resume_skips_a_truncated_last_checkpoint_and_says_which(damaged, tiny_config, caplog):
    list(run(prepare(tiny_config(steps=2, save_every=1))))
    config = tiny_config(steps=2, save_every=1)
    run_dir = Path(config.output_dir) / "test"
    target = run_dir / "checkpoints" / "step-000002" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        session = prepare(config, resume=True)
    assert session.step == 1
    assert any("step-000002" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert rollout_steps(run_dir) == [1]
    list(run(session))  # and it trains on to the end
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-000002"


def test_a_checkpoint_holding_nan_weights_is_skipped_on_resume(tiny_config, caplog):
    from safetensors.torch import load_file, save_file

    list(run(prepare(tiny_config(steps=2, save_every=1))))
    config = tiny_config(steps=2, save_every=1)
    checkpoint = Path(config.output_dir) / "test" / "checkpoints" / "step-000002"
    weights = checkpoint / "ema" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.full_like(v, math.nan) for k, v in tensors.items()}, weights)
    with caplog.at_level(logging.WARNING):
        assert prepare(config, resume=True).step == 1
    assert any("non-finite" in r.getMessage() for r in caplog.records)


def test_a_partial_folder_holding_its_marker_is_never_picked_or_listed(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    for name in ("step-000002", "step-000004.partial", "step-000003"):
        (folder / name).mkdir(parents=True)
        (folder / name / "COMPLETE").write_text("ok\n")
    (folder / "step-000005").mkdir()  # no marker: still being written
    assert latest_checkpoint(folder).name == "step-000003"
    assert list_checkpoints(tmp_path / "run") == ["step-000003", "step-000002"]


def test_resume_with_no_loadable_checkpoint_stops_rather_than_restarting(tiny_config):
    list(run(prepare(tiny_config(steps=1))))
    state = Path(tiny_config().output_dir) / "test" / "checkpoints" / "step-000001" / "trainer_state.pt"
    state.write_bytes(b"junk")
    with pytest.raises(TrainingError, match=r"no checkpoint .* loads"):
        prepare(tiny_config(steps=2), resume=True)


# ---- 5. small bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"run_name": "x" * 300}, "run_name"),
        ({"run_name": "a\nb"}, "run_name"),
        ({"run_name": "café"}, "run_name"),
        ({"device": "banana"}, "device"),
        ({"seed": 10**20}, "seed"),
        ({"lora_target_modules": [1, 2]}, "lora_target_modules"),
        ({"eval_benchmarks": [None]}, "eval_benchmarks"),
        ({"levels": ["3"]}, "levels"),
        ({"max_new_tokens": 10**9}, "32768"),
        ({"eval_max_new_tokens": 10**9}, "32768"),
        ({"lora_rank": 100_000}, "1024"),
    ],
)
def test_small_bad_values_are_refused_at_config_time_with_the_limit(values, named):
    with pytest.raises(ConfigError, match=named):
        Config(**values)


def test_config_refuses_exactly_the_run_names_the_panel_would_not_list():
    from popo_lite.training.runs import NAME

    for name in ("ok-1.2_b", "a" * 100, "x" * 101, ".hidden", "a b", "a..b", "ü"):
        allowed = bool(NAME.fullmatch(name)) and ".." not in name
        try:
            Config(run_name=name)
            accepted = True
        except ConfigError:
            accepted = False
        assert accepted == allowed, name


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("caf\xe9".encode("latin-1"), "UTF-8"),
        (b'{"problem": "A", "answer": "1"}\n{"problem": "B", "answ\n', "line 2"),
        (b'[1, 2]\n{"problem": "B", "answer": "2"}\n', "row 0"),
        (b'"just text"\n', "row 0"),
    ],
)
def test_unreadable_dataset_files_are_data_errors_naming_file_and_line(content, named, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=named) as caught:
        load_problems(str(path))
    assert "rows.jsonl" in str(caught.value)


def test_golds_that_cannot_be_parsed_are_dropped_with_a_count(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    rows = [("A", "\\frac{"), ("B", "2"), ("C", "}{"), ("D", "\\frac{1}{2}"), ("E", None)]
    path.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in rows))
    with caplog.at_level(logging.WARNING):
        problems = load_problems(str(path))
    assert [p.problem for p in problems] == ["B", "D"]
    assert any("2 rows whose gold answer cannot be parsed" in r.getMessage() for r in caplog.records)


def test_a_junk_model_folder_or_fake_gguf_is_a_model_error(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model_source(Config(model=str(folder)))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model_source(Config(model=str(folder)))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model_source(Config(model=str(fake)))
    (folder / "inside.gguf").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a GGUF"):
        resolve_model_source(Config(model=str(folder), gguf_file="inside.gguf"))


def test_two_runs_converting_one_gguf_at_once_both_get_the_complete_folder(tmp_path, monkeypatch):
    """Two processes on a fresh cache (two study lanes) convert the same GGUF at the same moment: each
    writes its own folder and the first rename wins; neither fails, and no half-written folder stays."""
    import threading

    from popo_lite.engine import model as model_module

    saving = threading.Barrier(2, timeout=10)  # both conversions are mid-save together

    class Fake:
        config = type("C", (), {})()
        hf_quantizer = None

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return cls()

        def save_pretrained(self, folder):
            saving.wait()
            Path(folder, "config.json").write_text("{}")

    monkeypatch.setenv("POPO_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_module, "AutoModelForCausalLM", Fake)
    monkeypatch.setattr(
        model_module, "AutoTokenizer", type("T", (Fake,), {"save_pretrained": lambda s, f: None})
    )
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    got, errors = [], []

    def convert():
        try:
            got.append(model_module.materialise_gguf(gguf))
        except Exception as error:  # either process failing fails the test
            errors.append(error)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    target = tmp_path / "cache" / "gguf" / "m"
    assert got == [target, target]
    assert (target / "config.json").is_file() and (target / "COMPLETE").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["m"]
    assert target.stat().st_mode & 0o777 == 0o755  # readable by the cache's other users


def test_cli_unwritable_output_dir_exits_2_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _cli(["--output_dir", str(blocker / "runs"), "--run_name", "r"], tmp_path)
    _one_line_error(result, "output_dir")


def test_cli_bad_model_folder_exits_2_before_loading(tiny_cli_args, tmp_path):
    folder = tmp_path / "junk-model"
    folder.mkdir()
    (folder / "config.json").write_text("\x00\x01 junk")
    args = [*tiny_cli_args, "--model", str(folder), "--output_dir", str(tmp_path / "runs"), "--run_name", "r"]
    _one_line_error(_cli(args, tmp_path), "config.json")
    assert not (tmp_path / "runs" / "r").exists()


def test_symlinks_out_of_a_run_folder_are_not_read(tmp_path):
    outside = tmp_path / "outside"
    (outside / "checkpoints" / "step-000001").mkdir(parents=True)
    (outside / "checkpoints" / "step-000001" / "COMPLETE").write_text("ok\n")
    (outside / "secret.jsonl").write_text('{"step": 1, "secret": true}\n')
    (outside / "secret.log").write_text("secret log\n")
    root = tmp_path / "runs"
    run_dir = root / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("steps: 1\n")
    (run_dir / "metrics.jsonl").symlink_to(outside / "secret.jsonl")
    (run_dir / "rollouts.jsonl").symlink_to(outside / "secret.jsonl")
    (run_dir / "checkpoints").symlink_to(outside / "checkpoints")
    (run_dir / jobs.LOG_NAME).symlink_to(outside / "secret.log")
    assert read_jsonl(run_dir / "metrics.jsonl") == []
    assert rollout_steps(run_dir) == [] and read_rollouts(run_dir, 1) == []
    assert list_checkpoints(run_dir) == []
    assert "secret" not in jobs.log_tail(root, "r")
