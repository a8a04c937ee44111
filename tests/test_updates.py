"""Positive packing and weights from the loss forward (popo_lite.core.updates), against the plain path."""

from __future__ import annotations

import pytest
import torch

from popo_lite.config import ConfigError
from popo_lite.core import updates
from popo_lite.core.siamese import Predictor, ema_reset
from popo_lite.core.updates import pack_positive_groups, popo_update
from popo_lite.engine.choose import load_policy
from popo_lite.engine.rollouts import generate_rollouts

# 3 prompts x 4 rollouts: group 0 has 3 positives, group 1 none, group 2 all four.
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_packing_keeps_groups_whole_and_marks_split_ones():
    batches, split = pack_positive_groups(REWARDS > 0, size=4)
    assert [b.tolist() for b in batches] == [[0, 2, 3], [8, 9, 10, 11]]
    assert not split.any()
    batches, split = pack_positive_groups(REWARDS > 0, size=3)
    assert [b.tolist() for b in batches] == [[0, 2, 3], [8, 9, 10], [11]]
    assert split.nonzero().flatten().tolist() == [8, 9, 10, 11]
    batches, _ = pack_positive_groups(REWARDS > 0, size=8)
    assert [b.tolist() for b in batches] == [[0, 2, 3, 8, 9, 10, 11]]


def test_packing_refuses_the_reference_entropy_over_all_completions(tiny_config):
    with pytest.raises(ConfigError, match="pack_positives trains positives only"):
        tiny_config(pack_positives=True, entropy_over="all", beta_entropy=0.01)
    tiny_config(pack_positives=True, entropy_over="all", beta_entropy=0.0)  # nothing to refuse


@pytest.fixture
def step(tiny_config):
    """A model, predictor and one step's rollouts (3 prompts x 4), ready for popo_update."""
    config = tiny_config(entropy_over="positives", lora_dropout=0.0, noise_std=0.0, micro_batch_size=16)
    torch.manual_seed(0)
    model, tokenizer, _ = load_policy(config)
    ema_reset(model)
    predictor = Predictor(model.get_base_model().config.hidden_size, config.predictor_dim)
    rollouts = generate_rollouts(model, tokenizer, ["1+1=", "22+3=", "4="], 4, max_new_tokens=3)
    return config, model, predictor, rollouts


def _run(step, counter, **overrides):
    config, model, predictor, rollouts = step
    config = type(config)(**{**config.to_dict(), **overrides})
    model.zero_grad(set_to_none=True)
    predictor.zero_grad(set_to_none=True)
    counter.clear()
    metrics, weights, token_logprobs = popo_update(
        model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0)
    )
    grads = {
        n: p.grad.clone()
        for n, p in [*model.named_parameters(), *predictor.named_parameters()]
        if p.grad is not None
    }
    return metrics, weights, token_logprobs, grads, list(counter)


@pytest.fixture
def counter(monkeypatch):
    """Rows of each separate no-grad weights pass."""
    calls: list[list[int]] = []
    original = updates.sequence_logprobs

    def counting(model, rollouts, rows, *args):
        calls.append(rows.tolist())
        return original(model, rollouts, rows, *args)

    monkeypatch.setattr(updates, "sequence_logprobs", counting)
    return calls


def test_packed_step_equals_the_plain_one_without_the_weights_pass(step, counter):
    plain = _run(step, counter, pack_positives=False)
    assert plain[4] == [[0, 2, 3, 8, 9, 10, 11]]  # the plain path scores every positive first
    packed = _run(step, counter, pack_positives=True)
    assert packed[4] == []  # weights came from the loss forward
    torch.testing.assert_close(packed[1], plain[1])
    assert packed[1][:4].sum() == pytest.approx(1.0) and packed[1][8:].sum() == pytest.approx(1.0)
    assert sorted(packed[2]) == sorted(plain[2]) == [0, 2, 3, 8, 9, 10, 11]
    assert plain[3].keys() == packed[3].keys() and len(plain[3]) > 0
    for name, grad in plain[3].items():  # one micro-batch holding the same rows: the same gradient
        torch.testing.assert_close(packed[3][name], grad, rtol=1e-5, atol=1e-7)
    assert packed[0]["nll"] == pytest.approx(plain[0]["nll"], rel=1e-5)


def test_a_group_split_across_micro_batches_gets_its_weights_from_the_separate_pass(step, counter):
    plain = _run(step, counter, pack_positives=False, micro_batch_size=3)
    packed = _run(step, counter, pack_positives=True, micro_batch_size=3)
    assert packed[4] == [[8, 9, 10, 11]]  # only the split group needs the pass
    torch.testing.assert_close(packed[1], plain[1])


def test_with_lora_dropout_the_weights_come_from_the_dropout_free_pass(step, counter):
    packed = _run(step, counter, pack_positives=True, lora_dropout=0.1)
    assert packed[4] == [[0, 2, 3, 8, 9, 10, 11]]


def test_step_nll_normalisation_over_micro_batches_equals_one_micro_batch_of_the_whole_step(step, counter):
    """nll_normalization: step divides by the step's positive tokens: split into micro-batches of 3, the
    NLL's gradient is the one of a single micro-batch holding every row (the reference's divisor then)."""
    plain = dict(alpha=0.0, beta_entropy=0.0, shuffle_micro_batches=False)
    whole = _run(step, counter, **plain, micro_batch_size=12)
    split = _run(step, counter, **plain, micro_batch_size=3, nll_normalization="step")
    reference = _run(step, counter, **plain, micro_batch_size=3)
    assert whole[3].keys() == split[3].keys() and len(whole[3]) > 0
    for name, grad in whole[3].items():
        torch.testing.assert_close(split[3][name], grad, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(reference[3][n], g, rtol=1e-3) for n, g in whole[3].items())
