"""The matmul FLOPs each phase of a training step must do, counted from the model's shapes and the
batch's real token counts (bench/step_cost.py divides them by this CPU's measured GEMM rate).

Counted: every matmul, 2 FLOPs per multiply-add: the decoder Linears, LoRA's A and B, attention's
scores and weighted sum over the causal context a token really has (padding excluded), and the LM
head where a phase needs logits. Not counted: norms, activations, softmax, sampling, RoPE, the
predictor head (under 0.1 % here) and the optimizer (elementwise; its floor is a bare AdamW step,
timed by the benchmark).

The floor is that of a prompt-sharing design: a group's G rollouts share one prompt, so
each pass runs a group's prompt once (once per adapter) and each completion attends to it. The same
counts with one prompt per rollout (today's work) come with `shared=False`.

Backward through a frozen base needs only the input gradient (one more matmul per Linear, ~1x its
forward), attention's four backward matmuls (2x its forward) and LoRA's input and weight gradients
(2x its forward): a pass with gradient costs 2 x base + 3 x LoRA + 3 x attention + 2 x head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from popo_lite.planning.estimate import ModelShape


@dataclass(frozen=True)
class Batch:
    """One step's real token counts: rows i*G .. i*G + G - 1 share prompt i."""

    prompt_tokens: tuple[int, ...]  # (B,) each group's prompt, without padding
    completion_tokens: tuple[int, ...]  # (B*G,) each completion, up to and including its EOS
    positive: tuple[bool, ...]  # (B*G,) reward above the threshold

    @property
    def group_size(self) -> int:
        return len(self.completion_tokens) // len(self.prompt_tokens)


@dataclass(frozen=True)
class PerToken:
    """Forward FLOPs per token (base Linears, LoRA, LM head) and per (query, key) pair (attention)."""

    base: int
    lora: int
    head: int
    attention: int


def per_token(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> PerToken:
    linears = shape.linears()
    base = 2 * shape.layers * sum(i * o for i, o in linears.values())
    lora = 2 * shape.layers * sum(rank * (i + o) for name, (i, o) in linears.items() if name in targets)
    attention = 2 * 2 * shape.layers * shape.heads * shape.head_width  # q.k and the weighted sum of v
    return PerToken(base, lora, 2 * shape.hidden * shape.vocab, attention)


def pairs(new: int, before: int) -> int:
    """Causal (query, key) pairs of `new` tokens appended to `before` cached ones."""
    return new * before + new * (new + 1) // 2


def pass_flops(
    cost: PerToken,
    batch: Batch,
    rows: list[int],
    *,
    shared: bool,
    lora: bool = True,
    head: bool = True,
    grad: bool = False,
    generation: bool = False,
) -> int:
    """FLOPs of one pass over `rows` (prompt + completion each; a group's prompt once when `shared`).

    generation: the last sampled token is never fed back, so T - 1 completion tokens are fed per row;
    logits come at T positions either way (the prompt's last one and each fed completion token).
    """
    tokens = attended = logits = 0
    groups: set[int] = set()
    for row in rows:
        group = row // batch.group_size
        prompt, completion = batch.prompt_tokens[group], batch.completion_tokens[row]
        fed = max(completion - 1, 0) if generation else completion
        if shared and group in groups:
            tokens += fed
            attended += pairs(fed, prompt)
        else:
            tokens += prompt + fed
            attended += pairs(prompt + fed, 0)
        groups.add(group)
        logits += completion
    linear = cost.base + (cost.lora if lora else 0)
    forward = tokens * linear + attended * cost.attention + (logits * cost.head if head else 0)
    if not grad:
        return forward
    backward = tokens * (cost.base + (2 * cost.lora if lora else 0)) + 2 * attended * cost.attention
    return forward + backward + (logits * cost.head if head else 0)


def expected_rows_with_positive(batch: Batch, micro_batch_size: int) -> float:
    """Rows in micro-batches holding a positive, over a uniform shuffle of the step's rows.

    The spec skips a micro-batch without positive (its loss, entropy included, is exactly zero), so
    with the entropy over all rows this is what the loss must touch: a micro-batch of s rows misses
    all k positives of N rows with probability C(N - s, k) / C(N, k).
    """
    count, positives = len(batch.positive), sum(batch.positive)
    expected = 0.0
    for start in range(0, count, micro_batch_size):
        size = min(micro_batch_size, count - start)
        empty = math.comb(count - size, positives) / math.comb(count, positives) if positives else 1.0
        expected += size * (1 - empty)
    return expected


def step_flops(
    shape: ModelShape,
    rank: int,
    targets: tuple[str, ...],
    batch: Batch,
    settings: dict,
    shared: bool = True,
) -> dict[str, int]:
    """Matmul FLOPs per phase of one step. settings: the config's algo, alpha, beta_entropy,
    entropy_over, grpo_beta, micro_batch_size and whether the KL monitor ran (`kl`)."""
    cost = per_token(shape, rank, targets)
    every = list(range(len(batch.completion_tokens)))
    positives = [row for row in every if batch.positive[row]]
    # generation with merged adapter weights (exact in fp32 up to rounding): no LoRA matmuls
    flops = {"generate": pass_flops(cost, batch, every, shared=shared, lora=False, generation=True)}
    if settings["algo"] == "grpo":
        flops["loss"] = pass_flops(cost, batch, every, shared=shared, grad=True)
        if settings["grpo_beta"] > 0:  # the reference: the base, adapter disabled, no gradient
            flops["reference"] = pass_flops(cost, batch, every, shared=shared, lora=False)
        return flops
    flops["weights"] = pass_flops(cost, batch, positives, shared=shared)
    if settings["beta_entropy"] > 0 and settings["entropy_over"] == "all" and positives:
        # every row, scaled to the share of rows whose micro-batch holds a positive
        share = expected_rows_with_positive(batch, settings["micro_batch_size"]) / len(every)
        flops["loss"] = round(share * pass_flops(cost, batch, every, shared=shared, grad=True))
    else:
        flops["loss"] = pass_flops(cost, batch, positives, shared=shared, grad=True)
    if settings["alpha"] > 0:  # the EMA adapter's features of the positives: no logits needed
        flops["similarity"] = pass_flops(cost, batch, positives, shared=shared, head=False)
    if settings.get("kl"):  # policy and EMA log-probs of every row: two adapters, two prompt passes
        flops["kl"] = 2 * pass_flops(cost, batch, every, shared=shared)
    return flops
