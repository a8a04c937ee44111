"""Evaluation: pass@k and avg@n by hand, records consistent with the reward, the CLI and its errors.

The end-to-end tests run the tiny Llama of conftest on the digit-sum jsonl; its answers are mostly
wrong, which is fine: what is checked is that every number is computed from the records it reports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from popo_lite.config import Config
from popo_lite.core.rewards import score
from popo_lite.data.problems import load_problems
from popo_lite.evaluate import (
    EvalSettings,
    EvaluationError,
    evaluate_model,
    evaluate_problems,
    iter_evaluate,
    load_benchmarks,
    load_model,
    main,
)
from popo_lite.evaluation.passk import avg_at_n, markdown_table, mean_pass_at_k, pass_at_k, summarise

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"problem_field": "q", "answer_field": "gold"}
FIELD_OPTIONS = ["--problem_field", "q", "--answer_field", "gold"]


# ---- the math, by hand ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # = c / n
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
        (5, 0, 3, 0.0),  # nothing correct
        (5, 4, 2, 1.0),  # n - c = 1 < k: every pair holds a correct sample
        (4, 4, 1, 1.0),
        (10, 1, 5, 0.5),  # 1 - C(9, 5) / C(10, 5) = 1 - 126/252
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_product_form_equals_exact_binomial_ratio_up_to_n_128():
    for n in (*range(1, 13), 128):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12), (n, c, k)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_n_is_mean_correctness_over_all_samples_and_equals_pass_at_1():
    counts = [2, 0, 4]  # 6 correct of 3 x 4 samples
    assert avg_at_n(counts, 4) == 0.5
    assert mean_pass_at_k(counts, 4, 1) == pytest.approx(0.5)
    assert mean_pass_at_k(counts, 4, 2) == pytest.approx((pass_at_k(4, 2, 2) + 0 + 1) / 3)


def test_summary_reports_pass_at_k_only_for_k_up_to_n_and_table_shows_greedy_counts():
    records = [{"num_correct": c, "tokens": [5] * 4, "cut": [cut] * 4} for c, cut in ((1, False), (3, True))]
    summary = summarise(records, "avg@4", 4, (1, 2, 4, 8))
    assert [key for key in summary if key.startswith("pass@")] == ["pass@1", "pass@2", "pass@4"]
    assert summary["score"] == 0.5 and summary["cut_rate"] == 0.5
    greedy = summarise([{"num_correct": 1, "tokens": [3], "cut": [False]}] * 2, "pass@1", 1, (1, 4))
    table = markdown_table({"a": greedy, "b": greedy})
    assert "pass@1 (greedy)" in table and "100.0 (2/2)" in table and "| average | 4 | 100.0 |" in table


@pytest.mark.parametrize(
    ("values", "named"),
    [({"n": 4}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"prompt_template": "x"}, "prompt_template")],
)
def test_eval_settings_reject_bad_values_naming_them(values, named):
    with pytest.raises(EvaluationError, match=named):
        EvalSettings(**values)


# ---- evaluation on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(Config(model=str(tiny_model_dir), device="cpu"))


@pytest.fixture(scope="module")
def sums(digit_problems):
    return load_problems(str(digit_problems), **FIELDS)


def _check_records_against_reward(result: dict, problems, n: int) -> None:
    assert [record["id"] for record in result["records"]] == [problem.id for problem in problems]
    for record, problem in zip(result["records"], problems, strict=True):
        assert problem.problem in record["prompt"] and record["gold"] == problem.answer
        assert len(record["completions"]) == len(record["correct"]) == len(record["extracted"]) == n
        for i, text in enumerate(record["completions"]):
            reward, extracted = score(text, problem.answer)
            assert (record["extracted"][i], record["correct"][i]) == (extracted, reward > 0)
        assert record["num_correct"] == sum(record["correct"])
    flags = [flag for record in result["records"] for flag in record["correct"]]
    assert result["score"] == pytest.approx(sum(flags) / len(flags))


def test_greedy_records_hold_extracted_answers_and_flags_consistent_with_reward(tiny, digit_problems, sums):
    model, tokenizer, _ = tiny
    settings = EvalSettings(max_new_tokens=3, prompt_template="plain", batch_size=8)
    results = evaluate_model(model, tokenizer, [str(digit_problems)], settings, **FIELDS)
    result = results[str(digit_problems)]
    assert result["metric"] == "pass@1" and result["problems"] == len(sums)
    assert result["pass@1"] == result["score"]
    _check_records_against_reward(result, sums, n=1)
    assert any(extracted is not None for record in result["records"] for extracted in record["extracted"])


def test_greedy_completions_do_not_depend_on_batch_size(tiny, sums):
    model, tokenizer, _ = tiny
    texts = []
    for batch_size in (1, 7):
        settings = EvalSettings(max_new_tokens=3, prompt_template="plain", batch_size=batch_size)
        result = evaluate_problems(model, tokenizer, sums[:9], settings)
        texts.append([record["completions"] for record in result["records"]])
    assert texts[0] == texts[1]


def test_batches_spanning_two_benchmarks_keep_each_benchmarks_records_and_order(tiny, sums):
    model, tokenizer, _ = tiny
    settings = EvalSettings(max_new_tokens=2, prompt_template="plain", batch_size=4)  # 3 + 5 problems
    benchmarks = {"sums": sums[:3], "arithmetic": load_problems("arithmetic", split="test", limit=5)}
    results = dict(iter_evaluate(model, tokenizer, benchmarks, settings))
    assert list(results) == ["sums", "arithmetic"]
    for name, problems in benchmarks.items():
        assert results[name]["problems"] == len(problems)
        _check_records_against_reward(results[name], problems, n=1)
        assert {record["benchmark"] for record in results[name]["records"]} == {name}


def test_sampled_evaluation_reports_avg_and_pass_at_k_is_seeded_and_keeps_callers_rng(tiny, sums):
    model, tokenizer, _ = tiny
    settings = EvalSettings(n=4, temperature=1.0, max_new_tokens=3, prompt_template="plain", batch_size=8)
    rng_before = torch.get_rng_state()
    first = evaluate_problems(model, tokenizer, sums, settings)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = evaluate_problems(model, tokenizer, sums, settings)
    assert [r["completions"] for r in first["records"]] == [r["completions"] for r in second["records"]]
    assert first["metric"] == "avg@4" and "pass@8" not in first
    _check_records_against_reward(first, sums, n=4)
    counts = [record["num_correct"] for record in first["records"]]
    assert first["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in counts) / len(counts))


def test_unknown_benchmark_is_rejected_before_any_model_loads():
    with pytest.raises(EvaluationError, match="aime2O"):
        load_benchmarks(["aime24", "aime2O"])


# ---- adapters and the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_in_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A non-zero LoRA adapter saved where the trainer puts one, next to its run's config.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run")
    Config(model=str(tiny_model_dir), prompt_template="plain").save(run / "config.yaml")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make the adapter a no-op
            param.data.normal_(0, 0.5)
    folder = run / "checkpoints" / "step-000001" / "policy"
    model.save_pretrained(folder)
    return folder


def test_load_model_applies_a_saved_adapter(tiny_model_dir, adapter_in_run):
    config = Config(model=str(tiny_model_dir), device="cpu")
    ids = torch.tensor([[3, 4, 5, 6]])  # (1, 4) digits
    base, _, _ = load_model(config)
    adapted, _, _ = load_model(config, adapter_in_run)
    assert type(adapted).__name__ == "PeftModel"
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, adapted(ids).logits)


def test_cli_subprocess_writes_results_json_markdown_and_records(tiny_model_dir, digit_problems, tmp_path):
    output = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "popo_lite.evaluate", "--model", str(tiny_model_dir)]
    command += ["--benchmarks", str(digit_problems), *FIELD_OPTIONS]
    command += [
        "--prompt_template",
        "plain",
        "--max_new_tokens",
        "2",
        "--limit",
        "6",
        "--output",
        str(output),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((output / "results.json").read_text())
    assert summary["benchmarks"][str(digit_problems)]["problems"] == 6
    assert summary["settings"]["max_new_tokens"] == 2 and summary["settings"]["adapter"] is None
    assert len((output / "records.jsonl").read_text().splitlines()) == 6
    assert "pass@1 (greedy)" in (output / "results.md").read_text()
    assert "| benchmark |" in result.stdout


def test_cli_adapter_of_a_run_is_evaluated_on_that_runs_model_and_prompt(
    adapter_in_run, tiny_model_dir, digit_problems, tmp_path
):
    output = tmp_path / "eval"
    arguments = ["--adapter", str(adapter_in_run), "--benchmarks", str(digit_problems), *FIELD_OPTIONS]
    assert main([*arguments, "--max_new_tokens", "2", "--limit", "3", "--output", str(output)]) == 0
    settings = json.loads((output / "results.json").read_text())["settings"]
    assert settings["adapter"] == str(adapter_in_run)
    assert (settings["model"], settings["prompt_template"]) == (str(tiny_model_dir), "plain")
    assert len((output / "records.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--benchmarks", "aime24,aime2O"], "aime2O"),
        (["--adapter", "no/such/adapter"], "no/such/adapter"),
        (["--adapter", "{checkpoint}"], "policy"),  # a checkpoint folder: the message names its adapters
        (["--n", "4"], "temperature"),
        (["--n", "4", "--temperature", "1", "--k", "8"], "--k 8"),
        (["--limit", "0"], "--limit"),
    ],
)
def test_cli_errors_exit_nonzero_with_one_message_naming_the_problem(
    arguments, named, adapter_in_run, tmp_path, capsys
):
    arguments = [arg.replace("{checkpoint}", str(adapter_in_run.parent)) for arg in arguments]
    assert main([*arguments, "--output", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error


def test_cli_baseline_puts_the_base_and_the_adapter_side_by_side_on_the_same_problems(
    adapter_in_run, digit_problems, tmp_path, capsys
):
    output = tmp_path / "eval"
    arguments = ["--adapter", str(adapter_in_run), "--baseline", "--benchmarks", str(digit_problems)]
    arguments += [*FIELD_OPTIONS, "--max_new_tokens", "2", "--limit", "4", "--output", str(output)]
    assert main(arguments) == 0
    benchmarks = json.loads((output / "results.json").read_text())["benchmarks"]
    name = str(digit_problems)
    assert list(benchmarks) == [f"{name} (base)", f"{name} (adapter)"]
    records = [json.loads(line) for line in (output / "records.jsonl").read_text().splitlines()]
    assert [r["evaluated"] for r in records] == ["base"] * 4 + ["adapter"] * 4
    assert [r["id"] for r in records[:4]] == [r["id"] for r in records[4:]]
    assert [r["completions"] for r in records[:4]] != [r["completions"] for r in records[4:]]  # live adapter
    out = capsys.readouterr().out
    assert f"| {name} (base) |" in out and "completions capped at 2 new tokens" in out


def test_cli_without_a_gpu_says_and_applies_its_cpu_budget(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import popo_lite.evaluate as evaluate

    monkeypatch.setattr(
        evaluate, "load_model", lambda config, adapter=None: (_ for _ in ()).throw(SystemExit(9))
    )
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_model_dir), "--benchmarks", "gsm8k_test,digit_sums", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "no GPU: a CPU-sized budget" in err and "first 20 problems" in err and "256 tokens" in err
    assert (
        evaluate.cpu_budget(
            evaluate.build_parser().parse_args(["--limit", "3", "--max_new_tokens", "9"]),
            ["gsm8k_test"],
            "cpu",
        )
        is None
    )  # explicit values are kept and nothing is said


def test_baseline_of_a_runs_adapter_repeats_the_runs_own_heldout_check(
    tiny_config, digit_problems, tmp_path, capsys
):
    """`evaluate --adapter <a run's> --baseline`, no other setting: the base generates what the run's
    check before step 1 generated, and the adapter what its check after the last step did. One base
    number, not two."""
    from popo_lite.training.trainer import train

    config = tiny_config(eval_every=2, eval_benchmarks=[str(digit_problems)], max_new_tokens=3)
    list(train(config))
    run = Path(config.output_dir) / config.run_name
    output = tmp_path / "eval"
    arguments = ["--adapter", str(run / "checkpoints" / "step-000002" / "policy"), "--baseline"]
    arguments += ["--benchmarks", str(digit_problems), *FIELD_OPTIONS, "--output", str(output)]
    assert main(arguments) == 0
    said = "as the run's held-out check: limit 40, max_new_tokens 3, batch_size 16, max_prompt_tokens 512"
    assert said in capsys.readouterr().err

    def completions(path: Path, evaluated: str | None = None) -> list:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [(r["id"], r["completions"]) for r in rows if evaluated in (None, r.get("evaluated"))]

    before = completions(run / "eval" / "step-000000-records.jsonl")
    after = completions(run / "eval" / "step-000002-records.jsonl")
    assert completions(output / "records.jsonl", "base") == before
    assert completions(output / "records.jsonl", "adapter") == after
    assert before != after and len(before) == 25  # the adapter trained: two different checks compared
