"""The trainable forward of one micro-batch as one module: policy log-probs (+ entropy, features) and the
predictor on the features.

Every gradient forward of an update goes through it; under `accelerate launch` DDP wraps this same
module (`training/distributed.py`), so its gradient hooks see the chunked forward.
"""

from __future__ import annotations

import torch
from torch import nn

from popo_lite.core.logprobs import PromptPrefix, completion_stats


class PolicyForward(nn.Module):
    """The trainable forward as one module: completion log-probs (+ entropy, features) under the policy,
    and the predictor on the features. DDP wraps this, so its gradient hooks see the chunked forward."""

    def __init__(self, model: nn.Module, predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.predictor = predictor

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        completion_mask: torch.Tensor,
        temperature: float,
        with_entropy: bool = False,
        with_features: bool = False,
        prefix: PromptPrefix | None = None,
        prefix_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(log-probs (N, T), entropy (N, T) or None, features (N, H) or None, predicted (N, H) or None).

        With `prefix`, the rows' prompts come from it (`completion_stats`): input_ids hold completions only.
        """
        stats = completion_stats(
            self.model,
            input_ids,
            attention_mask,
            prompt_width,
            completion_mask,
            temperature,
            with_entropy=with_entropy,
            with_features=with_features,
            prefix=prefix,
            prefix_rows=prefix_rows,
        )
        predicted = None
        if with_features and self.predictor is not None:
            predicted = self.predictor(stats.features)
        return stats.logprobs, stats.entropy, stats.features, predicted
