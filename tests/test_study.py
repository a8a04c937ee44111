"""bench/study.py at its tiniest: the tiny model on its own digit sums, 2 arms x 1 seed x 2 steps.

One study (popo_lite's POPO and TRL's GRPOTrainer: the two training paths) is run once for the module;
the tests read what it left: every measured field in the JSON, a second invocation that skips every
finished run, the Markdown and the figures, and a missing cell reported as missing.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from popo_lite.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "study.py"
KS = ("pass@1", "pass@2", "pass@4", "pass@8", "pass@16")
STEPS = 2


def load_study():
    if "bench_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_study", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_study"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)  # nothing runs at import
    return sys.modules["bench_study"]


def tiny_options(model_dir: Path, problems: Path, out: Path) -> list[str]:
    """The tiny model (conftest.py) on its digit sums file, which is also the (not held-out) eval set."""
    return [
        "--model", str(model_dir),
        "--task", str(problems),
        "--problem_field", "q",
        "--answer_field", "gold",
        "--prompt_template", "plain",
        "--max_new_tokens", "2",
        "--temperature", "1.0",
        "--steps", str(STEPS),
        "--prompts_per_step", "4",
        "--rollouts_per_prompt", "4",
        "--eval_every", "1",
        "--heldout", "8",
        "--learning_rate", "1e-2",
        "--micro_batch_size", "8",
        "--predictor_dim", "16",
        "--lora_rank", "4",
        "--lora_alpha", "8",
        "--probe_prompts", "4",
        "--eval_batch_size", "64",
        "--results", str(out / "study"),
        "--runs_dir", str(out / "runs"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def studied(tiny_model_dir, digit_problems, tmp_path_factory):
    """--measure_base, then the study of popo and trl-grpo for seed 0."""
    study = load_study()
    out = tmp_path_factory.mktemp("study")
    options = tiny_options(tiny_model_dir, digit_problems, out)
    assert study.main([*options, "--measure_base"]) == 0
    after_base = json.loads((out / "study.json").read_text())
    assert study.main([*options, "--arms", "popo", "trl-grpo", "--seeds", "0"]) == 0
    return SimpleNamespace(
        study=study,
        out=out,
        options=options,
        after_base=after_base,
        results=json.loads((out / "study.json").read_text()),
    )


def _run(results: dict, arm: str, seed) -> dict:
    (found,) = [r for r in results["runs"] if r["arm"] == arm and r["seed"] == seed]
    return found


@pytest.mark.slow  # the module's study: about 40 s on 2 busy CPU cores
def test_measure_base_measures_only_the_base_and_it_is_reused(studied):
    (base,) = studied.after_base["runs"]
    assert base["arm"] == "base" and base["seed"] is None
    assert base["greedy"]["problems"] == 8 and 0 <= base["greedy"]["pass@1"] <= 1
    assert all(0 <= base["passk"][k] <= 1 for k in KS)
    assert base["passk"]["pass@1"] <= base["passk"]["pass@16"] and len(base["passk"]["num_correct"]) == 8
    probe = base["probe"]
    assert len(probe["rows"]) == 4 * 4 and probe["negatives"] >= 1
    assert all(row["prompt_ids"] and row["completion_ids"] for row in probe["rows"])
    assert base["entropy"][0] > 0 and base["negative_logprob"][0] < 0
    assert _run(studied.results, "base", None) == base  # the study did not measure it again


@pytest.mark.slow
def test_every_measured_field_of_both_runs_is_in_the_json(studied):
    results, base = studied.results, _run(studied.results, "base", None)
    assert sorted((r["arm"], r["seed"]) for r in results["runs"] if r["seed"] is not None) == [
        ("popo", 0),
        ("trl-grpo", 0),
    ]
    for arm in ("popo", "trl-grpo"):
        run = _run(results, arm, 0)
        assert run["config"]["steps"] == STEPS and run["signature"]["eval_every"] == 1
        # held-out greedy pass@1 at 0 (= the base: LoRA B starts at zero), every step and the end
        assert run["eval_steps"] == [0, 1, 2] and len(run["heldout_pass1"]) == 3
        assert run["heldout_pass1"][0] == base["greedy"]["pass@1"]
        assert run["greedy"]["pass@1"] == run["heldout_pass1"][-1]
        assert all(0 <= run["passk"][k] <= 1 for k in KS) and run["passk"]["samples"] == 16
        # the probe after every step: entropy, wrong-answer and right-answer log-prob
        assert run["probe_steps"] == [0, 1, 2]
        for key in ("entropy", "negative_logprob", "positive_logprob"):
            assert len(run[key]) == 3 and run[key][0] == base[key][0]
        assert all(value > 0 for value in run["entropy"])
        assert all(value < 0 for value in run["negative_logprob"])
        assert [entry["step"] for entry in run["steps"]] == [1, 2]
        for entry in run["steps"]:
            assert 0 <= entry["reward_mean"] <= 1 and entry["rollouts"] == 16
            assert 0 <= entry["gradient_sequences"] <= 16
            assert entry["seconds_step"] > 0 and entry["seconds_generate"] > 0
            assert entry["seconds_update"] > 0 and entry["seconds_probe"] > 0 and entry["seconds_eval"] > 0
            assert entry["seconds_generate"] + entry["seconds_update"] <= entry["seconds_step"] + 1e-6
        assert run["wall_seconds"] > 0 and run["seconds_passk"] > 0
    popo, trl = _run(results, "popo", 0), _run(results, "trl-grpo", 0)
    for entry in popo["steps"]:  # POPO: exactly the positives carry a weight
        assert entry["gradient_sequences"] == entry["positives"]
        assert entry["reward_mean"] == pytest.approx(entry["positives"] / 16)
    for entry in trl["steps"]:  # GRPO: every row of a mixed group has a nonzero advantage
        assert entry["gradient_sequences"] % 4 == 0 and entry["gradient_sequences"] >= (
            entry["positives"] > 0
        )
        assert "loss" in entry and "kl" in entry
    assert set(popo["ema"]) == {"greedy", "passk"} and all(k in popo["ema"]["passk"] for k in KS)
    assert "ema" not in trl
    for run in (popo, trl):  # a step with gradient moved the adapter off the base, and so the probe
        if any(entry["gradient_sequences"] for entry in run["steps"]):
            assert run["negative_logprob"][-1] != run["negative_logprob"][0]


@pytest.mark.slow
def test_a_second_invocation_skips_finished_runs(studied, capsys):
    capsys.readouterr()
    assert studied.study.main([*studied.options, "--arms", "popo", "trl-grpo", "--seeds", "0"]) == 0
    assert "study (study): 0 cells to do, 3 already in" in capsys.readouterr().out
    again = json.loads((studied.out / "study.json").read_text())
    assert again["runs"] == studied.results["runs"]


@pytest.mark.slow
def test_markdown_figures_and_missing_cells(studied):
    text = (studied.out / "study.md").read_text()
    assert "| popo (POPO, defaults) | 1 |" in text and "| trl-grpo (TRL's GRPOTrainer) | 1 |" in text
    assert "| base (the base model, no training) | - |" in text
    assert "Every (arm, seed) cell is measured." in text
    assert "## The EMA adapter" in text and "\n| popo | " in text.split("## The EMA adapter")[1]
    for name in ("curves", "passk", "entropy"):
        figure = studied.out / f"study-{name}.png"
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({figure.name})" in text

    assert (
        studied.study.main([*studied.options, "--report", "--arms", "popo", "psr", "--seeds", "0", "1"]) == 0
    )
    text = (studied.out / "study.md").read_text()
    assert "| psr | MISSING | MISSING |" in text and "| popo | done | MISSING |" in text
    assert "Missing: popo seed 1, psr seed 0, psr seed 1, trl-grpo seed 1." in text
    assert "| trl-grpo | done | MISSING |" in text  # measured arms stay in the table


def test_the_summary_table_gives_mean_and_std_over_seeds_and_wall_time_per_run():
    load_study()  # puts the repository root on sys.path
    from bench.study_results import summary_table

    def run(arm, seed, greedy, pass1, pass2, **extra):
        return {
            "arm": arm,
            "seed": seed,
            "greedy": {"pass@1": greedy},
            "passk": {"pass@1": pass1, "pass@2": pass2},
            **extra,
        }

    ema = {"passk": {"pass@1": 0.125, "pass@2": 0.25}}
    results = {
        "runs": [
            run("base", None, 0.1, 0.2, 0.3),
            run("popo", 0, 0.5, 0.25, 0.5, ema=ema, wall_seconds=600),
            run("popo", 1, 0.5, 0.75, 1.0, ema=ema, wall_seconds=1260),
            run("psr", 0, 0.25, 0.5, 0.5, ema={"same_as_policy": True}, wall_seconds=300),
        ]
    }
    lines = summary_table(results, ["base", "popo", "psr", "grpo"])
    assert lines[0].startswith("| arm | seeds | greedy pass@1 | pass@1 / pass@2 | EMA pass@1 / pass@2 |")
    # stdev of (0.25, 0.75) and of (0.5, 1.0) is 0.354
    assert lines[2:] == [
        "| base | - | 10.0 | 20.0 / 30.0 | - | - |",
        "| popo | 0, 1 | 50.0 ± 0.0 | 50.0 ± 35.4 / 75.0 ± 35.4 | 12.5 ± 0.0 / 25.0 ± 0.0 | 10-21 min |",
        "| psr | 0 | 25.0 | 50.0 / 50.0 | = policy (tau 0) | 5 min |",
    ]


@pytest.mark.slow
def test_changed_settings_refuse_to_mix_with_the_stored_runs(studied, capsys):
    assert studied.study.main([*studied.options, "--samples", "8"]) == 2
    assert "measured with other settings" in capsys.readouterr().err


def test_arms_share_the_study_config_and_change_only_the_objective(tiny_model_dir, digit_problems, tmp_path):
    study = load_study()
    args = study.parser().parse_args(tiny_options(tiny_model_dir, digit_problems, tmp_path))
    built = study.build_study(args)
    configs = {arm: built.config(arm, 3).to_dict() for arm in study.ARMS}
    objective = {"algo", "weight_mode", "alpha", "tau", "beta_entropy", "nll_normalization", "run_name"}
    reference = {k: v for k, v in configs["popo"].items() if k not in objective}
    for arm, config in configs.items():
        assert {k: v for k, v in config.items() if k not in objective} == reference, arm
        assert config["seed"] == 3 and config["eval_every"] == 0 and config["steps"] == STEPS
    psr = configs["psr"]
    assert (psr["algo"], psr["weight_mode"], psr["alpha"], psr["tau"], psr["beta_entropy"]) == (
        "popo",
        "uniform",
        0.0,
        0.0,
        0.0,
    )
    assert configs["grpo"]["algo"] == configs["trl-grpo"]["algo"] == "grpo"
    assert study.expand_arms(["main", "popo", "trl-grpo"]) == ["base", "grpo", "popo", "psr", "trl-grpo"]
    with pytest.raises(study.StudyError, match="unknown arm"):
        study.expand_arms(["dpo"])


def test_the_recipes_load(tmp_path):
    root = SCRIPT.parents[1]
    recipe = yaml.safe_load((root / "configs" / "ablations" / "positive-only.yaml").read_text())
    assert recipe == {"algo": "popo", "weight_mode": "uniform", "alpha": 0.0, "tau": 0.0, "beta_entropy": 0.0}
    gpu = load_config(root / "configs" / "study-qwen2.5-math-1.5b.yaml")
    assert gpu.model == "Qwen/Qwen2.5-Math-1.5B" and gpu.qlora and gpu.dataset == "gsm8k"
    assert gpu.eval_benchmarks == ["gsm8k_test"]
    study = load_study()
    args = study.parser().parse_args(["--config", str(root / "configs" / "study-qwen2.5-math-1.5b.yaml")])
    built = study.build_study(args)
    assert len(built.heldout) == gpu.eval_limit and built.eval_every == gpu.eval_every
    assert built.values["max_new_tokens"] == gpu.max_new_tokens  # the file's sizes, not the CPU defaults


def test_the_trl_arm_starts_from_the_trainer_arms_lora(tiny_config):
    import torch

    from popo_lite.engine.choose import load_policy
    from popo_lite.training.session import seed_everything

    study = load_study()
    config = tiny_config(seed=3)
    seed_everything(config.seed)  # what session.prepare does before it loads the policy
    ours, _, _ = load_policy(config)
    theirs, _, _ = study.trl_policy(config)
    a_ours = {n.replace(".policy", ""): p for n, p in ours.named_parameters() if "lora_A.policy" in n}
    a_theirs = {n.replace(".default", ""): p for n, p in theirs.named_parameters() if "lora_A.default" in n}
    assert a_ours.keys() == a_theirs.keys() and a_ours
    assert all(torch.equal(a_ours[name], a_theirs[name]) for name in a_ours)
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if "lora_" in n)


def test_trl_arguments_checkpoint_as_the_policy_was_set_up(tiny_config, tmp_path, capsys):
    """TRL's GRPOConfig takes gradient checkpointing from the model trl_policy built, on and off; `auto`
    is resolved once, so the planner's line prints once."""
    import torch

    study = load_study()
    for setting in (True, False, "auto"):
        config = tiny_config(seed=3, gradient_checkpointing=setting)
        capsys.readouterr()
        model, _, _ = study.trl_policy(config)
        arguments = study.trl_arguments(config, tmp_path / str(setting), 3, model, torch.device("cpu"))
        printed = capsys.readouterr().out
        if setting == "auto":
            assert printed.count("gradient_checkpointing auto:") == 1
            assert arguments.gradient_checkpointing is ("auto: on" in printed)
        else:
            assert arguments.gradient_checkpointing is setting


def test_two_study_processes_share_one_results_file(tmp_path):
    """Each process holds only what it read at start; adding a run keeps the other process's runs."""
    study = load_study()
    path, order = tmp_path / "study.json", ["popo", "grpo"]
    first, second = study.load_results(path), study.load_results(path)  # both start from nothing
    study.add_run(path, first, {"arm": "grpo", "seed": 0, "value": 1}, order)
    study.add_run(path, second, {"arm": "popo", "seed": 1, "value": 2}, order)
    study.add_run(path, first, {"arm": "grpo", "seed": 0, "value": 3}, order)  # a rerun replaces its cell
    stored = {(r["arm"], r["seed"]): r["value"] for r in json.loads(path.read_text())["runs"]}
    assert stored == {("grpo", 0): 3, ("popo", 1): 2}
    assert [r["arm"] for r in first["runs"]] == ["popo", "grpo"]  # in the given arm order
