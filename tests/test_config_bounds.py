"""Config bounds: every size and float is bounded at config time, and bad YAML or flags are one
clear error (exit 2, no traceback) before any model loads. Each case crashed, allocated or was accepted
before."""

from __future__ import annotations

import dataclasses

import pytest

from popo_lite import train
from popo_lite.config import FLOAT_RANGES, SIZE_LIMITS, Config, ConfigError, load_config, parse_yaml_text
from popo_lite.panel import views


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"rollouts_per_prompt": 10**9}, "rollouts_per_prompt must be <= 1024"),  # asked for 768 GB
        ({"predictor_dim": 10**9}, "predictor_dim must be <= 65536"),  # asked for 2.3 TB
        ({"temperature": 1.0e-320}, "temperature must be in"),  # failed in sampling
        ({"eval_limit": 0}, "eval_limit must be >= 1"),  # raised an EvaluationError after the load
        ({"eval_limit": -5}, "eval_limit must be >= 1"),  # dropped the last 5 problems
        ({"eval_every": -1}, "eval_every must be >= 0"),  # evaluated every step
        ({"micro_batch_size": 10**12}, "micro_batch_size must be <="),
        ({"max_prompt_tokens": 10**12}, "max_prompt_tokens must be <="),
        ({"generation_batch_size": 10**12}, "generation_batch_size must be <="),
        ({"lora_alpha": 10**30}, "lora_alpha must be <="),
        ({"eval_max_new_tokens": 0}, "eval_max_new_tokens must be >= 1"),
        ({"prompts_per_step": 1024, "rollouts_per_prompt": 1024}, "rollouts per step"),
        ({"prompts_per_step": 2048, "max_prompt_tokens": 131_072}, "tokens per step"),
        ({"learning_rate": 3.0}, "learning_rate must be in"),
        ({"reward_threshold": 1.0}, "reward_threshold must be in"),
        ({"weight_temperature": 1e9}, "weight_temperature must be in"),
        ({"lora_target_modules": ""}, "lora_target_modules"),
        ({"lora_target_modules": ["q_proj", " "]}, "lora_target_modules"),
        ({"device": "cuda:99999999999999999999"}, "cuda:N \\(N below 100\\)"),
    ],
)
def test_a_size_or_float_out_of_its_range_is_refused_at_config_time(values, named):
    with pytest.raises(ConfigError, match=named):
        Config(**values)


def test_every_int_and_float_setting_has_a_bound():
    for field in dataclasses.fields(Config):
        kinds = {part.strip() for part in str(field.type).split("|")}
        if "int" in kinds:
            assert field.name in SIZE_LIMITS, field.name
        if "float" in kinds:
            assert field.name in FLOAT_RANGES, field.name
    Config()  # the defaults sit inside every bound


def test_a_huge_number_is_not_echoed_in_full():
    with pytest.raises(ConfigError) as error:
        Config(steps=10**400)
    assert len(str(error.value)) < 200


def test_a_rate_written_as_1e_minus_4_is_accepted():
    """PyYAML reads `1e-4` (no dot) as a string; it is how most people write a rate."""
    assert load_config(None, parse_yaml_text("learning_rate: 1e-4", "c")).learning_rate == 1e-4
    assert Config(temperature="7E-1").temperature == 0.7
    with pytest.raises(ConfigError, match="learning_rate"):
        Config(learning_rate="fast")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("steps: !!int abc", "a value YAML cannot read"),
        ("temperature: !!float abc", "a value YAML cannot read"),
        ("seed: !!timestamp 2020-13-45", "a value YAML cannot read"),
        ("steps: " + "9" * 5000, "a value YAML cannot read"),
        ("levels: " + "[" * 30_000 + "]" * 30_000, "nested too deeply"),  # 60 KB, a RecursionError before
    ],
)
def test_yaml_that_cannot_be_read_is_one_error_from_the_cli_and_the_panels_editor(
    text, named, tmp_path, capsys
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert views.form_values(text) == {}  # the panel's editor: no raw error
    with pytest.raises(ConfigError, match=named):
        parse_yaml_text(text, "the config")


@pytest.mark.parametrize(
    "argv",
    [
        ["--eval_benchmarks", "[unclosed"],
        ["--levels", "[1, 2"],
        ["--steps", "9" * 400],
    ],
)
def test_a_bad_flag_is_a_short_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 3 and argv[0] in err  # not 50 lines of usage


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lora_target_modules", ""], "lora_target_modules"),
        (["--device", "cuda:99999999999999999999"], "device"),
        (["--rollouts_per_prompt", "1000000000"], "rollouts_per_prompt"),
    ],
)
def test_a_bad_flag_value_exits_2_with_one_line(argv, named, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.splitlines()) == 1


def test_a_config_path_that_is_a_folder_says_so(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
