"""The record of one step's rollouts: token ids and masks of B prompts x G completions.

It lives in core because the objective's update (`core/updates.py`) reads it and every rollout engine
(`engine/`) builds it: core imports nothing from engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # (B*G, P) left-padded, grouped: rows i*G .. i*G+G-1 share prompt i
    prompt_mask: torch.Tensor  # (B*G, P)
    completion_ids: torch.Tensor  # (B*G, T) right-padded after the first EOS
    completion_mask: torch.Tensor  # (B*G, T) 1 up to and including the first EOS
    texts: list[str]  # (B*G,) decoded completions, special tokens dropped
    group_size: int
    seconds: float

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (B*G, P + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask.sum())
