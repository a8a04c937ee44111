"""Per-token log-probs, entropies and pooled final hidden states of completions, in one forward.

Logits are never held as B x T x V in fp32 at once: the vocabulary projection, log-softmax and
entropy run in chunks of completion positions, each under activation checkpointing, so backward
recomputes one chunk's logits at a time (docs/measurements.md section 1.3: full fp32 logits dominate memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint


@dataclass
class CompletionStats:
    logprobs: torch.Tensor  # (N, T) log pi(y_t | x, y_<t), logits / temperature
    entropy: torch.Tensor | None  # (N, T) entropy of pi(. | x, y_<t)
    features: torch.Tensor | None  # (N, H) final hidden state (after the last norm), mean over completion


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them, so scoring matches sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _chunk_stats(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float() / temperature  # (N, C, V), one chunk only
    log_probs = torch.log_softmax(logits, dim=-1)
    token_logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, C)
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1)  # (N, C)
    else:
        entropy = torch.zeros_like(token_logprobs)
    return token_logprobs, entropy


def completion_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_features: bool = False,
    chunk_size: int = 128,
) -> CompletionStats:
    """Score completions `input_ids[:, prompt_length:]` under `model` (a PeftModel or a plain causal LM).

    input_ids, attention_mask: (N, P + T), prompts left-padded to P; completion_mask: (N, T).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,  # scoring, not decoding
    ).last_hidden_state  # (N, P + T, H), after the final norm
    completion_length = input_ids.shape[1] - prompt_length
    predicting = hidden[:, prompt_length - 1 : prompt_length - 1 + completion_length]  # (N, T, H)
    targets = input_ids[:, prompt_length:]  # (N, T)
    logprob_chunks, entropy_chunks = [], []
    for start in range(0, completion_length, chunk_size):
        args = (predicting[:, start : start + chunk_size], targets[:, start : start + chunk_size])
        if torch.is_grad_enabled():
            logp, ent = checkpoint(_chunk_stats, *args, head, temperature, with_entropy, use_reentrant=False)
        else:
            logp, ent = _chunk_stats(*args, head, temperature, with_entropy)
        logprob_chunks.append(logp)
        entropy_chunks.append(ent)
    features = None
    if with_features:
        mask = completion_mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        summed = (hidden[:, prompt_length:] * mask).sum(1).float()  # (N, H)
        features = summed / completion_mask.sum(1, keepdim=True).clamp(min=1).float()
    return CompletionStats(
        logprobs=torch.cat(logprob_chunks, dim=1),
        entropy=torch.cat(entropy_chunks, dim=1) if with_entropy else None,
        features=features,
    )
