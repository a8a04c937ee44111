"""How a micro-batch's rows reach the policy forward (`PolicyForward` or its DDP wrapper).

Either the rows whole, prompt and completion, trimmed to the columns any of them uses (`rows_of`),
or, with shared prompts, only their completions on the step's distinct prompts run once
(`shared_prefix`): the G rollouts of a prompt share it, so its forward is done once per step instead
of G times. Rows i*G .. i*G + G - 1 share prompt i. `forward_rows` takes either path; the values
are the same to float rounding (tests/test_shared_prompts.py).
"""

from __future__ import annotations

import torch
from torch import nn

from popo_lite.core.logprobs import PromptPrefix, prompt_prefix
from popo_lite.core.rollouts import Rollouts


def rows_of(
    rollouts: Rollouts, mb_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """input_ids, attention_mask, prompt width and completion mask of some rows, padding columns trimmed."""
    mb_prompt_mask = rollouts.prompt_mask[mb_rows]
    mb_completion_mask = rollouts.completion_mask[mb_rows]
    first = int((mb_prompt_mask.sum(0) > 0).nonzero()[0]) if mb_prompt_mask.any() else 0
    width = max(int(mb_completion_mask.sum(1).max()), 1)
    mb_prompt_ids = rollouts.prompt_ids[mb_rows, first:]
    mb_completion_ids = rollouts.completion_ids[mb_rows, :width]
    mb_completion_mask = mb_completion_mask[:, :width]
    mb_input_ids = torch.cat([mb_prompt_ids, mb_completion_ids], dim=1)  # (n, P' + T')
    mb_attention_mask = torch.cat([mb_prompt_mask[:, first:], mb_completion_mask], dim=1)
    return mb_input_ids, mb_attention_mask, mb_prompt_ids.shape[1], mb_completion_mask


def forward_rows(
    forward: nn.Module,
    rollouts: Rollouts,
    mb_rows: torch.Tensor,
    temperature: float,
    prefix: PromptPrefix | None = None,
    **flags,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(token log-probs (n, T'), entropy, features (n, H), predicted (n, H), completion mask (n, T')) of
    `mb_rows` through `forward` (a PolicyForward or its DDP wrapper); with gradient unless under no_grad.
    With `prefix` (the step's prompts run once, `shared_prefix`), only the completions run here."""
    if prefix is None:
        input_ids, attention_mask, prompt_width, completion_mask = rows_of(rollouts, mb_rows)
        outputs = forward(input_ids, attention_mask, prompt_width, completion_mask, temperature, **flags)
        return (*outputs, completion_mask)
    width = max(int(rollouts.completion_mask[mb_rows].sum(1).max()), 1)
    completion_ids = rollouts.completion_ids[mb_rows, :width]  # (n, T')
    completion_mask = rollouts.completion_mask[mb_rows, :width]
    prefix_rows = mb_rows // rollouts.group_size  # rows i*G .. i*G + G - 1 share prompt i
    if prefix.group_rows is not None:  # a prefix of some groups only
        prefix_rows = prefix.group_rows[prefix_rows]
    outputs = forward(
        completion_ids,
        completion_mask,
        0,
        completion_mask,
        temperature,
        prefix=prefix,
        prefix_rows=prefix_rows,
        **flags,
    )
    return (*outputs, completion_mask)


def shared_prefix(
    model, rollouts: Rollouts, enabled: bool, b_rows: torch.Tensor | None = None
) -> PromptPrefix | None:
    """The step's distinct prompts (those of the groups of `b_rows`, all B without) run through `model`
    once, with gradient unless under no_grad; or None: `shared_prompts` off, or a model whose cache
    cannot be shared (`prompt_prefix`). Under gradient checkpointing transformers builds no cache in a
    training forward, so that case is None too."""
    group = rollouts.group_size
    rows, width = rollouts.prompt_ids.shape
    if not enabled or rows % group:
        return None
    grouped = rollouts.prompt_ids.view(rows // group, group, width)  # (B, G, P)
    if not bool((grouped == grouped[:, :1]).all()):  # a record whose groups do not share their prompt
        return None
    groups, group_rows = torch.arange(rows // group, device=rollouts.prompt_ids.device), None
    if b_rows is not None:
        groups = torch.unique(b_rows // group)  # (U,)
        group_rows = torch.full((rows // group,), -1, dtype=torch.long, device=groups.device)
        group_rows[groups] = torch.arange(len(groups), device=groups.device)
    prompt_mask = rollouts.prompt_mask[::group][groups]  # (U, P)
    first = int((prompt_mask.sum(0) > 0).nonzero()[0]) if prompt_mask.any() else 0
    prefix = prompt_prefix(model, rollouts.prompt_ids[::group][groups, first:], prompt_mask[:, first:])
    if prefix is not None:
        prefix.group_rows = group_rows
    return prefix
