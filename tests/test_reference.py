"""A slow, obvious reference of the POPO and GRPO objectives, and the fast code held to it.

The reference is written with Python loops over groups, sequences and tokens, one element at a time,
straight from the algorithm's statement; it shares no code with `popo_lite.core.objectives`. Three
kinds of checks:

1. Each vectorised objective equals the reference on random tensors (several seeds, right-padded
   masks with garbage in the padding, zero-positive and all-positive groups): values and gradients.
2. Each comparison is sensitive: the reference with one term changed (another normaliser, another
   positive set, no clipping, ...) no longer matches the fast value under the same tolerance, so the
   checks in 1 would fail if the fast code made that change.
3. One whole `popo_update` / `grpo_update` on the tiny model, with fixed rollouts and one micro-batch,
   gives the gradient of ONE naive forward of the plain model over the whole batch fed to the reference.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from conftest import live_policy

from popo_lite.config import Config
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
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import Predictor, adapter_pairs, ema_forward, ema_reset
from popo_lite.core.updates import grpo_update, popo_update

RTOL, ATOL = 1e-5, 1e-6  # float32 fast code against the float64 reference
SEEDS = range(5)
EPS = 1e-4  # GRPO's advantage denominator: (r - mean) / (std + EPS)


# ---- the reference: loops, one element at a time ----


def ref_sequence_scores(logp, mask) -> tuple[list[float], list[float]]:
    """Mean and sum of each sequence's completion-token log-probs, as plain floats (no gradient)."""
    means, sums = [], []
    for i in range(len(mask)):
        total, count = 0.0, 0
        for t in range(len(mask[i])):
            if mask[i][t]:
                total += float(logp[i][t])
                count += 1
        sums.append(total)
        means.append(total / count if count else 0.0)
    return means, sums


def ref_weights(mean_lp, sum_lp, rewards, mode="softmax", temperature=1.0, threshold=0.0, over="positives"):
    """Group weights as nested lists. softmax: softmax of mean log-prob over the group's positives;
    sequence: the same of summed log-probs; uniform: 1 / |S+|. Non-positives 0; no positive: all 0.

    Perturbation for the sensitivity checks: over="group" takes the softmax over the whole group.
    """
    weights = []
    for b in range(len(rewards)):
        group = [float(r) for r in rewards[b]]
        positives = [g for g in range(len(group)) if group[g] > threshold]
        pool = positives if over == "positives" else list(range(len(group)))
        row = [0.0] * len(group)
        if positives:
            if mode == "uniform":
                for g in positives:
                    row[g] = 1.0 / len(pool)
            else:
                source = mean_lp if mode == "softmax" else sum_lp
                scores = {g: float(source[b][g]) / temperature for g in pool}
                top = max(scores.values())  # shift by the max so sums near -1000 stay finite
                total = sum(math.exp(score - top) for score in scores.values())
                for g in positives:
                    row[g] = math.exp(scores[g] - top) / total
        weights.append(row)
    return weights


def ref_nll(logp, mask, weights, positive, divide_by="positive_tokens"):
    """sum_i sum_t w_i * (-logp_i,t) over positive sequences' completion tokens / their count.

    Perturbation: divide_by="all_tokens" divides by every completion token of the micro-batch.
    """
    total = torch.zeros((), dtype=torch.float64)
    positive_tokens = all_tokens = 0
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            all_tokens += 1
            if positive[i]:
                positive_tokens += 1
                total = total + float(weights[i]) * (-logp[i, t].double())
    if positive_tokens == 0:
        return torch.zeros((), dtype=torch.float64)
    return total / (positive_tokens if divide_by == "positive_tokens" else all_tokens)


def ref_cosine(a: list, b: list):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm_a = sum(x * x for x in a) ** 0.5
    norm_b = sum(y * y for y in b) ** 0.5
    return dot / (norm_a * norm_b)


def ref_similarity(predicted, target, weights, noise=None, divide_by="weight_sum", stop_gradient=True):
    """-sum_i w_i cos(pred_i, stopgrad(target_i + noise_i)) / sum_i w_i.

    Perturbations: divide_by="rows" divides by the number of rows; stop_gradient=False lets the
    gradient reach the target; noise=None drops the noise.
    """
    numerator = torch.zeros((), dtype=torch.float64)
    weight_sum = 0.0
    for i in range(predicted.shape[0]):
        w = float(weights[i])
        if w == 0:
            continue
        pred = [predicted[i, h].double() for h in range(predicted.shape[1])]
        targ = []
        for h in range(target.shape[1]):
            value = target[i, h].double()
            if stop_gradient:
                value = value.detach()
            if noise is not None:
                value = value + float(noise[i, h])
            targ.append(value)
        numerator = numerator + w * ref_cosine(pred, targ)
        weight_sum += w
    if weight_sum == 0:
        return torch.zeros((), dtype=torch.float64)
    return -numerator / (weight_sum if divide_by == "weight_sum" else predicted.shape[0])


def ref_entropy_bonus(entropy, mask, divide_by="masked_tokens"):
    """Minus the mean entropy over the masked tokens.

    Perturbation: divide_by="all_positions" divides by every position, padding included.
    """
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if mask[i][t]:
                total = total + entropy[i, t].double()
                count += 1
    if count == 0:
        return torch.zeros((), dtype=torch.float64)
    if divide_by == "all_positions":
        count = len(mask) * len(mask[0])
    return -total / count


def ref_popo_loss(
    logp,
    entropy,
    mask,
    weights,
    positive,
    predicted,
    target,
    noise,
    alpha,
    beta,
    entropy_over="all",
    skip_entropy_without_positives=True,
):
    """nll + alpha * sim + beta * ent on one micro-batch; zero when it holds no positive token.

    entropy_over: "all" completion tokens, or "positives" only. Perturbation:
    skip_entropy_without_positives=False keeps the entropy term on a micro-batch with no positive.
    """
    rows, length = len(mask), len(mask[0])
    has_positive_token = any(positive[i] and mask[i][t] for i in range(rows) for t in range(length))
    if not has_positive_token:
        if skip_entropy_without_positives or beta == 0:
            return torch.zeros((), dtype=torch.float64)
        return beta * ref_entropy_bonus(entropy, mask)
    loss = ref_nll(logp, mask, weights, positive)
    if alpha != 0:
        loss = loss + alpha * ref_similarity(predicted, target, weights, noise)
    if beta != 0:
        over = [
            [mask[i][t] and (entropy_over == "all" or positive[i]) for t in range(length)]
            for i in range(rows)
        ]
        loss = loss + beta * ref_entropy_bonus(entropy, over)
    return loss


def ref_advantages(rewards, std="sample"):
    """(r - mean) / (std + 1e-4) per group, nested lists; 0 for a group whose rewards are all equal.

    std="sample" divides the squared deviations by G - 1; the perturbation "population" by G.
    """
    advantages = []
    for group in rewards:
        values = [float(r) for r in group]
        size = len(values)
        if size == 1 or all(v == values[0] for v in values):
            advantages.append([0.0] * size)
            continue
        mean = sum(values) / size
        squares = sum((v - mean) ** 2 for v in values)
        deviation = math.sqrt(squares / (size - 1 if std == "sample" else size))
        advantages.append([(v - mean) / (deviation + EPS) for v in values])
    return advantages


def ref_k3(logp, ref):
    delta = ref - logp
    return torch.exp(delta) - delta - 1


def ref_kl(logp, ref, mask):
    """Token mean of k3 = exp(ref - logp) - (ref - logp) - 1 over the masked tokens."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(len(mask)):
        for t in range(len(mask[i])):
            if mask[i][t]:
                total = total + ref_k3(logp[i, t].double(), ref[i, t].double())
                count += 1
    return total / max(count, 1)


def ref_grpo_loss(
    logp,
    old,
    advantages,
    mask,
    ref=None,
    clip_eps=0.2,
    beta=0.01,
    normalization="sequence",
    clip=True,
    kl="k3",
):
    """Per token -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * k3, rho = exp(logp - old).

    sequence: mean over each completion's tokens, then over completions; token: over all tokens.
    Perturbations: clip=False drops the clipped branch; kl="k1" uses logp - ref instead of k3.
    """
    per_sequence, all_terms = [], []
    for i in range(len(mask)):
        terms = []
        for t in range(len(mask[i])):
            if not mask[i][t]:
                continue
            lp = logp[i, t].double()
            rho = torch.exp(lp - float(old[i, t]))
            a = float(advantages[i])
            unclipped = rho * a
            clipped = rho.clamp(1 - clip_eps, 1 + clip_eps) * a
            term = -(unclipped if (not clip or unclipped <= clipped) else clipped)
            if ref is not None:
                r = float(ref[i, t])
                term = term + beta * (ref_k3(lp, r) if kl == "k3" else lp - r)
            terms.append(term)
        all_terms += terms
        per_sequence.append(sum(terms) / len(terms))
    if normalization == "sequence":
        return sum(per_sequence) / len(per_sequence)
    return sum(all_terms) / len(all_terms)


# ---- random batches and comparisons ----


def random_batch(seed: int, groups: int = 4, group_size: int = 4, length: int = 6, hidden: int = 5) -> dict:
    """Rewards with a zero-positive group, an all-positive group and mixed ones; right-padded masks with
    garbage in the padding (a leak shows); token log-probs, entropies and features, all float32."""
    g = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    rewards = (torch.rand(groups, group_size, generator=g) < 0.5).float()
    order = torch.randperm(groups, generator=g)
    rewards[order[0]] = 0.0  # zero positives
    rewards[order[1]] = 1.0  # all positive
    rewards[order[2], :2] = torch.tensor([1.0, 0.0])  # mixed
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()  # (N, T)
    logp = -3 * torch.rand(rows, length, generator=g) - 0.01
    logp = torch.where(mask.bool(), logp, torch.full_like(logp, -50.0))
    entropy = torch.where(mask.bool(), 2 * torch.rand(rows, length, generator=g), torch.full_like(logp, 99.0))
    return {
        "rewards": rewards,
        "mask": mask,
        "logp": logp,
        "entropy": entropy,
        "old": logp + 0.3 * torch.randn(rows, length, generator=g),  # ratios on both sides of the clip
        "ref": logp + 0.5 * torch.randn(rows, length, generator=g),
        "predicted": torch.randn(rows, hidden, generator=g),
        "target": torch.randn(rows, hidden, generator=g),
        "noise": 0.1 * torch.randn(rows, hidden, generator=g),
    }


def leaves(batch: dict, *names: str) -> list[torch.Tensor]:
    return [batch[name].clone().requires_grad_(True) for name in names]


def positives_of(rewards: torch.Tensor) -> list[bool]:
    return [bool(r > 0) for r in rewards.flatten()]


def weights_of(batch: dict, mode: str = "softmax") -> list[float]:
    means, sums = ref_sequence_scores(batch["logp"].tolist(), batch["mask"].tolist())
    group_size = batch["rewards"].shape[1]
    shaped = [means[i : i + group_size] for i in range(0, len(means), group_size)]
    summed = [sums[i : i + group_size] for i in range(0, len(sums), group_size)]
    return [w for row in ref_weights(shaped, summed, batch["rewards"].tolist(), mode) for w in row]


def matches(fast, reference) -> bool:
    fast = torch.as_tensor(fast).detach().double()
    reference = torch.as_tensor(reference).detach().double()
    return fast.shape == reference.shape and torch.allclose(fast, reference, rtol=RTOL, atol=ATOL)


def gradients(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d inputs, zeros where the loss does not depend on an input."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def assert_same_value_and_gradients(fast: torch.Tensor, reference: torch.Tensor, inputs: list[torch.Tensor]):
    assert matches(fast, reference), (float(fast), float(reference))
    for fast_grad, ref_grad in zip(gradients(fast, inputs), gradients(reference, inputs), strict=True):
        assert torch.isfinite(fast_grad).all()
        torch.testing.assert_close(fast_grad.double(), ref_grad.double(), rtol=RTOL, atol=ATOL)


# ---- 1. the fast objectives equal the reference ----


@pytest.mark.parametrize("mode", ["softmax", "sequence", "uniform"])
@pytest.mark.parametrize("seed", SEEDS)
def test_weights_equal_the_reference_softmax_over_each_groups_positives(seed, mode):
    batch = random_batch(seed)
    scale = 200.0 if mode == "sequence" else 1.0  # summed log-probs near -1000 in sequence mode
    batch["logp"] = batch["logp"] * scale
    expected = weights_of(batch, mode)
    means, sums = ref_sequence_scores(batch["logp"].tolist(), batch["mask"].tolist())
    shape = batch["rewards"].shape
    fast = popo_weights(
        torch.tensor(means).view(shape), torch.tensor(sums).view(shape), batch["rewards"], mode
    )
    assert matches(fast.flatten(), expected)


def test_weights_equal_the_reference_with_a_threshold_and_temperature():
    rewards = torch.tensor([[0.2, 0.7, 0.9, 0.5], [0.1, 0.0, 0.4, 0.3]])
    mean_lp = -torch.rand(2, 4, generator=torch.Generator().manual_seed(3))
    expected = ref_weights(
        mean_lp.tolist(), None, rewards.tolist(), "softmax", temperature=0.7, threshold=0.45
    )
    fast = popo_weights(mean_lp, mean_lp, rewards, "softmax", temperature=0.7, reward_threshold=0.45)
    assert matches(fast, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_weighted_nll_equals_the_reference_per_positive_token_mean(seed):
    batch = random_batch(seed)
    weights, positive = weights_of(batch), positives_of(batch["rewards"])
    (logp,) = leaves(batch, "logp")
    fast, _ = weighted_nll(logp, batch["mask"], torch.tensor(weights), torch.tensor(positive))
    reference = ref_nll(logp, batch["mask"].tolist(), weights, positive)
    assert_same_value_and_gradients(fast, reference, [logp])


@pytest.mark.parametrize("seed", SEEDS)
def test_similarity_penalty_equals_the_reference_weighted_cosine_with_noise(seed):
    batch = random_batch(seed)
    weights = weights_of(batch)
    predicted, target = leaves(batch, "predicted", "target")
    fast, _ = similarity_penalty(predicted, target, torch.tensor(weights), batch["noise"])
    reference = ref_similarity(predicted, target, weights, batch["noise"])
    assert_same_value_and_gradients(fast, reference, [predicted, target])  # target: zero gradient


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_bonus_equals_the_reference_minus_mean_over_masked_tokens(seed):
    batch = random_batch(seed)
    (entropy,) = leaves(batch, "entropy")
    fast, _ = entropy_bonus(entropy, batch["mask"])
    assert_same_value_and_gradients(fast, ref_entropy_bonus(entropy, batch["mask"].tolist()), [entropy])


@pytest.mark.parametrize("entropy_over", ["all", "positives"])
@pytest.mark.parametrize("seed", SEEDS)
def test_popo_loss_equals_the_reference_total(seed, entropy_over):
    batch = random_batch(seed)
    weights, positive = weights_of(batch), positives_of(batch["rewards"])
    alpha, beta = 0.1 + 0.2 * seed, 0.01 + 0.05 * seed
    inputs = leaves(batch, "logp", "entropy", "predicted", "target")
    logp, entropy, predicted, target = inputs
    mask, noise = batch["mask"], batch["noise"]
    fast, metrics = popo_loss(
        logp,
        entropy,
        mask,
        torch.tensor(weights),
        torch.tensor(positive),
        predicted,
        target,
        noise,
        alpha=alpha,
        beta_entropy=beta,
        entropy_over=entropy_over,
    )
    reference = ref_popo_loss(
        logp, entropy, mask.tolist(), weights, positive, predicted, target, noise, alpha, beta, entropy_over
    )
    assert_same_value_and_gradients(fast, reference, inputs)
    assert metrics["loss"] == pytest.approx(reference.item(), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_popo_loss_on_a_micro_batch_without_positives_is_a_connected_zero(seed):
    batch = random_batch(seed)
    zero_group = int((batch["rewards"].sum(1) == 0).nonzero()[0])
    rows = slice(4 * zero_group, 4 * zero_group + 4)
    part = {key: value[rows] for key, value in batch.items() if key != "rewards"}
    inputs = leaves(part, "logp", "entropy", "predicted")
    logp, entropy, predicted = inputs
    positive = [False] * 4
    fast, _ = popo_loss(
        logp,
        entropy,
        part["mask"],
        torch.zeros(4),
        torch.tensor(positive),
        predicted,
        part["target"],
        part["noise"],
        alpha=0.5,
        beta_entropy=0.5,
    )
    reference = ref_popo_loss(
        logp, entropy, part["mask"].tolist(), [0.0] * 4, positive, predicted, part["target"], None, 0.5, 0.5
    )
    assert fast.requires_grad  # connected: backward runs on every process
    assert_same_value_and_gradients(fast, reference, inputs)


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_advantages_equal_the_reference_with_the_sample_std(seed):
    batch = random_batch(seed)
    rewards = batch["rewards"]
    assert matches(grpo_advantages(rewards), ref_advantages(rewards.tolist()))
    graded = torch.rand(5, 3, generator=torch.Generator().manual_seed(seed))  # non-binary rewards
    assert matches(grpo_advantages(graded), ref_advantages(graded.tolist()))


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_k3_equals_the_reference_token_mean(seed):
    batch = random_batch(seed)
    logp, ref = leaves(batch, "logp", "ref")
    fast = kl_k3(logp, ref, batch["mask"])
    assert_same_value_and_gradients(fast, ref_kl(logp, ref, batch["mask"].tolist()), [logp, ref])


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_loss_equals_the_reference_clipped_ratio_plus_k3(seed, normalization):
    batch = random_batch(seed)
    advantages = [a for row in ref_advantages(batch["rewards"].tolist()) for a in row]
    (logp,) = leaves(batch, "logp")
    beta = 0.05 * (seed + 1)
    fast, _ = grpo_loss(
        logp,
        batch["old"],
        torch.tensor(advantages),
        batch["mask"],
        batch["ref"],
        clip_eps=0.2,
        beta=beta,
        normalization=normalization,
    )
    reference = ref_grpo_loss(
        logp, batch["old"], advantages, batch["mask"].tolist(), batch["ref"], 0.2, beta, normalization
    )
    assert_same_value_and_gradients(fast, reference, [logp])


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_loss_without_reference_is_the_clipped_ratio_alone(seed):
    batch = random_batch(seed)
    advantages = [a for row in ref_advantages(batch["rewards"].tolist()) for a in row]
    (logp,) = leaves(batch, "logp")
    fast, _ = grpo_loss(logp, batch["old"], torch.tensor(advantages), batch["mask"], None, 0.2, 0.5)
    reference = ref_grpo_loss(logp, batch["old"], advantages, batch["mask"].tolist(), None, 0.2, 0.5)
    assert_same_value_and_gradients(fast, reference, [logp])


# ---- 2. each comparison is sensitive to the term it checks ----
# Seed 0's batch holds a zero-positive group, an all-positive group, mixed groups, lengths 1..6 and
# ratios outside the clip range; every perturbation below changes the value by far more than RTOL/ATOL.


@pytest.fixture
def batch():
    return random_batch(0)


@pytest.mark.parametrize(
    ("mode", "perturbed"),
    [
        ("softmax", {"over": "group"}),  # the softmax runs over the whole group, negatives included
        ("softmax", {"mode": "sequence"}),  # summed instead of mean log-probs
        ("uniform", {"over": "group"}),  # 1 / G instead of 1 / |S+|
    ],
)
def test_weights_check_fails_on_a_softmax_over_the_whole_group_or_summed_scores(batch, mode, perturbed):
    means, sums = ref_sequence_scores(batch["logp"].tolist(), batch["mask"].tolist())
    shape = batch["rewards"].shape
    fast = popo_weights(
        torch.tensor(means).view(shape), torch.tensor(sums).view(shape), batch["rewards"], mode
    )
    grouped = [means[i : i + 4] for i in range(0, 16, 4)], [sums[i : i + 4] for i in range(0, 16, 4)]
    rewards = batch["rewards"].tolist()
    assert matches(fast, ref_weights(*grouped, rewards, mode))
    assert not matches(fast, ref_weights(*grouped, rewards, **{"mode": mode, **perturbed}))


def test_nll_check_fails_when_divided_by_all_tokens_instead_of_positive_tokens(batch):
    weights, positive = weights_of(batch), positives_of(batch["rewards"])
    fast, _ = weighted_nll(batch["logp"], batch["mask"], torch.tensor(weights), torch.tensor(positive))
    mask = batch["mask"].tolist()
    assert matches(fast, ref_nll(batch["logp"], mask, weights, positive))
    assert not matches(fast, ref_nll(batch["logp"], mask, weights, positive, divide_by="all_tokens"))


def test_nll_check_fails_when_negatives_are_trained_with_uniform_weight(batch):
    weights, positive = weights_of(batch), positives_of(batch["rewards"])
    fast, _ = weighted_nll(batch["logp"], batch["mask"], torch.tensor(weights), torch.tensor(positive))
    everyone = [True] * len(positive)
    assert not matches(fast, ref_nll(batch["logp"], batch["mask"].tolist(), [0.25] * 16, everyone))


@pytest.mark.parametrize(
    "perturbed",
    [{"divide_by": "rows"}, {"noise": None}],
    ids=["divided-by-rows-not-weight-sum", "noise-dropped"],
)
def test_similarity_check_fails_on_another_normaliser_or_without_the_noise(batch, perturbed):
    weights = weights_of(batch)
    args = batch["predicted"], batch["target"], torch.tensor(weights)
    fast, _ = similarity_penalty(*args, batch["noise"])
    assert matches(fast, ref_similarity(batch["predicted"], batch["target"], weights, batch["noise"]))
    options = {"noise": batch["noise"], **perturbed}
    assert not matches(fast, ref_similarity(batch["predicted"], batch["target"], weights, **options))


def test_similarity_check_fails_when_the_gradient_reaches_the_target(batch):
    weights = weights_of(batch)
    predicted, target = leaves(batch, "predicted", "target")
    fast, _ = similarity_penalty(predicted, target, torch.tensor(weights), batch["noise"])
    leaky = ref_similarity(predicted, target, weights, batch["noise"], stop_gradient=False)
    fast_grad = gradients(fast, [target])[0]
    leaky_grad = gradients(leaky, [target])[0]
    assert fast_grad.abs().max() == 0 and leaky_grad.abs().max() > 1e-3


def test_entropy_check_fails_when_padding_positions_are_counted(batch):
    fast, _ = entropy_bonus(batch["entropy"], batch["mask"])
    mask = batch["mask"].tolist()
    assert matches(fast, ref_entropy_bonus(batch["entropy"], mask))
    assert not matches(fast, ref_entropy_bonus(batch["entropy"], mask, divide_by="all_positions"))


@pytest.mark.parametrize("entropy_over", ["all", "positives"])
def test_popo_loss_check_fails_when_entropy_runs_over_the_other_token_set(batch, entropy_over):
    weights, positive = weights_of(batch), positives_of(batch["rewards"])
    inputs = [batch[k] for k in ("logp", "entropy", "mask")]
    features = batch["predicted"], batch["target"], batch["noise"]
    fast, _ = popo_loss(
        *inputs,
        torch.tensor(weights),
        torch.tensor(positive),
        *features,
        alpha=0.1,
        beta_entropy=0.5,
        entropy_over=entropy_over,
    )
    other = "positives" if entropy_over == "all" else "all"
    args = batch["logp"], batch["entropy"], batch["mask"].tolist(), weights, positive, *features, 0.1, 0.5
    assert matches(fast, ref_popo_loss(*args, entropy_over))
    assert not matches(fast, ref_popo_loss(*args, other))


def test_popo_loss_check_fails_when_a_micro_batch_without_positives_keeps_its_entropy(batch):
    zero_group = int((batch["rewards"].sum(1) == 0).nonzero()[0])
    rows = slice(4 * zero_group, 4 * zero_group + 4)
    logp, entropy, mask = batch["logp"][rows], batch["entropy"][rows], batch["mask"][rows]
    fast, _ = popo_loss(
        logp, entropy, mask, torch.zeros(4), torch.zeros(4, dtype=torch.bool), None, None, alpha=0
    )
    args = logp, entropy, mask.tolist(), [0.0] * 4, [False] * 4, None, None, None, 0.0, 0.01
    assert matches(fast, ref_popo_loss(*args))
    assert not matches(fast, ref_popo_loss(*args, skip_entropy_without_positives=False))


def test_advantage_check_fails_with_the_population_std(batch):
    fast = grpo_advantages(batch["rewards"])
    assert matches(fast, ref_advantages(batch["rewards"].tolist()))
    assert not matches(fast, ref_advantages(batch["rewards"].tolist(), std="population"))


@pytest.mark.parametrize(
    "perturbed",
    [{"clip": False}, {"kl": "k1"}, {"beta": 0.0}, {"normalization": "token"}],
    ids=["unclipped", "k1-not-k3", "kl-dropped", "token-not-sequence-mean"],
)
def test_grpo_loss_check_fails_without_clipping_k3_or_the_named_normalisation(batch, perturbed):
    advantages = [a for row in ref_advantages(batch["rewards"].tolist()) for a in row]
    args = batch["logp"], batch["old"]
    fast, metrics = grpo_loss(
        *args, torch.tensor(advantages), batch["mask"], batch["ref"], 0.2, 0.1, "sequence"
    )
    assert metrics["clip_frac"] > 0  # the clipped branch is taken somewhere
    options = {"clip_eps": 0.2, "beta": 0.1, "normalization": "sequence"}
    mask = batch["mask"].tolist()
    assert matches(fast, ref_grpo_loss(*args, advantages, mask, batch["ref"], **options))
    assert not matches(fast, ref_grpo_loss(*args, advantages, mask, batch["ref"], **{**options, **perturbed}))


def test_kl_check_fails_with_k1_instead_of_k3(batch):
    fast = kl_k3(batch["logp"], batch["ref"], batch["mask"])
    k1 = ref_grpo_loss(
        batch["logp"],
        batch["logp"],
        [0.0] * 16,
        batch["mask"].tolist(),
        batch["ref"],
        beta=1.0,
        normalization="token",
        kl="k1",
    )
    assert matches(fast, ref_kl(batch["logp"], batch["ref"], batch["mask"].tolist()))
    assert not matches(fast, k1)


# ---- 3. one whole update equals one naive forward fed to the reference ----

# 4 prompts x 4 rollouts: group 1 has no positive, group 2 is all positive.
REWARDS = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
)
PROMPT, COMPLETION = 7, 5


def fixed_rollouts(vocab: int, pad: int, group: int = 4) -> Rollouts:
    """Left-padded prompts of different lengths, one per group as every engine makes them, right-padded
    completions of 1 to 4 tokens: the first prompt column and the last completion column are padding in
    every row (the update trims them)."""
    g = torch.Generator().manual_seed(1)
    rows = REWARDS.numel()
    prompt_ids = torch.randint(3, vocab, (rows // group, PROMPT), generator=g).repeat_interleave(group, 0)
    padding = torch.randint(1, 4, (rows // group,), generator=g).repeat_interleave(group, 0)
    prompt_mask = (torch.arange(PROMPT)[None, :] >= padding[:, None]).long()
    prompt_ids = torch.where(prompt_mask.bool(), prompt_ids, pad)
    completion_ids = torch.randint(3, vocab, (rows, COMPLETION), generator=g)
    lengths = torch.randint(1, COMPLETION, (rows,), generator=g)
    completion_mask = (torch.arange(COMPLETION)[None, :] < lengths[:, None]).long()
    completion_ids = torch.where(completion_mask.bool(), completion_ids, pad)
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, [""] * rows, group, 0.0)


def update_config(tiny_config, **overrides) -> Config:
    """One micro-batch holding every row, no noise, no dropout, rows in order."""
    values = dict(micro_batch_size=REWARDS.numel(), noise_std=0.0, lora_dropout=0.0, pack_positives=False)
    values |= dict(alpha=0.5, beta_entropy=0.2, grpo_beta=0.2, temperature=0.7)
    if "shuffle_micro_batches" in {field.name for field in dataclasses.fields(Config)}:
        values["shuffle_micro_batches"] = False
    return tiny_config(**values | overrides)


@pytest.fixture
def setup(tiny_config):
    """(make_config, model, predictor, rollouts); the EMA adapter differs from the policy adapter."""
    model, tokenizer = live_policy(update_config(tiny_config))
    ema_reset(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, xi in adapter_pairs(model):
            xi.add_(0.3 * torch.randn(xi.shape, generator=generator))
    torch.manual_seed(0)
    predictor = Predictor(model.get_base_model().config.hidden_size, 16)
    rollouts = fixed_rollouts(len(tokenizer), tokenizer.pad_token_id)
    return (lambda **o: update_config(tiny_config, **o)), model, predictor, rollouts


def trainable(model, predictor) -> dict[str, torch.Tensor]:
    named = [
        *model.named_parameters(),
        *(predictor.named_parameters(prefix="predictor") if predictor else []),
    ]
    return {name: p for name, p in named if p.requires_grad}


def collect_gradients(model, predictor, run) -> dict[str, torch.Tensor]:
    params = trainable(model, predictor)
    for p in params.values():
        p.grad = None
    run()
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in params.items()}


def naive_scores(model, rollouts: Rollouts, temperature: float, hidden: bool = False):
    """The plain model on the whole batch: (token log-probs (N, T), entropies (N, T), pooled final hidden
    states (N, H) or None). Rotary positions are shift-invariant, so left padding needs no position ids."""
    outputs = model(
        input_ids=rollouts.input_ids, attention_mask=rollouts.attention_mask, output_hidden_states=hidden
    )
    logits = outputs.logits[:, PROMPT - 1 : PROMPT - 1 + COMPLETION].float() / temperature  # (N, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logprobs = log_probs.gather(-1, rollouts.completion_ids[..., None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    features = None
    if hidden:
        last = outputs.hidden_states[-1][:, PROMPT:].float()  # (N, T, H), after the final norm
        mask = rollouts.completion_mask
        features = torch.stack(
            [
                sum(last[i, t] for t in range(COMPLETION) if mask[i, t]) / int(mask[i].sum())
                for i in range(len(mask))
            ]
        )
    return token_logprobs, entropy, features


def naive_popo(model, predictor, rollouts: Rollouts, config: Config, **perturbed) -> list[float]:
    """Backward of the reference POPO loss over the whole batch; returns the reference weights."""
    logp, entropy, features = naive_scores(model, rollouts, config.temperature, hidden=True)
    with torch.no_grad(), ema_forward(model):
        target = naive_scores(model, rollouts, config.temperature, hidden=True)[2]
    mask = rollouts.completion_mask.tolist()
    means, sums = ref_sequence_scores(logp.tolist(), mask)
    group = rollouts.group_size
    grouped = [means[i : i + group] for i in range(0, len(means), group)]
    summed = [sums[i : i + group] for i in range(0, len(sums), group)]
    weights = ref_weights(grouped, summed, REWARDS.tolist(), config.weight_mode, config.weight_temperature)
    weights = [w for row in weights for w in row]
    positive = positives_of(REWARDS)
    args = logp, entropy, mask, weights, positive, predictor(features), target, None
    if perturbed:  # the sensitivity check: NLL over every completion token
        loss = ref_nll(logp, mask, weights, positive, **perturbed)
        loss = loss + config.alpha * ref_similarity(predictor(features), target, weights)
        loss = loss + config.beta_entropy * ref_entropy_bonus(entropy, mask)
    else:
        loss = ref_popo_loss(*args, config.alpha, config.beta_entropy, config.entropy_over)
    loss.backward()
    return weights


def naive_grpo(model, rollouts: Rollouts, config: Config) -> None:
    logp, _, _ = naive_scores(model, rollouts, config.temperature)
    with torch.no_grad(), model.disable_adapter():
        ref = naive_scores(model, rollouts, config.temperature)[0]
    advantages = [a for row in ref_advantages(REWARDS.tolist()) for a in row]
    loss = ref_grpo_loss(
        logp,
        logp.detach(),
        advantages,
        rollouts.completion_mask.tolist(),
        ref,
        config.grpo_clip_eps,
        config.grpo_beta,
        config.grpo_normalization,
    )
    loss.backward()


def assert_same_gradients(fast: dict[str, torch.Tensor], naive: dict[str, torch.Tensor]) -> None:
    assert fast.keys() == naive.keys()
    for name, grad in naive.items():
        torch.testing.assert_close(fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("weight_mode", "entropy_over"), [("softmax", "all"), ("sequence", "positives"), ("uniform", "all")]
)
def test_popo_update_gradient_equals_one_naive_forward_over_the_whole_batch(setup, weight_mode, entropy_over):
    make_config, model, predictor, rollouts = setup
    config = make_config(weight_mode=weight_mode, entropy_over=entropy_over)
    returned = {}

    def fast():
        returned["metrics"], returned["weights"], returned["token_logprobs"] = popo_update(
            model, predictor, rollouts, REWARDS, config, torch.Generator().manual_seed(0)
        )

    fast_grads = collect_gradients(model, predictor, fast)
    holder = {}
    naive_grads = collect_gradients(
        model, predictor, lambda: holder.update(weights=naive_popo(model, predictor, rollouts, config))
    )
    assert any(".policy." in name for name in naive_grads) and any(
        "predictor" in name for name in naive_grads
    )
    for name, grad in naive_grads.items():
        assert grad.abs().sum() > 0, f"{name} has no gradient: the comparison would be empty"
    assert_same_gradients(fast_grads, naive_grads)
    assert matches(returned["weights"], holder["weights"])
    logp = naive_scores(model, rollouts, config.temperature)[0]
    for row, values in returned["token_logprobs"].items():
        length = int(rollouts.completion_mask[row].sum())
        assert matches(torch.tensor(values), logp[row, :length])


def test_popo_update_gradient_check_fails_when_the_nll_is_divided_by_all_tokens(setup):
    make_config, model, predictor, rollouts = setup
    config = make_config()
    fast_grads = collect_gradients(
        model, predictor, lambda: popo_update(model, predictor, rollouts, REWARDS, config, torch.Generator())
    )
    perturbed = collect_gradients(
        model, predictor, lambda: naive_popo(model, predictor, rollouts, config, divide_by="all_tokens")
    )
    lora = [name for name in fast_grads if ".policy." in name]
    assert any(not torch.allclose(fast_grads[n], perturbed[n], rtol=1e-4, atol=1e-6) for n in lora)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_grpo_update_gradient_equals_one_naive_forward_over_the_whole_batch(setup, normalization):
    make_config, model, _, rollouts = setup
    config = make_config(algo="grpo", grpo_normalization=normalization)
    fast_grads = collect_gradients(model, None, lambda: grpo_update(model, rollouts, REWARDS, config))
    naive_grads = collect_gradients(model, None, lambda: naive_grpo(model, rollouts, config))
    for name, grad in naive_grads.items():
        assert grad.abs().sum() > 0, f"{name} has no gradient: the comparison would be empty"
    assert_same_gradients(fast_grads, naive_grads)


def trl_gradients(model, rollouts: Rollouts, config: Config, out: Path, bias_correction: bool):
    """The LoRA gradient of TRL's own `GRPOTrainer._compute_loss` (the pinned trl) on `rollouts` with the
    same advantages (TRL's formula: group mean, sample std + 1e-4), reference log-probs (the adapter
    disabled), clip epsilon, beta, temperature and normalisation ("grpo" = per sequence, "dapo" = per
    token), in one micro-batch without accumulation and without bf16 autocast (TRL's default)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanstd

    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=REWARDS.numel(),
        num_generations=REWARDS.shape[1],
        max_completion_length=COMPLETION,
        temperature=config.temperature,
        beta=0.0,  # set below: with beta > 0 TRL copies the PEFT adapter into a "ref" adapter at init
        epsilon=config.grpo_clip_eps,
        loss_type="grpo" if config.grpo_normalization == "sequence" else "dapo",
        scale_rewards="group",
        use_bias_correction_kl=bias_correction,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),  # not called: no generation here
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1 + 1 ="}] * REWARDS.shape[0]),
        processing_class=AutoTokenizer.from_pretrained(config.model),
    )
    trainer.beta = config.grpo_beta  # the reference log-probs come in `inputs`: the base, as ours
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.training_step sets
    group = REWARDS.shape[1]
    std = nanstd(REWARDS, dim=1).repeat_interleave(group)
    advantages = (REWARDS.flatten() - REWARDS.mean(1).repeat_interleave(group)) / (std + 1e-4)
    with torch.no_grad(), model.disable_adapter():
        ref = naive_scores(model, rollouts, config.temperature)[0]
    inputs = {
        "prompt_ids": rollouts.prompt_ids,
        "prompt_mask": rollouts.prompt_mask,
        "completion_ids": rollouts.completion_ids,
        "completion_mask": rollouts.completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref,
        "num_items_in_batch": rollouts.completion_mask.sum(),
    }
    model.train()
    return collect_gradients(model, None, lambda: trainer._compute_loss(model, inputs).backward())


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_grpo_update_gradient_equals_trl_grpotrainers_own_loss(setup, tmp_path, normalization):
    """bench/study.py's `trl-grpo` arm checks that popo_lite's GRPO is not handicapped; here the two
    losses meet on the same rows. With TRL's KL bias correction off (as the study's arm sets it), TRL's
    gradient is popo_lite's."""
    make_config, model, _, rollouts = setup
    config = make_config(algo="grpo", grpo_normalization=normalization)
    ours = collect_gradients(model, None, lambda: grpo_update(model, rollouts, REWARDS, config))
    theirs = trl_gradients(model, rollouts, config, tmp_path, bias_correction=False)
    lora = [name for name in ours if ".policy." in name]
    assert lora and all(ours[name].abs().sum() > 0 for name in lora)
    assert_same_gradients({n: ours[n] for n in lora}, {n: theirs[n] for n in lora})


def test_trls_default_kl_bias_correction_changes_the_kl_gradient(setup, tmp_path):
    """TRL's default `use_bias_correction_kl=True` multiplies the k3 term by the ratio, whose value is 1
    on-policy but whose gradient is not: beta * k3 * grad(logp) is added. It is not the GRPO objective of
    docs/algorithm.md section 4, so the study turns it off; with beta 0 it changes nothing."""
    make_config, model, _, rollouts = setup
    config = make_config(algo="grpo")
    ours = collect_gradients(model, None, lambda: grpo_update(model, rollouts, REWARDS, config))
    theirs = trl_gradients(model, rollouts, config, tmp_path, bias_correction=True)
    lora = [name for name in ours if ".policy." in name]
    assert any(not torch.allclose(ours[n], theirs[n], rtol=1e-4, atol=1e-6) for n in lora)
    config = make_config(algo="grpo", grpo_beta=0.0)
    ours = collect_gradients(model, None, lambda: grpo_update(model, rollouts, REWARDS, config))
    theirs = trl_gradients(model, rollouts, config, tmp_path, bias_correction=True)
    assert_same_gradients({n: ours[n] for n in lora}, {n: theirs[n] for n in lora})
