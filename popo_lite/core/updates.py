"""One step's gradient work: POPO or GRPO over micro-batches of the step's rollouts.

`popo_update` and `grpo_update` are the only functions here that read the config; the helpers below
them take the numbers they use. Each runs the forwards, calls the pure objective of `objectives.py`
on each micro-batch and accumulates gradients (loss / number of micro-batches); the optimizer step
and the EMA update are the trainer's. Rows are grouped: rows i*G .. i*G + G - 1 share prompt i.
Names: `b_` for a tensor over the whole step's rows (B*G), `mb_` for one micro-batch's.

POPO, in order (docs/algorithm.md section 1):
1. weights: per group, from the policy that sampled, without gradient, over positives only. They come
   from an explicit no-grad pass over the positives (`sequence_logprobs`), except on one named path:
   with `pack_positives` (and no LoRA dropout) a group whose positives all sit in one micro-batch takes
   its weights from that micro-batch's own loss forward (`_weights_from_loss_forward`): the
   parameters do not change within a step, so the values are the same and one pass is saved;
2. per micro-batch: the policy forward with gradient, the EMA forward on its positives without, the
   loss, backward.

Every gradient forward goes through `PolicyForward` (policy log-probs + predictor), or, under
`accelerate launch`, the DDP wrapper of it (`replicas.forward`): then every process runs every
micro-batch's backward (a micro-batch with no positive gives a connected zero loss instead of being
skipped) and gradients are all-reduced on the last one only.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import NamedTuple, Protocol

import torch
from torch import nn

from popo_lite.config import Config
from popo_lite.core.logprobs import PromptPrefix
from popo_lite.core.objectives import grpo_advantages, grpo_loss, kl_k3, popo_loss, popo_weights
from popo_lite.core.policy_forward import PolicyForward
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import Predictor, ema_forward
from popo_lite.core.step_forwards import forward_rows, shared_prefix


class NonFiniteLoss(RuntimeError):
    """A micro-batch produced a NaN or infinite loss; the step must not reach the adapter."""


class Update(NamedTuple):
    """What one step's gradient work reports (the gradients themselves are in the parameters' `.grad`)."""

    metrics: dict[str, float]  # micro-batch means of the objective's metrics
    row_weights: torch.Tensor  # (B*G,) POPO weights or GRPO advantages
    token_logprobs: dict[int, list[float]]  # row -> its completion's token log-probs (the rollout inspector)


class Replicated(Protocol):
    """What data-parallel training (`training/distributed.py`) lends an update."""

    forward: nn.Module  # the DDP-wrapped PolicyForward

    def sync(self, last: bool): ...  # gradient all-reduce on the last micro-batch only

    def max_count(self, count: int) -> int: ...  # the largest `count` over the processes


def splits_by_length(config: Config, device: torch.device) -> bool:
    """`split_by_length` for this device: auto = on a CPU."""
    auto = config.split_by_length == "auto"
    return device.type == "cpu" if auto else bool(config.split_by_length)


def _shares_gradient_prompts(config: Config, replicas) -> bool:
    """Whether the gradient forwards may share prompts: one process (DDP all-reduces inside the last
    micro-batch's backward, before the prompts' own backward) and no LoRA dropout (one shared forward
    would give the whole group one dropout mask)."""
    return config.shared_prompts and replicas is None and config.lora_dropout == 0


def _gradient_prompts(
    model, rollouts: Rollouts, timer, b_rows: torch.Tensor | None = None
) -> tuple[PromptPrefix | None, PromptPrefix | None]:
    """The step's prompts (of the groups of `b_rows`) run once with gradient, and the detached leaves
    every micro-batch's completions attend to; (None, None) where the cache cannot be shared."""
    with _phase(timer, "loss"):
        prefix = shared_prefix(model, rollouts, True, b_rows)
    return prefix, (prefix.leaves() if prefix is not None else None)


def _prompts_backward(prefix: PromptPrefix | None, leaves: PromptPrefix | None, timer) -> None:
    """The prompts' share of the gradient, summed over the step's rows: one backward at the step's end."""
    if prefix is not None:
        with _phase(timer, "loss"):
            prefix.backward(leaves)


def _phase(timer, name: str):
    """A named phase of `timer` (training.records.PhaseTimer), or nothing without one."""
    return timer.phase(name) if timer is not None else nullcontext()


def _micro_batches(b_rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(b_rows.split(size)) if b_rows.numel() else []


def batch_order(count: int, shuffle: bool, generator: torch.Generator | None, device) -> torch.Tensor:
    """The step's rows in the order they are split into micro-batches: shuffled (the reference shuffles
    the generation batch before splitting it) or as generated."""
    if not shuffle or generator is None:
        return torch.arange(count, device=device)
    return torch.randperm(count, generator=generator).to(device)


def _sequence_scores(token_logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sum over each completion's tokens, (n,) each, detached; padding never enters."""
    summed = torch.where(mask.bool(), token_logprobs.detach().float(), 0.0).sum(1)
    return summed / mask.sum(1).clamp(min=1), summed


def _token_lists(token_logprobs: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    lengths = mask.sum(1).tolist()
    rows = token_logprobs.detach().float().cpu().tolist()
    return [row[: int(length)] for row, length in zip(rows, lengths, strict=True)]


@torch.no_grad()
def sequence_logprobs(
    model,
    rollouts: Rollouts,
    b_rows: torch.Tensor,
    micro_batch_size: int,
    temperature: float,
    shared_prompts: bool = False,
    split_by_length: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Mean and summed completion log-probs of the rows `b_rows` under the active adapter, no gradient;
    also each row's token log-probs (for the rollout inspector's colouring)."""
    forward = PolicyForward(model, split_by_length=split_by_length)
    prefix = shared_prefix(model, rollouts, shared_prompts, b_rows)
    means, sums, per_token = [], [], []
    for mb_rows in _micro_batches(b_rows, micro_batch_size):
        mb_logprobs, _, _, _, mb_mask = forward_rows(forward, rollouts, mb_rows, temperature, prefix)
        mean, summed = _sequence_scores(mb_logprobs, mb_mask)
        means.append(mean)
        sums.append(summed)
        per_token += _token_lists(mb_logprobs, mb_mask)
    return torch.cat(means), torch.cat(sums), per_token


class _WeightsBook:
    """The step's per-row sequence scores and the POPO weights computed from them, group by group."""

    def __init__(
        self, rewards: torch.Tensor, mode: str, temperature: float, threshold: float, device
    ) -> None:
        self.rewards, self.mode, self.temperature, self.threshold = (
            rewards.to(device),
            mode,
            temperature,
            threshold,
        )
        self.b_scores = torch.zeros(2, rewards.numel(), device=device)  # mean and summed log-prob per row
        self.token_logprobs: dict[int, list[float]] = {}

    def record(self, rows: torch.Tensor, means, sums, per_token: list[list[float]]) -> None:
        self.b_scores[0, rows], self.b_scores[1, rows] = means, sums
        self.token_logprobs.update(zip(rows.tolist(), per_token, strict=True))

    def weights(self) -> torch.Tensor:
        """(B*G,) weights, exact for every group whose positives have all been recorded."""
        return popo_weights(
            self.b_scores[0].view_as(self.rewards),
            self.b_scores[1].view_as(self.rewards),
            self.rewards,
            self.mode,
            self.temperature,
            self.threshold,
        ).flatten()


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


def _backward(
    loss: torch.Tensor, metrics: dict, collected: dict[str, list[float]], name: str, replicas
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


def _sync(replicas: Replicated | None, number: int, count: int):
    """All-reduce gradients on the last micro-batch only (data-parallel); nothing on one process."""
    return replicas.sync(number == count - 1) if replicas is not None else nullcontext()


def _zero_policy_gradients(model: nn.Module) -> None:
    """The gradient of the reference's connected zero loss: zeros on every trainable adapter tensor, so
    the optimizer still steps (AdamW's moment decay and weight decay) on a step with no positive."""
    for param in model.parameters():
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)


class _EMATargets:
    """f_xi(y) of positives from the EMA adapter, without gradient; with shared prompts, the step's
    prompts run through the EMA adapter once, at the first micro-batch that needs them."""

    def __init__(
        self,
        model,
        rollouts: Rollouts,
        temperature: float,
        b_rows: torch.Tensor,
        shared_prompts: bool,
        split: bool,
    ) -> None:
        self.model, self.rollouts, self.temperature = model, rollouts, temperature
        self.shared_prompts, self.b_rows, self.prefix = shared_prompts, b_rows, None  # b_rows: the positives
        self.forward = PolicyForward(model, split_by_length=split)

    @torch.no_grad()
    def __call__(self, b_rows: torch.Tensor) -> torch.Tensor:
        """(n+, H) EMA features of the rows `b_rows`."""
        with ema_forward(self.model):
            if self.shared_prompts and self.prefix is None:
                self.prefix = shared_prefix(self.model, self.rollouts, True, self.b_rows)
            outputs = forward_rows(
                self.forward,
                self.rollouts,
                b_rows,
                self.temperature,
                self.prefix,
                with_features=True,
            )
        return outputs[2]


def _popo_micro_batch_loss(
    mb_outputs: tuple,
    mb_weights: torch.Tensor,
    mb_positive: torch.Tensor,
    mb_ema_features: torch.Tensor | None,
    *,
    alpha: float,
    beta_entropy: float,
    entropy_over: str,
    noise_std: float,
    generator: torch.Generator,
    nll_token_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's POPO loss from its policy forward (`mb_outputs`, with gradient) and the EMA
    features of its positives (n+, H). A micro-batch with no positive gives a connected zero."""
    mb_logprobs, mb_entropy, mb_features, mb_predicted, mb_mask = mb_outputs
    mb_target = mb_noise = None
    extra = {}
    if alpha > 0:
        mb_target = torch.zeros_like(mb_features)  # (n, H); zero weight where not positive
        if mb_positive.any():
            mb_target[mb_positive] = mb_ema_features
            cosine = torch.cosine_similarity(mb_features[mb_positive].detach(), mb_ema_features, dim=-1)
            extra["cosine_policy_ema"] = float(cosine.mean())
        mb_noise = torch.randn(mb_target.shape, generator=generator, device="cpu").to(mb_features.device)
        mb_noise = mb_noise * noise_std
    loss, metrics = popo_loss(
        mb_logprobs,
        mb_entropy,
        mb_mask,
        mb_weights,
        mb_positive,
        mb_predicted,
        mb_target,
        mb_noise,
        alpha=alpha,
        beta_entropy=beta_entropy,
        entropy_over=entropy_over,
        nll_token_count=nll_token_count,
    )
    return loss, {**metrics, **extra}


def _weights_from_loss_forward(book: _WeightsBook, mb_rows: torch.Tensor, mb_outputs: tuple) -> torch.Tensor:
    """Packing's path: this micro-batch holds whole groups whose weights were left to its own loss
    forward; record its detached log-probs and return the step's weights, now exact for those groups."""
    mb_logprobs, mb_mask = mb_outputs[0], mb_outputs[-1]
    book.record(mb_rows, *_sequence_scores(mb_logprobs, mb_mask), _token_lists(mb_logprobs, mb_mask))
    return book.weights()


def popo_update(
    model,
    predictor: Predictor,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    config: Config,
    generator: torch.Generator,
    replicas: Replicated | None = None,
    timer=None,
    shuffle_generator: torch.Generator | None = None,
) -> Update:
    """Accumulate POPO gradients for one step; returns (metrics, weights (B*G,), token log-probs by row).

    rewards: (B, G). Weights are per group, from the policy that sampled (no gradient), over positives
    only: a non-positive's weight is 0 whatever its log-prob. `generator` (CPU) draws the similarity
    noise, and `shuffle_generator` the micro-batch shuffle (`generator` when None); the trainer gives
    each its own stream, so an ablation that draws less noise still shuffles alike. On one process a
    micro-batch with no positive is skipped (its loss is exactly zero; it still counts in the divisor),
    and a step with no positive at all gives the policy adapter zero gradients, as the reference's
    connected zero does, so the optimizer still steps.
    `timer` (a PhaseTimer) times the phases "weights", "loss" (forwards and backwards) and "similarity".
    """
    device = rollouts.completion_ids.device
    count, split = rewards.numel(), splits_by_length(config, device)
    b_positive = (rewards > config.reward_threshold).flatten().to(device)  # (B*G,)
    if config.pack_positives:
        micro_batches, b_split = pack_positive_groups(b_positive.view_as(rewards), config.micro_batch_size)
        # rows whose weights come from their own loss forward (exact only without dropout)
        b_deferred = b_positive & ~b_split if config.lora_dropout == 0 else torch.zeros_like(b_positive)
    else:
        shuffle = shuffle_generator if shuffle_generator is not None else generator
        order = batch_order(count, config.shuffle_micro_batches, shuffle, device)
        micro_batches, b_deferred = (
            _micro_batches(order, config.micro_batch_size),
            torch.zeros_like(b_positive),
        )
    if replicas is not None:  # every process runs as many micro-batch backwards as the busiest one
        micro_batches += [None] * (replicas.max_count(len(micro_batches)) - len(micro_batches))

    # 1. Weights, without gradient, from the policy that sampled (eval: no dropout).
    model.eval()
    book = _WeightsBook(
        rewards, config.weight_mode, config.weight_temperature, config.reward_threshold, device
    )
    b_first_pass = (b_positive & ~b_deferred).nonzero().flatten()
    if b_first_pass.numel():
        with _phase(timer, "weights"):
            scores = sequence_logprobs(
                model,
                rollouts,
                b_first_pass,
                config.micro_batch_size,
                config.temperature,
                config.shared_prompts,
                split,
            )
        book.record(b_first_pass, *scores)
    b_weights = book.weights()

    # 2. Loss and backward, micro-batch by micro-batch.
    model.train()
    use_features = config.alpha > 0
    forward = (
        replicas.forward
        if replicas is not None
        else PolicyForward(model, predictor if use_features else None, split)
    )
    b_rows = b_positive.nonzero().flatten()
    ema_targets = _EMATargets(model, rollouts, config.temperature, b_rows, config.shared_prompts, split)
    nll_token_count = None  # the reference: each micro-batch's own positive tokens
    if config.nll_normalization == "step" and micro_batches:  # the step's, shared out over the divisor
        b_positive_tokens = rollouts.completion_mask.sum(1)[b_positive].sum()
        nll_token_count = float(b_positive_tokens) / len(micro_batches)
    prefix = leaves = None  # the step's prompts, run once with gradient for every micro-batch
    if _shares_gradient_prompts(config, replicas) and b_positive.any():
        b_loss_rows = torch.cat([mb for mb in micro_batches if b_positive[mb].any()])  # those that run
        prefix, leaves = _gradient_prompts(model, rollouts, timer, b_loss_rows)
    collected: dict[str, list[float]] = defaultdict(list)
    for number, mb_rows in enumerate(micro_batches):
        stand_in = mb_rows is None or (replicas is not None and not b_positive[mb_rows].any())
        if mb_rows is None:
            mb_rows = torch.zeros(1, dtype=torch.long, device=device)  # any row: its loss is a connected zero
        elif config.entropy_over == "positives" or config.beta_entropy == 0:
            # Only positives can carry a gradient here; under DDP one row stands in for an empty batch.
            mb_rows = mb_rows[b_positive[mb_rows]] if b_positive[mb_rows].any() else mb_rows[:1]
        if not b_positive[mb_rows].any() and replicas is None:
            continue  # the spec's loss here is exactly zero (entropy skipped too): no forward needed
        with _sync(replicas, number, len(micro_batches)):
            with _phase(timer, "loss"):
                mb_outputs = forward_rows(
                    forward,
                    rollouts,
                    mb_rows,
                    config.temperature,
                    leaves,
                    with_entropy=config.beta_entropy > 0,
                    with_features=use_features,
                )
            if b_deferred[mb_rows].any() and not stand_in:
                b_weights = _weights_from_loss_forward(book, mb_rows, mb_outputs)
            mb_positive = b_positive[mb_rows] & (not stand_in)  # a stand-in counts no row as positive
            mb_ema_features = None
            if use_features and mb_positive.any():
                with _phase(timer, "similarity"):
                    mb_ema_features = ema_targets(mb_rows[mb_positive])
            with _phase(timer, "loss"):
                loss, metrics = _popo_micro_batch_loss(
                    mb_outputs,
                    b_weights[mb_rows] * mb_positive,
                    mb_positive,
                    mb_ema_features,
                    alpha=config.alpha,
                    beta_entropy=config.beta_entropy,
                    entropy_over=config.entropy_over,
                    noise_std=config.noise_std,
                    generator=generator,
                    nll_token_count=nll_token_count,
                )
                _backward(loss / len(micro_batches), {} if stand_in else metrics, collected, "POPO", replicas)
    _prompts_backward(prefix, leaves, timer)
    if not collected and replicas is None:
        _zero_policy_gradients(model)
    return Update(_mean_metrics(collected), b_weights, book.token_logprobs)


def grpo_update(
    model,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    config: Config,
    replicas: Replicated | None = None,
    generator: torch.Generator | None = None,
    timer=None,
) -> Update:
    """Accumulate GRPO gradients for one step; returns (metrics, advantages (B*G,), token log-probs by row).

    On-policy (one update per generation), so old log-probs are the detached current ones and the
    ratio is 1 in value; the clipped form is kept so the gradient is GRPO's (docs/algorithm.md section 4).
    The reference policy is the base: the same model with the adapter disabled. `generator` (CPU) draws
    the micro-batch shuffle; without one the rows keep their order. `timer` (a PhaseTimer) times the
    phases "loss" (forwards and backwards) and "reference" (the base's no-grad forward).
    """
    device = rollouts.completion_ids.device
    b_advantages = grpo_advantages(rewards.float()).flatten().to(device)  # (B*G,)
    model.train()
    split = splits_by_length(config, device)
    plain = PolicyForward(model, split_by_length=split)  # the reference's forward too
    forward = replicas.forward if replicas is not None else plain
    order = batch_order(rewards.numel(), config.shuffle_micro_batches, generator, device)
    micro_batches = _micro_batches(order, config.micro_batch_size)
    prefix = leaves = reference_prefix = None  # the step's prompts, run once per pass
    if _shares_gradient_prompts(config, replicas):
        prefix, leaves = _gradient_prompts(model, rollouts, timer)
    if config.grpo_beta > 0 and config.shared_prompts:
        with _phase(timer, "reference"), torch.no_grad(), model.disable_adapter():
            reference_prefix = shared_prefix(model, rollouts, True)
    collected: dict[str, list[float]] = defaultdict(list)
    token_logprobs: dict[int, list[float]] = {}
    for number, mb_rows in enumerate(micro_batches):
        with _sync(replicas, number, len(micro_batches)):
            with _phase(timer, "loss"):
                mb_logprobs, _, _, _, mb_mask = forward_rows(
                    forward, rollouts, mb_rows, config.temperature, leaves
                )
            token_logprobs.update(zip(mb_rows.tolist(), _token_lists(mb_logprobs, mb_mask), strict=True))
            mb_ref_logprobs = None
            if config.grpo_beta > 0:
                with _phase(timer, "reference"), torch.no_grad(), model.disable_adapter():
                    mb_ref_logprobs = forward_rows(
                        plain, rollouts, mb_rows, config.temperature, reference_prefix
                    )[0]
            with _phase(timer, "loss"):
                loss, metrics = grpo_loss(
                    mb_logprobs,
                    mb_logprobs.detach(),
                    b_advantages[mb_rows],
                    mb_mask,
                    mb_ref_logprobs,
                    clip_eps=config.grpo_clip_eps,
                    beta=config.grpo_beta,
                    normalization=config.grpo_normalization,
                )
                _backward(loss / len(micro_batches), metrics, collected, "GRPO", replicas)
    _prompts_backward(prefix, leaves, timer)
    return Update(_mean_metrics(collected), b_advantages, token_logprobs)


@torch.no_grad()
def kl_policy_ema(
    model,
    rollouts: Rollouts,
    micro_batch_size: int,
    temperature: float,
    shared_prompts: bool = False,
    split_by_length: bool = False,
) -> float:
    """KL(policy || EMA) by the k3 estimator on this step's completions: monitoring only."""
    model.eval()
    forward = PolicyForward(model, split_by_length=split_by_length)
    policy_prefix = shared_prefix(model, rollouts, shared_prompts)
    with ema_forward(model):
        ema_prefix = shared_prefix(model, rollouts, shared_prompts)
    b_rows = torch.arange(rollouts.completion_ids.shape[0], device=rollouts.completion_ids.device)
    values, tokens = [], []
    for mb_rows in _micro_batches(b_rows, micro_batch_size):
        mb_policy, _, _, _, mb_mask = forward_rows(forward, rollouts, mb_rows, temperature, policy_prefix)
        with ema_forward(model):
            mb_ema = forward_rows(forward, rollouts, mb_rows, temperature, ema_prefix)[0]
        values.append(float(kl_k3(mb_policy, mb_ema, mb_mask)) * float(mb_mask.sum()))
        tokens.append(float(mb_mask.sum()))
    return sum(values) / max(sum(tokens), 1.0)
