"""End to end on a tiny model built in the test: POPO (plain and 4-bit), GRPO, resume, run directory."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft.utils import load_peft_weights

from popo_lite.core.siamese import EMA, POLICY, adapter_pairs
from popo_lite.training.trainer import prepare, run, train


def _base_state(model) -> dict[str, torch.Tensor]:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.get_base_model().state_dict().items()
        if "lora_" not in name
    }


def _adapter_state(model) -> list[torch.Tensor]:
    return [policy.detach().clone() for policy, _ in adapter_pairs(model)]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_popo_trains_adapter_keeps_base_and_moves_ema_by_the_law(tiny_config, qlora):
    config = tiny_config(qlora=qlora, steps=3, save_every=1, tau=0.5)
    session = prepare(config)
    model = session.model
    if qlora:
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    base_before, policy_before = _base_state(model), _adapter_state(model)
    records = list(run(session))

    assert [r["step"] for r in records] == [1, 2, 3]
    assert sum(r["positive_rate"] for r in records) > 0, "the tiny model should hit some one-digit answers"
    for key in (
        "reward_mean",
        "positive_rate",
        "groups_with_positive",
        "nll",
        "sim",
        "entropy",
        "loss",
        "cosine_policy_ema",
        "kl_policy_ema",
        "completion_length",
        "generation_tokens_per_s",
        "train_tokens_per_s",
        "seconds_generate",
        "seconds_update",
        "weight_max",
        "grad_norm",
    ):
        assert any(key in r for r in records), key
    for name, tensor in _base_state(model).items():
        assert torch.equal(tensor, base_before[name]), f"base tensor {name} changed"
    changed = [not torch.equal(a, b) for a, b in zip(_adapter_state(model), policy_before, strict=True)]
    assert any(changed), "the policy adapter did not change"

    # EMA law between consecutive checkpoints: xi_k = tau * xi_{k-1} + (1 - tau) * theta_k
    checkpoints = session.run_dir / "checkpoints"
    for step in (2, 3):
        before = load_peft_weights(str(checkpoints / f"step-{step - 1:06d}" / EMA))
        policy = load_peft_weights(str(checkpoints / f"step-{step:06d}" / POLICY))
        after = load_peft_weights(str(checkpoints / f"step-{step:06d}" / EMA))
        assert before.keys() == after.keys() == policy.keys()
        for key in after:
            torch.testing.assert_close(after[key], 0.5 * before[key] + 0.5 * policy[key], rtol=0, atol=1e-6)

    rollouts = _lines(session.run_dir / "rollouts.jsonl")
    assert len(rollouts) == 3 * 16
    assert set(rollouts[0]) >= {"prompt", "completion", "reward", "weight", "group", "step", "gold"}
    for row in rollouts:
        assert (row["weight"] > 0) == (row["reward"] > 0)  # only positives carry weight
        if row["reward"] > 0:  # positives carry their tokens' log-probs for the inspector's colouring
            assert len(row["tokens"]) == len(row["token_logprobs"]) > 0
            assert all(value <= 0 for value in row["token_logprobs"])
    assert len(_lines(session.run_dir / "metrics.jsonl")) == 3
    assert (session.run_dir / "config.yaml").is_file()


def test_grpo_trains_adapter_end_to_end(tiny_config):
    config = tiny_config(algo="grpo", steps=2)
    session = prepare(config)
    before = _adapter_state(session.model)
    records = list(run(session))
    assert [r["step"] for r in records] == [1, 2]
    assert all("pg" in r and "kl" in r for r in records if "skipped" not in r)
    assert any(not torch.equal(a, b) for a, b in zip(_adapter_state(session.model), before, strict=True))
    final = session.run_dir / "checkpoints" / "step-000002"
    assert (final / POLICY / "adapter_config.json").is_file()
    assert not (final / EMA).exists() and not (final / "predictor.pt").exists()


TIMING_KEYS = ("seconds", "tokens_per_s", "peak_memory", "run_dir", "checkpoint")


def test_resumed_run_continues_like_an_uninterrupted_one(tiny_config):
    # seed 2: steps 2 and 3 of this tiny run have positives, so the resumed step does real work
    full = list(train(tiny_config(steps=3, run_name="full", save_every=1, seed=2)))
    list(train(tiny_config(steps=2, run_name="cut", save_every=1, seed=2)))
    resumed = list(train(tiny_config(steps=3, run_name="cut", save_every=1, seed=2), resume=True))
    assert [r["step"] for r in resumed] == [3]
    assert "loss" in full[2], "the compared step should have trained"
    comparable = {
        k: v for k, v in full[2].items() if isinstance(v, float) and not any(t in k for t in TIMING_KEYS)
    }
    assert {k: resumed[0].get(k) for k in comparable} == pytest.approx(comparable, rel=1e-5, abs=1e-7)
    metrics = _lines(Path(resumed[0]["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]


def test_exported_ema_adapter_loads_as_a_plain_peft_adapter_and_is_the_ema_branch(
    tiny_config, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from popo_lite.core.siamese import ema_forward

    session = prepare(tiny_config(steps=2, tau=0.5, seed=3))  # positives at both steps
    records = list(run(session))
    ema_dir = records[-1]["checkpoint"] + f"/{EMA}"
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ema_dir)
    tokens = torch.tensor([[3, 4, 5, 6]])
    model = session.model.eval()
    with torch.no_grad():
        want = exported.eval()(input_ids=tokens).logits
        with ema_forward(model):
            ema = model(input_ids=tokens).logits
        policy = model(input_ids=tokens).logits
        with model.disable_adapter():
            base = model(input_ids=tokens).logits
    torch.testing.assert_close(want, ema, rtol=1e-5, atol=1e-6)  # the exported file is the EMA branch
    assert not torch.allclose(ema, policy) and not torch.allclose(ema, base)  # halfway, at tau = 0.5


def test_evaluation_during_training_lands_in_records_and_run_directory(tiny_config, digit_problems):
    records = list(
        train(tiny_config(steps=2, eval_every=2, eval_benchmarks=[str(digit_problems)], eval_limit=6))
    )
    key = f"eval_{digit_problems}"
    assert key not in records[0] and 0.0 <= records[1][key] <= 1.0
    run_dir = Path(records[1]["run_dir"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged[1][key] == records[1][key]
    summary = json.loads((run_dir / "eval" / "step-000002.json").read_text())
    assert summary[str(digit_problems)]["problems"] == 6
    assert len((run_dir / "eval" / "step-000002-records.jsonl").read_text().splitlines()) == 6
