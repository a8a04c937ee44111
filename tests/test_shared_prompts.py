"""Shared prompts (Config.shared_prompts) compute what one prompt forward per rollout computes.

A group's G rollouts share one prompt. The update runs each prompt through the decoder once per step and
lets the completions attend to its keys and values; generation prefills each prompt once and copies its
cache to the group. Each test runs both paths on the same rollouts and compares: the same losses and
adapter gradients to 1e-5, the same greedy tokens, the same sampled tokens under one seed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import siamese_policy

from popo_lite.core import step_forwards
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.updates import grpo_update, kl_policy_ema, popo_update
from popo_lite.engine.rollouts import generate_rollouts

PROMPTS = ["1+1=", "22+3=", "4=", "13+21+8="]  # different lengths: left padding inside the step
G = 4
# 4 prompts x 4 rollouts: a mixed group, an all-wrong one, an all-right one, a single positive
REWARDS = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
)
PATHS = {  # today's path (one prompt forward per rollout, checkpointed) and the shared one
    "per-rollout": {"shared_prompts": False, "gradient_checkpointing": True},
    "shared": {"shared_prompts": True, "gradient_checkpointing": False},
}


def _policy(tiny_config, qlora: bool, **overrides):
    """A live policy (LoRA B non-zero) with an EMA adapter that differs from it, and a predictor."""
    config = tiny_config(qlora=qlora, micro_batch_size=5, noise_std=0.0, **overrides)
    return config, *siamese_policy(config)


def _rollouts(model, tokenizer) -> Rollouts:
    torch.manual_seed(3)
    return generate_rollouts(
        model, tokenizer, PROMPTS, G, max_new_tokens=4, temperature=1.0, shared_prompts=False
    )


def _checkpointing(model, on: bool) -> None:
    base = model.get_base_model()
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()


def _gradients(model, predictor, run) -> tuple[object, dict[str, torch.Tensor]]:
    params = [*model.named_parameters(), *(predictor.named_parameters() if predictor else [])]
    for _, param in params:
        param.grad = None
    result = run()
    return result, {n: p.grad.clone() for n, p in params if p.grad is not None}


def _both_paths(tiny_config, qlora: bool, update, **overrides):
    """(result, gradients) of `update(config, model, predictor, rollouts)` on each path, same rollouts."""
    config, model, tokenizer, predictor = _policy(tiny_config, qlora, **overrides)
    rollouts = _rollouts(model, tokenizer)
    outcomes = {}
    for name, fields in PATHS.items():
        path_config = type(config)(**{**config.to_dict(), **fields})
        _checkpointing(model, fields["gradient_checkpointing"])
        outcomes[name] = _gradients(
            model, predictor, lambda c=path_config: update(c, model, predictor, rollouts)
        )
    return outcomes


def _assert_same_gradients(outcomes) -> None:
    want, got = outcomes["per-rollout"][1], outcomes["shared"][1]
    assert want.keys() == got.keys() and len(want) > 0
    prompt_side = [n for n in want if "layers.0." in n and "lora_A.policy" in n]
    assert prompt_side and all(want[n].abs().sum() > 0 for n in prompt_side)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
def test_popo_update_with_shared_prompts_gives_the_same_loss_weights_and_gradients(tiny_config, qlora):
    def update(config, model, predictor, rollouts):
        return popo_update(model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0))

    outcomes = _both_paths(tiny_config, qlora, update, alpha=0.5, beta_entropy=0.1, entropy_over="all")
    want, got = outcomes["per-rollout"][0], outcomes["shared"][0]
    torch.testing.assert_close(got.row_weights, want.row_weights, rtol=1e-5, atol=1e-6)
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert got.token_logprobs.keys() == want.token_logprobs.keys()
    for row, values in want.token_logprobs.items():
        assert got.token_logprobs[row] == pytest.approx(values, abs=1e-5)
    _assert_same_gradients(outcomes)


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
def test_grpo_update_with_shared_prompts_gives_the_same_loss_and_gradients(tiny_config, qlora):
    def update(config, model, predictor, rollouts):
        generator = torch.Generator().manual_seed(0)
        return grpo_update(model, rollouts, REWARDS, config, generator=generator)

    outcomes = _both_paths(tiny_config, qlora, update, algo="grpo", grpo_beta=0.5)
    want, got = outcomes["per-rollout"][0], outcomes["shared"][0]
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert want.metrics["kl"] > 0  # the reference forward took part
    _assert_same_gradients(outcomes)


def test_kl_monitor_with_shared_prompts_gives_the_same_value(tiny_config):
    _, model, tokenizer, _ = _policy(tiny_config, qlora=False)
    rollouts = _rollouts(model, tokenizer)
    want = kl_policy_ema(model, rollouts, 5, 1.0, shared_prompts=False)
    got = kl_policy_ema(model, rollouts, 5, 1.0, shared_prompts=True)
    assert want > 0 and got == pytest.approx(want, rel=1e-5)


def test_the_shared_update_runs_each_prompt_once_per_pass(tiny_config, monkeypatch):
    """POPO with shared prompts: one prompt forward each for the weights, the loss and the EMA pass,
    however many micro-batches there are: the no-grad passes over the 3 groups with a positive, the loss
    over the groups of its micro-batches that hold a positive (all 4 here)."""
    config, model, tokenizer, predictor = _policy(tiny_config, qlora=False, gradient_checkpointing=False)
    rollouts = _rollouts(model, tokenizer)
    _checkpointing(model, False)
    calls: list[tuple[int, bool]] = []
    original = step_forwards.prompt_prefix

    def counting(model, prompt_ids, prompt_mask):
        calls.append((prompt_ids.shape[0], torch.is_grad_enabled()))
        return original(model, prompt_ids, prompt_mask)

    monkeypatch.setattr(step_forwards, "prompt_prefix", counting)
    popo_update(model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0))
    assert sorted(calls) == [(3, False), (3, False), (4, True)]


def test_under_gradient_checkpointing_the_loss_forward_keeps_one_prompt_per_rollout(tiny_config, monkeypatch):
    """transformers builds no cache in a checkpointed training forward: the loss falls back to the
    per-rollout path (same numbers), while the no-grad passes still share their prompts."""
    config, model, tokenizer, predictor = _policy(tiny_config, qlora=False, gradient_checkpointing=True)
    rollouts = _rollouts(model, tokenizer)
    _checkpointing(model, True)
    results = []
    original = step_forwards.prompt_prefix

    def recording(*args):
        results.append((torch.is_grad_enabled(), original(*args)))
        return results[-1][1]

    monkeypatch.setattr(step_forwards, "prompt_prefix", recording)
    popo_update(model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0))
    assert [prefix is None for grad, prefix in results if grad] == [True]
    assert [prefix is None for grad, prefix in results if not grad] == [False, False]


def test_generation_with_shared_prompts_gives_the_same_greedy_and_sampled_tokens(tiny_config):
    _, model, tokenizer, _ = _policy(tiny_config, qlora=False)
    for temperature in (0.0, 1.0):
        outputs = {}
        for shared in (False, True):
            torch.manual_seed(7)
            outputs[shared] = generate_rollouts(
                model, tokenizer, PROMPTS, G, max_new_tokens=6, temperature=temperature, shared_prompts=shared
            )
        torch.testing.assert_close(outputs[True].prompt_ids, outputs[False].prompt_ids)
        torch.testing.assert_close(
            outputs[True].completion_ids, outputs[False].completion_ids, rtol=0, atol=0
        )
        assert outputs[True].texts == outputs[False].texts
    assert len(set(outputs[True].texts)) > 1  # sampling, not one answer copied


def test_shared_prefill_in_batches_that_split_groups_gives_the_same_tokens(tiny_config):
    _, model, tokenizer, _ = _policy(tiny_config, qlora=False)
    prefills: list[int] = []  # rows of each prefill forward (more than one position)
    hook = (
        model.get_base_model()
        .get_decoder()
        .register_forward_pre_hook(
            lambda _, args, kwargs: (
                prefills.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] > 1 else None
            ),
            with_kwargs=True,
        )
    )

    def rollouts(batch_size, shared: bool):
        prefills.clear()
        torch.manual_seed(5)
        options = {"max_new_tokens": 5, "temperature": 1.0, "batch_size": batch_size}
        return generate_rollouts(model, tokenizer, PROMPTS, G, shared_prompts=shared, **options)

    want = rollouts(None, shared=False)
    assert prefills == [len(PROMPTS) * G]
    got = rollouts(None, shared=True)
    assert prefills == [len(PROMPTS)]  # one prefill row per prompt
    assert torch.equal(got.completion_ids, want.completion_ids)
    for size in (3, 6):  # batches that cut groups apart: each prefills its own distinct prompts
        batched_want, batched_got = rollouts(size, shared=False), rollouts(size, shared=True)
        assert torch.equal(batched_got.completion_ids, batched_want.completion_ids), size
    hook.remove()


def test_shared_prefill_in_chunks_gives_the_same_tokens(tiny_config):
    _, model, tokenizer, _ = _policy(tiny_config, qlora=False)

    def rollouts(shared: bool, chunk):
        torch.manual_seed(9)
        options = {"max_new_tokens": 5, "temperature": 1.0, "prefill_chunk_size": chunk}
        return generate_rollouts(model, tokenizer, PROMPTS, G, shared_prompts=shared, **options)

    want = rollouts(False, None)
    for chunk in (1, 2, 3):  # chunks ending inside the shorter prompts' padding
        assert torch.equal(rollouts(True, chunk).completion_ids, want.completion_ids), chunk
