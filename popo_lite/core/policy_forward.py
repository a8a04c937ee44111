"""The trainable forward of one micro-batch as one module: policy log-probs (+ entropy, features) and the
predictor on the features.

Every gradient forward of an update goes through it; under `accelerate launch` DDP wraps this same
module (`training/distributed.py`), so its gradient hooks see the chunked forward.

`split_by_length`: a micro-batch's completions are right-padded to its longest one, so one 32-token
completion makes fifteen 5-token ones cost 32 positions each. The rows then run in two forwards of
similar lengths, each cut to its own longest (`length_pieces`), and the outputs are put back in row
order, zero past each row's piece. Every row's valid positions see the same tokens as in one forward
(completions are causal and right-padded), so the values are the same to float rounding
(tests/test_length_pieces.py). The trainer splits on a CPU (`Config.split_by_length: auto`).
"""

from __future__ import annotations

import torch
from torch import nn

from popo_lite.core.logprobs import PromptPrefix, completion_stats


class PolicyForward(nn.Module):
    """The trainable forward as one module: completion log-probs (+ entropy, features) under the policy,
    and the predictor on the features. DDP wraps this, so its gradient hooks see the chunked forward."""

    def __init__(
        self, model: nn.Module, predictor: nn.Module | None = None, split_by_length: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.predictor = predictor
        self.split_by_length = split_by_length

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

        def stats(rows: torch.Tensor | None):
            """completion_stats of some rows (None: all of them, as given), cut to their longest."""
            if rows is None:
                ids, mask, completions, prompts = input_ids, attention_mask, completion_mask, prefix_rows
            else:
                width = max(int(completion_mask[rows].sum(1).max()), 1)
                end = prompt_width + width
                ids, mask, completions = (
                    input_ids[rows, :end],
                    attention_mask[rows, :end],
                    completion_mask[rows, :width],
                )
                prompts = prefix_rows[rows] if prefix_rows is not None else None
            out = completion_stats(
                self.model,
                ids,
                mask,
                prompt_width,
                completions,
                temperature,
                with_entropy=with_entropy,
                with_features=with_features,
                prefix=prefix,
                prefix_rows=prompts,
            )
            return out.logprobs, out.entropy, out.features

        pieces = length_pieces(completion_mask.sum(1)) if self.split_by_length else None
        if pieces is None:
            logprobs, entropy, features = stats(None)
        else:
            outputs = [stats(rows) for rows in pieces]
            logprobs, entropy, features = _in_row_order(outputs, pieces, completion_mask)
        predicted = None
        if with_features and self.predictor is not None:
            predicted = self.predictor(features)
        return logprobs, entropy, features, predicted


def length_pieces(lengths: torch.Tensor, saving: float = 0.2) -> list[torch.Tensor] | None:
    """Two groups of rows (shortest completions first) whose padded positions add up to the fewest,
    or None where that saves less than `saving` of one forward's (n x longest) positions.

    lengths: (n,) completion lengths. E.g. [5, 32, 6, 4]: rows [3, 0, 2] at width 6 and row [1] at 32,
    18 + 32 = 50 positions against 128.
    """
    n = lengths.shape[0]
    if n < 2:
        return None
    ordered, order = torch.sort(lengths.clamp(min=1), stable=True)
    longest = int(ordered[-1])
    costs = [k * int(ordered[k - 1]) + (n - k) * longest for k in range(1, n)]
    best = min(range(len(costs)), key=costs.__getitem__)
    if costs[best] > (1 - saving) * n * longest:
        return None
    return [order[: best + 1], order[best + 1 :]]


def _pad_to(values: torch.Tensor | None, completion_mask: torch.Tensor) -> torch.Tensor | None:
    """(n, t) per-position values padded with zeros to the mask's width T (masked positions)."""
    if values is None or values.shape[1] == completion_mask.shape[1]:
        return values
    return nn.functional.pad(values, (0, completion_mask.shape[1] - values.shape[1]))


def _in_row_order(outputs: list[tuple], pieces: list[torch.Tensor], completion_mask: torch.Tensor) -> tuple:
    """The pieces' (log-probs, entropy, features) as one batch in the rows' own order."""
    inverse = torch.argsort(torch.cat(pieces))
    joined = []
    for index, values in enumerate(zip(*outputs, strict=True)):
        if values[0] is None:
            joined.append(None)
            continue
        if index < 2:  # per-position values: zero past each piece's width
            values = [_pad_to(piece, completion_mask) for piece in values]
        joined.append(torch.cat(values)[inverse])
    return tuple(joined)
