"""One step's gradient work: POPO or GRPO over micro-batches of the step's rollouts.

Each function runs forwards, calls the pure objective of `objectives.py` on each micro-batch and
accumulates gradients (loss / number of micro-batches); the optimizer step and the EMA update are
the trainer's. Rows are grouped: rows i*G .. i*G + G - 1 share prompt i.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from popo_lite.config import Config
from popo_lite.logprobs import CompletionStats, completion_stats
from popo_lite.objectives import grpo_advantages, grpo_loss, kl_k3, popo_loss, popo_weights
from popo_lite.rollouts import Rollouts
from popo_lite.siamese import Predictor, ema_forward


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN or infinite loss; the step must not reach the adapter."""


def _rows(rollouts: Rollouts, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """input_ids, attention_mask, prompt width and completion mask of some rows, padding columns trimmed."""
    prompt_mask = rollouts.prompt_mask[index]
    completion_mask = rollouts.completion_mask[index]
    first = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else 0
    width = max(int(completion_mask.sum(1).max()), 1)
    prompt_ids = rollouts.prompt_ids[index, first:]
    completion_ids = rollouts.completion_ids[index, :width]
    completion_mask = completion_mask[:, :width]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (n, P' + T')
    attention_mask = torch.cat([prompt_mask[:, first:], completion_mask], dim=1)
    return input_ids, attention_mask, prompt_ids.shape[1], completion_mask


def _score(
    model, rollouts: Rollouts, index: torch.Tensor, config: Config, **flags
) -> tuple[CompletionStats, torch.Tensor]:
    input_ids, attention_mask, prompt_width, completion_mask = _rows(rollouts, index)
    stats = completion_stats(
        model, input_ids, attention_mask, prompt_width, completion_mask, config.temperature, **flags
    )
    return stats, completion_mask


def _micro_batches(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(index.split(size)) if index.numel() else []


def _backward(loss: torch.Tensor, metrics: dict, collected: dict[str, list[float]], name: str) -> None:
    """Accumulate one micro-batch's gradient (loss already divided by the micro-batch count)."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"{name} loss is {loss.item()}")
    loss.backward()
    for key, value in metrics.items():
        collected[key].append(float(value))


def _mean_metrics(collected: dict[str, list[float]]) -> dict[str, float]:
    return {key: sum(values) / len(values) for key, values in collected.items() if values}


@torch.no_grad()
def sequence_logprobs(
    model, rollouts: Rollouts, index: torch.Tensor, config: Config
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Mean and summed completion log-probs of the rows `index` under the active adapter, no gradient;
    also each row's token log-probs (for the rollout inspector's colouring)."""
    means, sums, per_token = [], [], []
    for rows in _micro_batches(index, config.micro_batch_size):
        stats, mask = _score(model, rollouts, rows, config)
        summed = (stats.logprobs * mask).sum(1)
        sums.append(summed)
        means.append(summed / mask.sum(1).clamp(min=1))
        per_token += _token_lists(stats.logprobs, mask)
    return torch.cat(means), torch.cat(sums), per_token


def _token_lists(token_logprobs: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    lengths = mask.sum(1).tolist()
    rows = token_logprobs.detach().float().cpu().tolist()
    return [row[: int(length)] for row, length in zip(rows, lengths, strict=True)]


def popo_update(
    model,
    predictor: Predictor,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    config: Config,
    generator: torch.Generator,
) -> tuple[dict[str, float], torch.Tensor, dict[int, list[float]]]:
    """Accumulate POPO gradients for one step; returns (metrics, weights (B*G,), token log-probs by row).

    rewards: (B, G). Weights come first, per group, from the policy that sampled (no gradient), over
    positives only: a non-positive's weight is 0 whatever its log-prob (POPO_SPEC.md section 1, step 4).
    """
    device = rollouts.completion_ids.device
    count = rewards.numel()
    positive = (rewards > config.reward_threshold).flatten().to(device)  # (B*G,)
    mean_logprobs = torch.zeros(count, device=device)
    sum_logprobs = torch.zeros(count, device=device)
    positive_rows = positive.nonzero().flatten()
    model.eval()  # weights from the sampling policy: no dropout
    token_logprobs: dict[int, list[float]] = {}
    if positive_rows.numel():
        mean_logprobs[positive_rows], sum_logprobs[positive_rows], per_token = sequence_logprobs(
            model, rollouts, positive_rows, config
        )
        token_logprobs = dict(zip(positive_rows.tolist(), per_token, strict=True))
    weights = popo_weights(
        mean_logprobs.view_as(rewards),
        sum_logprobs.view_as(rewards),
        rewards.to(device),
        config.weight_mode,
        config.weight_temperature,
        config.reward_threshold,
    ).flatten()  # (B*G,)

    model.train()
    all_rows = torch.arange(count, device=device)
    micro_batches = _micro_batches(all_rows, config.micro_batch_size)
    collected: dict[str, list[float]] = defaultdict(list)
    for rows in micro_batches:
        if config.entropy_over == "positives" or config.beta_entropy == 0:
            rows = rows[positive[rows]]
        if not positive[rows].any():
            # The spec's loss here is exactly zero (entropy skipped too): no forward is needed on one
            # process; the micro-batch still counts in the accumulation divisor below.
            continue
        use_features = config.alpha > 0
        stats, mask = _score(
            model, rollouts, rows, config, with_entropy=config.beta_entropy > 0, with_features=use_features
        )
        predicted = target = noise = None
        if use_features:
            target = torch.zeros_like(stats.features)  # (n, H); zero weight where not positive
            positives_here = positive[rows]
            with torch.no_grad(), ema_forward(model):
                ema_stats, _ = _score(model, rollouts, rows[positives_here], config, with_features=True)
            target[positives_here] = ema_stats.features
            predicted = predictor(stats.features)
            noise = torch.randn(target.shape, generator=generator, device="cpu").to(device) * config.noise_std
            raw_cosine = torch.cosine_similarity(
                stats.features[positives_here].detach(), ema_stats.features, dim=-1
            )
            collected["cosine_policy_ema"].append(float(raw_cosine.mean()))
        loss, metrics = popo_loss(
            stats.logprobs,
            stats.entropy,
            mask,
            weights[rows],
            positive[rows],
            predicted,
            target,
            noise,
            alpha=config.alpha,
            beta_entropy=config.beta_entropy,
            entropy_over=config.entropy_over,
        )
        _backward(loss / len(micro_batches), metrics, collected, "POPO")
    return _mean_metrics(collected), weights, token_logprobs


def grpo_update(
    model, rollouts: Rollouts, rewards: torch.Tensor, config: Config
) -> tuple[dict[str, float], torch.Tensor, dict[int, list[float]]]:
    """Accumulate GRPO gradients for one step; returns (metrics, advantages (B*G,), token log-probs by row).

    On-policy (one update per generation), so old log-probs are the detached current ones and the
    ratio is 1 in value; the clipped form is kept so the gradient is GRPO's (POPO_SPEC.md section 4).
    The reference policy is the base: the same model with the adapter disabled.
    """
    device = rollouts.completion_ids.device
    advantages = grpo_advantages(rewards.float()).flatten().to(device)  # (B*G,)
    model.train()
    micro_batches = _micro_batches(torch.arange(rewards.numel(), device=device), config.micro_batch_size)
    collected: dict[str, list[float]] = defaultdict(list)
    token_logprobs: dict[int, list[float]] = {}
    for rows in micro_batches:
        stats, mask = _score(model, rollouts, rows, config)
        token_logprobs.update(zip(rows.tolist(), _token_lists(stats.logprobs, mask), strict=True))
        ref_logprobs = None
        if config.grpo_beta > 0:
            with torch.no_grad(), model.disable_adapter():
                ref_logprobs = _score(model, rollouts, rows, config)[0].logprobs
        loss, metrics = grpo_loss(
            stats.logprobs,
            stats.logprobs.detach(),
            advantages[rows],
            mask,
            ref_logprobs,
            clip_eps=config.grpo_clip_eps,
            beta=config.grpo_beta,
            normalization=config.grpo_normalization,
        )
        _backward(loss / len(micro_batches), metrics, collected, "GRPO")
    return _mean_metrics(collected), advantages, token_logprobs


@torch.no_grad()
def kl_policy_ema(model, rollouts: Rollouts, config: Config) -> float:
    """KL(policy || EMA) by the k3 estimator on this step's completions: monitoring only."""
    model.eval()
    rows = torch.arange(rollouts.completion_ids.shape[0], device=rollouts.completion_ids.device)
    values, tokens = [], []
    for chunk in _micro_batches(rows, config.micro_batch_size):
        policy, mask = _score(model, rollouts, chunk, config)
        with ema_forward(model):
            ema, _ = _score(model, rollouts, chunk, config)
        values.append(float(kl_k3(policy.logprobs, ema.logprobs, mask)) * float(mask.sum()))
        tokens.append(float(mask.sum()))
    return sum(values) / max(sum(tokens), 1.0)
