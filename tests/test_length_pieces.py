"""A micro-batch's forward in two pieces of similar completion length (Config.split_by_length) computes
what one forward of the whole micro-batch computes: the same losses, weights, token log-probs and adapter
gradients to 1e-5, in fp32 and NF4, with and without shared prompts."""

from __future__ import annotations

import pytest
import torch
from conftest import siamese_policy

from popo_lite.core import policy_forward
from popo_lite.core.policy_forward import length_pieces
from popo_lite.core.updates import grpo_update, kl_policy_ema, popo_update
from popo_lite.engine.rollouts import generate_rollouts

PROMPTS = ["1+1=", "22+3=", "4=", "13+21+8="]
G = 4
REWARDS = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
)


def test_length_pieces_by_hand():
    # sorted [4, 5, 6, 32]: cut after 3 rows costs 3 x 6 + 1 x 32 = 50 positions against 4 x 32 = 128
    pieces = length_pieces(torch.tensor([5, 32, 6, 4]))
    assert [piece.tolist() for piece in pieces] == [[3, 0, 2], [1]]
    assert length_pieces(torch.tensor([7, 7, 7])) is None  # nothing to save
    assert length_pieces(torch.tensor([2, 3])) is None  # 2 + 3 = 5 positions against 6: under a fifth
    assert length_pieces(torch.tensor([9])) is None
    # an empty completion counts as one position, as the forward gives it one
    assert [piece.tolist() for piece in length_pieces(torch.tensor([0, 10, 0, 0]))] == [[0, 2, 3], [1]]


def _policy_and_rollouts(tiny_config, qlora: bool, **overrides):
    """A live policy, its EMA moved away from it, a predictor, and rollouts of many lengths."""
    config = tiny_config(qlora=qlora, micro_batch_size=8, noise_std=0.0, max_new_tokens=12, **overrides)
    model, tokenizer, predictor = siamese_policy(config)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("0")]  # rows end at many steps
    model.generation_config.eos_token_id = stops
    torch.manual_seed(3)
    rollouts = generate_rollouts(model, tokenizer, PROMPTS, G, max_new_tokens=12, temperature=1.0)
    lengths = rollouts.completion_mask.sum(1)
    assert lengths.min() < 4 and lengths.max() == 12, lengths  # pieces to cut in every micro-batch
    return config, model, predictor, rollouts


def _both(tiny_config, qlora: bool, update, monkeypatch, **overrides):
    """(result, adapter + predictor gradients) of `update(config, ...)` with one forward and in pieces."""
    config, model, predictor, rollouts = _policy_and_rollouts(tiny_config, qlora, **overrides)
    split_calls = []
    inner = policy_forward.length_pieces
    monkeypatch.setattr(
        policy_forward, "length_pieces", lambda *a: split_calls.append(inner(*a)) or split_calls[-1]
    )
    outcomes = {}
    for split in (False, True):
        path = type(config)(**{**config.to_dict(), "split_by_length": split})
        params = [*model.named_parameters(), *predictor.named_parameters()]
        for _, param in params:
            param.grad = None
        result = update(path, model, predictor, rollouts)
        outcomes[split] = result, {n: p.grad.clone() for n, p in params if p.grad is not None}
    assert any(pieces is not None for pieces in split_calls)  # some forward did run in two pieces
    (want, want_grads), (got, got_grads) = outcomes[False], outcomes[True]
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(got.row_weights, want.row_weights, rtol=1e-5, atol=1e-6)
    assert got.token_logprobs.keys() == want.token_logprobs.keys()
    for row, values in want.token_logprobs.items():
        assert got.token_logprobs[row] == pytest.approx(values, abs=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    return want


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("shared_prompts", [True, False], ids=["shared", "per-rollout"])
def test_popo_update_in_pieces_gives_the_same_loss_weights_and_gradients(
    tiny_config, qlora, shared_prompts, monkeypatch
):
    def update(config, model, predictor, rollouts):
        return popo_update(model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0))

    overrides = {"alpha": 0.5, "beta_entropy": 0.1, "entropy_over": "all", "shared_prompts": shared_prompts}
    want = _both(tiny_config, qlora, update, monkeypatch, gradient_checkpointing=False, **overrides)
    assert want.metrics["entropy"] > 0 and "cosine_policy_ema" in want.metrics  # every term took part


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
def test_grpo_update_in_pieces_gives_the_same_loss_and_gradients(tiny_config, qlora, monkeypatch):
    def update(config, model, predictor, rollouts):
        return grpo_update(model, rollouts, REWARDS, config, generator=torch.Generator().manual_seed(0))

    want = _both(tiny_config, qlora, update, monkeypatch, algo="grpo", grpo_beta=0.5)
    assert want.metrics["kl"] > 0  # the reference forward took part


def test_kl_monitor_in_pieces_gives_the_same_value(tiny_config):
    _, model, _, rollouts = _policy_and_rollouts(tiny_config, qlora=False)
    want = kl_policy_ema(model, rollouts, 8, 1.0, shared_prompts=True, split_by_length=False)
    got = kl_policy_ema(model, rollouts, 8, 1.0, shared_prompts=True, split_by_length=True)
    assert want > 0 and got == pytest.approx(want, rel=1e-5)


def test_auto_splits_on_the_cpu_only():
    from popo_lite.config import Config, ConfigError
    from popo_lite.core.updates import splits_by_length

    assert splits_by_length(Config(), torch.device("cpu"))
    assert not splits_by_length(Config(), torch.device("cuda", 0))  # unmeasured on a GPU: off
    assert splits_by_length(Config(split_by_length=True), torch.device("cuda", 0))
    assert not splits_by_length(Config(split_by_length=False), torch.device("cpu"))
    with pytest.raises(ConfigError, match="split_by_length"):
        Config(split_by_length="maybe")
