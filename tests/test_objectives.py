"""Hand-computed checks of the POPO and GRPO objectives: small tensors, numbers by hand."""

import math

import pytest
import torch

from popo_lite.core.objectives import (
    entropy_bonus,
    grpo_advantages,
    grpo_loss,
    kl_k3,
    popo_loss,
    popo_weights,
    similarity_penalty,
    weighted_nll,
)


def approx(value, rel=1e-5, tolerance=1e-6):
    return pytest.approx(value, rel=rel, abs=tolerance)


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


# ---- popo_weights ----


def test_softmax_weights_match_hand_values_over_positives_only():
    mean_lp = t([[-1.0, -2.0, -3.0, -0.5]])
    w = popo_weights(mean_lp, mean_lp * 10, t([[1, 1, 0, 0]]))
    z = math.exp(-1) + math.exp(-2)
    assert w.tolist()[0] == [approx(math.exp(-1) / z), approx(math.exp(-2) / z), 0.0, 0.0]
    w_hot = popo_weights(mean_lp, mean_lp * 10, t([[1, 1, 0, 0]]), temperature=2.0)
    z2 = math.exp(-0.5) + math.exp(-1)
    assert w_hot[0, 0].item() == approx(math.exp(-0.5) / z2)


def test_sequence_weights_use_sum_logprobs():
    sum_lp = t([[-10.0, -11.0, -12.0]])
    w = popo_weights(torch.zeros(1, 3), sum_lp, t([[1, 0, 1]]), mode="sequence")
    z = math.exp(-10) + math.exp(-12)
    assert w.tolist()[0] == [approx(math.exp(-10) / z), 0.0, approx(math.exp(-12) / z)]


def test_uniform_weights_are_one_over_positive_count():
    w = popo_weights(torch.randn(2, 4), torch.randn(2, 4), t([[1, 0, 1, 1], [0, 0, 0, 0]]), mode="uniform")
    assert w.tolist() == [[approx(1 / 3), 0.0, approx(1 / 3), approx(1 / 3)], [0.0] * 4]


@pytest.mark.parametrize("mode", ["softmax", "sequence", "uniform"])
def test_weights_sum_to_one_per_positive_group_zero_elsewhere_and_lie_in_unit_interval(mode):
    torch.manual_seed(0)
    rewards = t([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    mean_lp = -torch.rand(4, 5)
    w = popo_weights(mean_lp, mean_lp * 300, rewards, mode=mode)
    assert torch.all((w >= 0) & (w <= 1))
    assert w[rewards == 0].abs().sum() == 0
    assert w.sum(dim=-1).tolist() == [approx(1.0), 0.0, approx(1.0), approx(1.0)]


def test_weights_are_stable_with_sum_logprobs_near_minus_1000():
    sum_lp = t([[-1000.0, -1001.0, -1002.0, -5000.0]])
    w = popo_weights(sum_lp / 500, sum_lp, t([[1, 1, 1, 0]]), mode="sequence")
    z = 1 + math.exp(-1) + math.exp(-2)  # shifted by +1000 by hand
    assert torch.isfinite(w).all()
    assert w.tolist()[0] == [approx(1 / z), approx(math.exp(-1) / z), approx(math.exp(-2) / z), 0.0]


def test_reward_threshold_defines_the_positive_set():
    w = popo_weights(torch.zeros(1, 3), torch.zeros(1, 3), t([[0.3, 0.7, 0.9]]), reward_threshold=0.5)
    assert w.tolist()[0] == [0.0, approx(0.5), approx(0.5)]


def test_weights_carry_no_gradient():
    mean_lp = t([[-1.0, -2.0]], requires_grad=True)
    assert not popo_weights(mean_lp, mean_lp, t([[1, 1]])).requires_grad


def test_unknown_weight_mode_raises_naming_it():
    with pytest.raises(ValueError, match="bogus"):
        popo_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mode="bogus")


# ---- weighted_nll ----


def test_weighted_nll_matches_hand_value_and_ignores_padding_and_negatives():
    logp = t([[-1.0, -2.0, -9.0], [-0.5, float("-inf"), -9.0], [-3.0, -3.0, -3.0]], requires_grad=True)
    mask = t([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    loss, metrics = weighted_nll(logp, mask, t([0.6, 0.4, 0.0]), torch.tensor([True, True, False]))
    expected = (0.6 * (1 + 2) + 0.4 * 0.5) / 3  # 3 completion tokens in positive sequences
    assert loss.item() == approx(expected)
    assert metrics == {"nll": approx(expected), "num_positive": 2.0, "positive_tokens": 3.0}
    loss.backward()
    assert logp.grad[2].abs().sum() == 0
    assert torch.isfinite(logp.grad).all()


def test_weighted_nll_divides_by_a_given_token_count_instead_of_its_own():
    logp = t([[-1.0, -2.0, -9.0], [-0.5, -4.0, -9.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    loss, metrics = weighted_nll(logp, mask, t([0.6, 0.4]), torch.tensor([True, True]), token_count=10.0)
    assert loss.item() == approx((0.6 * (1 + 2) + 0.4 * 0.5) / 10)  # the step's count, not these 3 tokens
    assert metrics["positive_tokens"] == 3.0


def test_weighted_nll_without_positives_is_zero_and_connected():
    logp = t([[-1.0, -2.0]], requires_grad=True)
    loss, metrics = weighted_nll(logp, torch.ones(1, 2), torch.zeros(1), torch.tensor([False]))
    loss.backward()
    assert loss.item() == 0.0
    assert metrics["nll"] == 0.0
    assert logp.grad.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("draws", [1, 3])
def test_sequence_weighted_nll_gradient_equals_minus_grad_log_positive_mass(draws):
    # docs/algorithm.md section 5.1 on a toy: a "sequence" is `draws` independent draws from
    # categoricals over logits z.
    torch.manual_seed(draws)
    z = torch.randn(draws, 5, requires_grad=True)
    logp = torch.log_softmax(z, dim=-1)  # (T, V)
    success = torch.tensor([[0, 1, 2], [3, 3, 1], [4, 0, 0]])[:, :draws]  # (|S+|, T): the positive set
    token_lp = logp.gather(1, success.T).T  # (|S+|, T)
    seq_lp = token_lp.sum(dim=-1)  # log p(y)
    w = popo_weights(token_lp.mean(-1)[None], seq_lp[None], torch.ones(1, 3), mode="sequence")[0]
    loss, _ = weighted_nll(token_lp, torch.ones_like(token_lp), w, torch.ones(3, dtype=torch.bool))
    # * numel undoes weighted_nll's token-count normaliser, leaving the sequence-level NLL of section 5.1
    (grad_popo,) = torch.autograd.grad(loss * token_lp.numel(), z, retain_graph=True)
    (grad_log_z,) = torch.autograd.grad(-torch.logsumexp(seq_lp, dim=0), z)
    assert torch.allclose(grad_popo, grad_log_z, atol=1e-6)
    if draws == 1:  # tokens 1 and 2 never succeed, yet descent lowers their logits
        assert (grad_popo[0, 1:3] > 0).all()


# ---- similarity_penalty ----


def test_similarity_penalty_weights_parallel_and_orthogonal_cosines():
    predicted = t([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss, metrics = similarity_penalty(predicted, t([[2.0, 0.0], [1.0, 0.0]]), t([1.0, 3.0]))
    assert loss.item() == approx(-(1 * 1.0 + 3 * 0.0) / 4)  # cosines 1 and 0, weights not pre-normalised
    assert metrics == {"sim": approx(-0.25), "cosine": approx(0.25)}


def test_similarity_penalty_adds_noise_to_target_and_stops_its_gradient():
    predicted = t([[1.0, 0.0]], requires_grad=True)
    target = t([[1.0, 0.0]], requires_grad=True)
    loss, _ = similarity_penalty(predicted, target, t([1.0]), noise=t([[0.0, 1.0]]))
    assert loss.item() == approx(-1 / math.sqrt(2))  # cos((1, 0), (1, 1))
    loss.backward()
    assert target.grad is None
    assert predicted.grad is not None
    orthogonal, _ = similarity_penalty(predicted, target, t([1.0]), noise=t([[-1.0, 1.0]]))
    assert orthogonal.item() == approx(0.0)


def test_similarity_penalty_with_zero_weights_is_zero_and_connected():
    predicted = t([[1.0, 2.0]], requires_grad=True)
    loss, metrics = similarity_penalty(predicted, t([[1.0, 2.0]]), t([0.0]))
    loss.backward()
    assert loss.item() == 0.0
    assert metrics["cosine"] == 0.0
    assert predicted.grad.tolist() == [[0.0, 0.0]]


# ---- entropy_bonus ----


def test_entropy_bonus_is_minus_mean_entropy_over_masked_tokens():
    loss, metrics = entropy_bonus(t([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), t([[1, 1, 0], [1, 0, 0]]))
    assert loss.item() == approx(-2.0)
    assert metrics["entropy"] == approx(2.0)


def test_entropy_bonus_with_empty_mask_is_zero_and_connected():
    entropy = t([[1.0, 2.0]], requires_grad=True)
    loss, _ = entropy_bonus(entropy, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == 0.0
    assert entropy.grad.tolist() == [[0.0, 0.0]]


# ---- popo_loss ----


def _popo_batch():
    logp = t([[-1.0, -2.0], [-4.0, -4.0]], requires_grad=True)  # sequence 0 positive, 1 negative
    entropy = t([[1.0, 3.0], [2.0, 6.0]], requires_grad=True)
    predicted = t([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target = t([[1.0, 1.0], [1.0, 0.0]])
    return logp, entropy, torch.ones(2, 2), t([1.0, 0.0]), torch.tensor([True, False]), predicted, target


def test_popo_loss_is_nll_plus_alpha_sim_plus_beta_entropy():
    logp, entropy, mask, w, positive, predicted, target = _popo_batch()
    loss, m = popo_loss(logp, entropy, mask, w, positive, predicted, target, alpha=0.5, beta_entropy=0.1)
    nll, sim, mean_entropy = (1 + 2) / 2, -1 / math.sqrt(2), (1 + 3 + 2 + 6) / 4  # entropy over all tokens
    assert loss.item() == approx(nll + 0.5 * sim - 0.1 * mean_entropy)
    assert (m["nll"], m["sim"], m["entropy"], m["num_positive"]) == (approx(nll), approx(sim), 3.0, 1.0)
    assert m["loss"] == approx(loss.item())
    assert m["cosine"] == approx(-sim)


def test_popo_loss_negatives_get_gradient_only_through_entropy():
    logp, entropy, mask, w, positive, predicted, target = _popo_batch()
    popo_loss(logp, entropy, mask, w, positive, predicted, target)[0].backward()
    assert logp.grad[1].abs().sum() == 0
    assert entropy.grad[1].abs().sum() > 0


def test_popo_loss_entropy_over_positives_uses_only_positive_tokens():
    logp, entropy, mask, w, positive, _, _ = _popo_batch()
    loss, m = popo_loss(logp, entropy, mask, w, positive, None, None, alpha=0.0, entropy_over="positives")
    assert m["entropy"] == approx(2.0)
    assert loss.item() == approx(1.5 - 0.01 * 2.0)


def test_popo_loss_without_positives_is_zero_connected_and_skips_entropy():
    logp, entropy, mask, _, _, predicted, target = _popo_batch()
    no_positive = torch.zeros(2, dtype=torch.bool)
    loss, m = popo_loss(logp, entropy, mask, torch.zeros(2), no_positive, predicted, target)
    loss.backward()
    assert loss.item() == 0.0
    assert m["loss"] == 0.0
    assert m["num_positive"] == 0.0
    for tensor in (logp, entropy, predicted):
        assert tensor.grad is not None
        assert tensor.grad.abs().sum() == 0


def test_popo_loss_rejects_unknown_entropy_over_and_missing_similarity_inputs():
    logp, entropy, mask, w, positive, predicted, target = _popo_batch()
    with pytest.raises(ValueError, match="negatives"):
        popo_loss(logp, entropy, mask, w, positive, predicted, target, entropy_over="negatives")
    with pytest.raises(ValueError, match="predicted"):
        popo_loss(logp, entropy, mask, w, positive, None, None, alpha=0.1)


# ---- KL ----


def test_kl_k3_matches_hand_value_over_masked_tokens():
    kl = kl_k3(t([[-1.0, -2.0, -7.0]]), t([[-1.5, -1.0, 0.0]]), t([[1, 1, 0]]))
    per_token = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]  # delta = ref - logp = -0.5, 1.0
    assert kl.item() == approx(sum(per_token) / 2)


def test_kl_k3_is_zero_when_policies_agree():
    logp = -torch.rand(3, 4)
    assert kl_k3(logp, logp.clone(), torch.ones(3, 4)).item() == 0.0


# ---- GRPO ----


def test_grpo_advantages_match_hand_values_with_unbiased_std():
    adv = grpo_advantages(t([[1, 0, 0, 0]]))
    # mean 0.25; unbiased std = sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    assert adv.tolist()[0] == [approx(0.75 / 0.5001)] + [approx(-0.25 / 0.5001)] * 3


def test_grpo_advantages_are_exactly_zero_for_zero_variance_groups():
    assert grpo_advantages(t([[1, 1, 1], [0, 0, 0], [0.1, 0.1, 0.1]])).abs().sum() == 0
    assert grpo_advantages(t([[1.0]])).tolist() == [[0.0]]  # G = 1: std undefined, advantage 0


def test_grpo_loss_on_policy_is_minus_advantage_under_both_normalizations():
    logp = -torch.rand(2, 3)
    adv, mask = t([1.0, -2.0]), t([[1, 1, 1], [1, 0, 0]])  # lengths 3 and 1
    seq, m = grpo_loss(logp, logp.detach(), adv, mask, normalization="sequence")
    assert seq.item() == approx((-1.0 + 2.0) / 2)
    assert m["clip_frac"] == 0.0
    tok, _ = grpo_loss(logp, logp.detach(), adv, mask, normalization="token")
    assert tok.item() == approx((3 * -1.0 + 1 * 2.0) / 4)


def test_grpo_loss_clips_off_policy_ratios_by_hand():
    # rho = 1.5, 0.5, 0.5, 1.5 against A = +1, -1, +1, -1; eps = 0.2
    old = torch.zeros(4, 1)
    logp = torch.log(t([[1.5], [0.5], [0.5], [1.5]])).requires_grad_()
    loss, m = grpo_loss(logp, old, t([1.0, -1.0, 1.0, -1.0]), torch.ones(4, 1), normalization="token")
    per_token = [-1.2, 0.8, -0.5, 1.5]  # -min(rho A, clip(rho) A): first two clipped
    assert loss.item() == approx(sum(per_token) / 4)
    assert m["clip_frac"] == 0.5
    loss.backward()
    assert logp.grad[:2].abs().sum() == 0
    assert logp.grad[2:].abs().sum() > 0


def test_grpo_loss_beta_adds_k3_per_token():
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    loss, m = grpo_loss(logp, logp, t([0.5]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    k3 = (math.exp(-0.5) + 0.5 - 1 + math.exp(1.0) - 2) / 2
    assert loss.item() == approx(-0.5 + 0.1 * k3)
    assert m["kl"] == approx(k3)
    assert m["pg"] == approx(-0.5)


def test_grpo_loss_unknown_normalization_raises_naming_it():
    zero = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="batch"):
        grpo_loss(zero, zero, torch.ones(1), torch.ones(1, 1), normalization="batch")
