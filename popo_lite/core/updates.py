"""One step's gradient work: POPO or GRPO over micro-batches of the step's rollouts.

Each function runs forwards, calls the pure objective of `objectives.py` on each micro-batch and
accumulates gradients (loss / number of micro-batches); the optimizer step and the EMA update are
the trainer's. Rows are grouped: rows i*G .. i*G + G - 1 share prompt i.

Gradient forwards go through a `distributed.PolicyForward` (the policy + predictor as one module). Under
`accelerate launch` it is the DDP-wrapped one (`replicas.scorer`): then every process runs every
micro-batch's backward (a micro-batch with no positive gives a connected zero loss instead of being
skipped) and gradients are all-reduced on the last one only.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import torch

from popo_lite.config import Config
from popo_lite.core.logprobs import CompletionStats, completion_stats
from popo_lite.core.objectives import grpo_advantages, grpo_loss, kl_k3, popo_loss, popo_weights
from popo_lite.core.policy_forward import PolicyForward
from popo_lite.core.siamese import Predictor, ema_forward
from popo_lite.engine.rollouts import Rollouts
from popo_lite.training.distributed import Replicas


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


def _backward(
    loss: torch.Tensor, metrics: dict, collected: dict[str, list[float]], name: str, replicas: Replicas | None
) -> None:
    """Accumulate one micro-batch's gradient (loss already divided by the micro-batch count).

    With replicas the backward runs even on a non-finite loss: every process must reach the all-reduce,
    and the averaged gradient's norm, non-finite on every process alike, then skips the step everywhere.
    """
    if not torch.isfinite(loss) and replicas is None:
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
        mean, summed = _sequence_scores(stats.logprobs, mask)
        means.append(mean)
        sums.append(summed)
        per_token += _token_lists(stats.logprobs, mask)
    return torch.cat(means), torch.cat(sums), per_token


def _sequence_scores(token_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sum over each completion's tokens, (N,) each, detached; padding never enters."""
    summed = torch.where(mask.bool(), token_logprobs.detach().float(), 0.0).sum(1)
    return summed / mask.sum(1).clamp(min=1), summed


def _scorer(model, predictor: Predictor | None, replicas: Replicas | None) -> PolicyForward:
    return replicas.scorer if replicas is not None else PolicyForward(model, predictor)


def _forward(scorer, rollouts: Rollouts, rows: torch.Tensor, config: Config, **flags) -> tuple:
    """(token log-probs, entropy, features, predicted, completion mask) of `rows`, with gradient."""
    input_ids, attention_mask, prompt_width, completion_mask = _rows(rollouts, rows)
    outputs = scorer(input_ids, attention_mask, prompt_width, completion_mask, config.temperature, **flags)
    return (*outputs, completion_mask)


def _token_lists(token_logprobs: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    lengths = mask.sum(1).tolist()
    rows = token_logprobs.detach().float().cpu().tolist()
    return [row[: int(length)] for row, length in zip(rows, lengths, strict=True)]


def _sync(replicas: Replicas | None, number: int, count: int):
    """All-reduce gradients on the last micro-batch only (data-parallel); nothing on one process."""
    return replicas.sync(number == count - 1) if replicas is not None else nullcontext()


def _popo_micro_batch(
    model,
    scorer,
    rollouts: Rollouts,
    rows: torch.Tensor,
    weights: torch.Tensor,
    positive: torch.Tensor,
    stand_in: bool,
    config: Config,
    generator: torch.Generator,
    fill_weights=None,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One micro-batch's POPO loss: policy forward with gradient, EMA forward on its positives without.

    `fill_weights(rows, logprobs, mask)`, when given, returns the step's weights completed from this
    forward's detached log-probs (groups whose positives are all here). A stand-in (data-parallel filler)
    counts no row as positive, so its loss is a connected zero. Returns (loss, metrics, weights).
    """
    use_features = config.alpha > 0
    logprobs, entropy, features, predicted, mask = _forward(
        scorer, rollouts, rows, config, with_entropy=config.beta_entropy > 0, with_features=use_features
    )
    if fill_weights is not None:
        weights = fill_weights(rows, logprobs, mask)
    positives = positive[rows] & (not stand_in)  # (n,)
    target = noise = None
    extra = {}
    if use_features:
        target = torch.zeros_like(features)  # (n, H); zero weight where not positive
        if positives.any():
            with torch.no_grad(), ema_forward(model):
                ema, _ = _score(model, rollouts, rows[positives], config, with_features=True)
            target[positives] = ema.features
            cosine = torch.cosine_similarity(features[positives].detach(), ema.features, dim=-1)
            extra["cosine_policy_ema"] = float(cosine.mean())
        noise = torch.randn(target.shape, generator=generator, device="cpu").to(features.device)
        noise = noise * config.noise_std
    loss, metrics = popo_loss(
        logprobs,
        entropy,
        mask,
        weights[rows] * positives,
        positives,
        predicted,
        target,
        noise,
        alpha=config.alpha,
        beta_entropy=config.beta_entropy,
        entropy_over=config.entropy_over,
    )
    return loss, {**metrics, **extra}, weights


def pack_positive_groups(positive: torch.Tensor, size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Micro-batches of positive rows only, each group's positives together where they fit in `size`.

    positive: (B, G) bool. Returns the micro-batches (row indices into B*G, in group order) and a (B*G,)
    bool mask of the rows of groups split across micro-batches (more than `size` positives): only those
    need weights from a separate pass, the others get theirs from the loss forward.
    """
    group_size = positive.shape[1]
    batches: list[list[int]] = []
    current: list[int] = []
    split = torch.zeros(positive.numel(), dtype=torch.bool)
    for group, flags in enumerate(positive.cpu()):
        rows = (flags.nonzero().flatten() + group * group_size).tolist()
        if current and len(current) + len(rows) > size:
            batches.append(current)
            current = []
        if len(rows) > size:
            split[rows] = True
            pieces = [rows[i : i + size] for i in range(0, len(rows), size)]
            batches += pieces[:-1]
            rows = pieces[-1]
        current += rows
    if current:
        batches.append(current)
    device = positive.device
    return [torch.tensor(batch, device=device) for batch in batches], split.to(device)


def popo_update(
    model,
    predictor: Predictor,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    config: Config,
    generator: torch.Generator,
    replicas: Replicas | None = None,
) -> tuple[dict[str, float], torch.Tensor, dict[int, list[float]]]:
    """Accumulate POPO gradients for one step; returns (metrics, weights (B*G,), token log-probs by row).

    rewards: (B, G). Weights are per group, from the policy that sampled (no gradient), over positives
    only: a non-positive's weight is 0 whatever its log-prob (POPO_SPEC.md section 1, step 4). They come
    from a no-grad pass over the positives first, or, with `pack_positives` and no LoRA dropout, from the
    loss forward itself for every group whose positives share one micro-batch (the parameters do not change
    within a step, so the values are the same).
    """
    device = rollouts.completion_ids.device
    count = rewards.numel()
    positive = (rewards > config.reward_threshold).flatten().to(device)  # (B*G,)
    if config.pack_positives:
        micro_batches, split = pack_positive_groups(positive.view_as(rewards), config.micro_batch_size)
        deferred = positive & ~split if config.lora_dropout == 0 else torch.zeros_like(positive)
    else:
        micro_batches = _micro_batches(torch.arange(count, device=device), config.micro_batch_size)
        deferred = torch.zeros_like(positive)  # (B*G,) rows whose weights the loss forward gives
    if replicas is not None:  # every process runs as many micro-batch backwards as the busiest one
        micro_batches += [None] * (replicas.max_count(len(micro_batches)) - len(micro_batches))
    scores = torch.zeros(2, count, device=device)  # mean and summed completion log-prob per row
    token_logprobs: dict[int, list[float]] = {}

    def weights_with(rows: torch.Tensor, means, sums, per_token: list[list[float]]) -> torch.Tensor:
        scores[0, rows], scores[1, rows] = means, sums
        token_logprobs.update(zip(rows.tolist(), per_token, strict=True))
        return popo_weights(
            scores[0].view_as(rewards),
            scores[1].view_as(rewards),
            rewards.to(device),
            config.weight_mode,
            config.weight_temperature,
            config.reward_threshold,
        ).flatten()  # (B*G,), exact for every group whose positives are all scored

    def weights_from_forward(rows: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weights_with(rows, *_sequence_scores(logprobs, mask), _token_lists(logprobs, mask))

    model.eval()  # weights from the sampling policy: no dropout
    first_pass = (positive & ~deferred).nonzero().flatten()
    weights = torch.zeros(count, device=device)
    if first_pass.numel():
        weights = weights_with(first_pass, *sequence_logprobs(model, rollouts, first_pass, config))

    model.train()
    use_features = config.alpha > 0
    scorer = _scorer(model, predictor if use_features else None, replicas)
    collected: dict[str, list[float]] = defaultdict(list)
    for number, rows in enumerate(micro_batches):
        stand_in = rows is None or (replicas is not None and not positive[rows].any())
        if rows is None:
            rows = torch.zeros(1, dtype=torch.long, device=device)  # any row: its loss is a connected zero
        elif config.entropy_over == "positives" or config.beta_entropy == 0:
            # Only positives can carry a gradient here; under DDP one row stands in for an empty batch.
            rows = rows[positive[rows]] if positive[rows].any() else rows[:1]
        if not positive[rows].any() and replicas is None:
            # The spec's loss here is exactly zero (entropy skipped too): no forward is needed on one
            # process; the micro-batch still counts in the accumulation divisor below.
            continue
        fill = weights_from_forward if deferred[rows].any() and not stand_in else None
        with _sync(replicas, number, len(micro_batches)):
            loss, metrics, weights = _popo_micro_batch(
                model, scorer, rollouts, rows, weights, positive, stand_in, config, generator, fill
            )
            logged = {} if stand_in else metrics  # a DDP stand-in batch logs nothing
            _backward(loss / len(micro_batches), logged, collected, "POPO", replicas)
    return _mean_metrics(collected), weights, token_logprobs


def grpo_update(
    model, rollouts: Rollouts, rewards: torch.Tensor, config: Config, replicas: Replicas | None = None
) -> tuple[dict[str, float], torch.Tensor, dict[int, list[float]]]:
    """Accumulate GRPO gradients for one step; returns (metrics, advantages (B*G,), token log-probs by row).

    On-policy (one update per generation), so old log-probs are the detached current ones and the
    ratio is 1 in value; the clipped form is kept so the gradient is GRPO's (POPO_SPEC.md section 4).
    The reference policy is the base: the same model with the adapter disabled.
    """
    device = rollouts.completion_ids.device
    advantages = grpo_advantages(rewards.float()).flatten().to(device)  # (B*G,)
    model.train()
    scorer = _scorer(model, None, replicas)
    micro_batches = _micro_batches(torch.arange(rewards.numel(), device=device), config.micro_batch_size)
    collected: dict[str, list[float]] = defaultdict(list)
    token_logprobs: dict[int, list[float]] = {}
    for number, rows in enumerate(micro_batches):
        with _sync(replicas, number, len(micro_batches)):
            logprobs, _, _, _, mask = _forward(scorer, rollouts, rows, config)
            token_logprobs.update(zip(rows.tolist(), _token_lists(logprobs, mask), strict=True))
            ref_logprobs = None
            if config.grpo_beta > 0:
                with torch.no_grad(), model.disable_adapter():
                    ref_logprobs = _score(model, rollouts, rows, config)[0].logprobs
            loss, metrics = grpo_loss(
                logprobs,
                logprobs.detach(),
                advantages[rows],
                mask,
                ref_logprobs,
                clip_eps=config.grpo_clip_eps,
                beta=config.grpo_beta,
                normalization=config.grpo_normalization,
            )
            _backward(loss / len(micro_batches), metrics, collected, "GRPO", replicas)
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
