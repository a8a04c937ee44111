"""bench/step_cost.py: the FLOP counts by hand on a one-layer shape and the report rendered from a small
hand-made results dict (no model), and one step of each path on the tiny model (slow)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from step_cost_report import markdown, summarise  # noqa: E402
from step_flops import Batch, expected_rows_with_positive, pass_flops, per_token, step_flops  # noqa: E402

from popo_lite.planning.estimate import ModelShape  # noqa: E402

# q (4, 4), k and v (4, 2), o (4, 4), gate and up (4, 8), down (8, 4): 144 multiply-adds per token
SHAPE = ModelShape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, vocab=10, tied=True, head_dim=2)
TARGETS = ("q_proj", "v_proj")  # rank 1: (4 + 4) + (4 + 2) = 14 multiply-adds per token
# one group of two rows: a 3-token prompt, completions of 2 and 1 tokens, the first one positive
BATCH = Batch(prompt_tokens=(3,), completion_tokens=(2, 1), positive=(True, False))
POPO = {"algo": "popo", "alpha": 0.1, "beta_entropy": 0.01, "entropy_over": "all", "grpo_beta": 0.0}


def test_per_token_costs_are_two_flops_per_multiply_add_of_each_matmul():
    cost = per_token(SHAPE, 1, TARGETS)
    assert (cost.base, cost.lora, cost.head) == (288, 28, 80)  # 2 x 144, 2 x 14, 2 x 4 x 10
    assert cost.attention == 16  # q.k and the weighted sum, 2 heads of width 2: 2 x 2 x 2 x 2


def test_generation_prefills_a_group_prompt_once_and_feeds_all_but_the_last_token():
    cost = per_token(SHAPE, 1, TARGETS)
    # shared: prompt + 1 fed token of row 0 (4 tokens, 10 causal pairs), nothing fed for row 1; 3 logits
    assert (
        pass_flops(cost, BATCH, [0, 1], shared=True, lora=False, generation=True) == 4 * 288 + 10 * 16 + 240
    )
    # one prompt per rollout: row 1 prefills its own 3 tokens (6 more pairs)
    assert (
        pass_flops(cost, BATCH, [0, 1], shared=False, lora=False, generation=True) == 7 * 288 + 16 * 16 + 240
    )


def test_a_pass_with_gradient_costs_twice_the_base_and_thrice_lora_and_attention():
    cost = per_token(SHAPE, 1, TARGETS)
    # rows 0 and 1 sharing the prompt: 6 tokens, 15 + 4 causal pairs, 3 logits
    forward = 6 * (288 + 28) + 19 * 16 + 3 * 80
    assert pass_flops(cost, BATCH, [0, 1], shared=True) == forward == 2440
    assert pass_flops(cost, BATCH, [0, 1], shared=True, grad=True) == 6 * 660 + 3 * 19 * 16 + 2 * 3 * 80


def test_popo_phases_count_positives_for_weights_and_ema_and_every_row_for_the_entropy_loss():
    flops = step_flops(SHAPE, 1, TARGETS, BATCH, POPO | {"micro_batch_size": 2, "kl": True})
    assert flops == {
        "generate": 1552,
        "weights": 5 * 316 + 15 * 16 + 2 * 80,  # row 0 only: prompt + 2 tokens
        "loss": 5352,  # both rows: the micro-batch holds the positive
        "similarity": 5 * 316 + 15 * 16,  # the EMA's features: no LM head
        "kl": 2 * 2440,  # policy and EMA: two adapters, the prompt once per adapter
    }
    positives_only = step_flops(
        SHAPE, 1, TARGETS, BATCH, POPO | {"micro_batch_size": 2, "entropy_over": "positives"}
    )
    assert positives_only["loss"] == pass_flops(
        per_token(SHAPE, 1, TARGETS), BATCH, [0], shared=True, grad=True
    )
    assert "kl" not in positives_only


def test_grpo_loss_counts_every_row_with_gradient_and_the_reference_forward_without_lora():
    settings = POPO | {"algo": "grpo", "grpo_beta": 0.01, "micro_batch_size": 2}
    flops = step_flops(SHAPE, 1, TARGETS, BATCH, settings)
    assert flops == {"generate": 1552, "loss": 5352, "reference": 6 * 288 + 19 * 16 + 3 * 80}


def test_expected_rows_with_positive_is_the_hypergeometric_expectation():
    one = Batch((1, 1), (1,) * 8, (True,) + (False,) * 7)
    assert expected_rows_with_positive(one, 4) == pytest.approx(4.0)  # each half misses it with p = 1/2
    none = Batch((1, 1), (1,) * 8, (False,) * 8)
    assert expected_rows_with_positive(none, 4) == 0.0


def _run(path: str, seconds: dict) -> dict:
    step = {
        "seconds": seconds,
        "flops": {"generate": 2e9, "loss": 4e9},
        "flops_one_prompt_per_rollout": {"generate": 3e9, "loss": 6e9},
        "prompt_tokens": [50, 50],
        "completion_tokens": [20, 30],
        "positives": 3,
    }
    return {
        "config": "study",
        "algo": "grpo",
        "path": path,
        "steps": [step, step],
        "optimizer_floor_seconds": 1.0,
    }


RESULTS = {
    "date": "2026-12-02T12:00:00",
    "command": "python bench/step_cost.py",
    "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 1},
    "versions": {"torch": "2"},
    "paths": {"today": {"shared_prompts": False}, "new": {"shared_prompts": True}},
    "warmup": 0,
    "gemm": {"before": {"square 2048": 1.0}, "after": {"square 2048": 0.5}, "gflops": 1.0},
    "runs": [
        _run("today", {"generate": 4.0, "update": 10.0, "step": 15.0}),
        _run("new", {"generate": 2.0, "update": 5.0, "step": 7.5}),
    ],
    "trl": [
        {"config": "study", "gradient_checkpointing": True, "seconds_step": [30.0, 30.0], "positives": [1, 2]}
    ],
    "notes": ["new: a note"],
}


def test_summary_divides_seconds_by_floors_and_pairs_paths_and_trl():
    summary = summarise(RESULTS)
    today = summary["runs"][0]["phases"]
    assert today["generate"] == pytest.approx(
        {
            "seconds": 4.0,
            "gflop": 2.0,
            "gflop_one_prompt_per_rollout": 3.0,
            "floor_seconds": 2.0,
            "ratio": 2.0,
        }
    )
    assert (
        today["update"]["floor_seconds"] == 5.0 and today["update"]["ratio"] == 2.0
    )  # 4 GFLOP + AdamW's 1 s
    assert today["step"]["floor_seconds"] == 7.0 and today["step"]["ratio"] == pytest.approx(15 / 7)
    assert today["loss"]["seconds"] is None and today["loss"]["gflop"] == 4.0  # not timed apart
    assert today["optimizer"] == {
        "seconds": None,
        "gflop": None,
        "gflop_one_prompt_per_rollout": None,
        "floor_seconds": 1.0,
        "ratio": None,
    }
    assert "similarity" not in today and "kl" not in today  # GRPO has neither
    assert summary["speedups"] == [
        {"config": "study", "algo": "grpo", "path": "new", "over": "today"}
        | {"speedup": {"generate": 2.0, "update": 2.0, "step": 2.0}}
    ]
    assert summary["trl"][0]["trl_over_ours"] == {"today": 2.0, "new": 4.0}


def test_report_renders_a_table_per_run_with_dashes_for_untimed_phases():
    text = markdown(RESULTS | {"summary": summarise(RESULTS)})
    assert "## study / grpo / today" in text and "## study / grpo / new" in text
    assert "| generate | 4.0 | 2.0 | 3.0 | 2.00 | 2.00x |" in text
    assert "| loss | - | 4.0 | 6.0 | 4.00 | - |" in text
    assert "| study | grpo | new over today | 2.00x | - |" in text
    assert "| study | 30.0 | today 15.0, new 7.5 | today 2.00x, new 4.00x |" in text
    assert "- note: new: a note" in text


@pytest.mark.slow  # loads the tiny model four times and steps each: about 30 s on 2 shared cores
def test_bench_pairs_both_paths_on_a_tiny_model_and_writes_both_files(
    tiny_model_dir, digit_problems, tmp_path
):
    import step_cost

    tiny = [f"model={tiny_model_dir}", f"dataset={digit_problems}", "problem_field=q", "answer_field=gold"]
    tiny += ["prompt_template=plain", "prompts_per_step=2", "rollouts_per_prompt=2", "max_new_tokens=2"]
    tiny += ["micro_batch_size=4", "predictor_dim=16", "lora_rank=4", "lora_alpha=8"]
    options = ["--configs", "default", "--steps", "1", "--warmup", "0", "--trl_steps", "0", "--repeats", "1"]
    options += ["--paths", "today", "new"]
    results = step_cost.main([*options, "--set", *tiny, "--out", str(tmp_path)])

    assert [(run["algo"], run["path"]) for run in results["runs"]] == [
        ("popo", "today"),
        ("popo", "new"),
        ("grpo", "today"),
        ("grpo", "new"),
    ]
    for run in results["runs"]:
        (entry,) = run["steps"]
        assert entry["seconds"]["step"] > 0 and entry["flops"]["generate"] > 0
        assert len(entry["completion_tokens"]) == 4 and entry["prompt_tokens"][0] > 0
    assert results["gemm"]["gflops"] > 0 and not results["notes"]
    assert (tmp_path / "step_cost-cpu.json").is_file()
    assert "## default / grpo / new" in (tmp_path / "step_cost-cpu.md").read_text()
