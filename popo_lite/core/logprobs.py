"""Per-token log-probs, entropies and pooled final hidden states of completions, in one forward.

Logits are never held as B x T x V in fp32 at once: the vocabulary projection, log-softmax and
entropy run in chunks of completion positions, each under activation checkpointing when the model
checkpoints its layers, so backward recomputes one chunk's logits at a time (docs/measurements.md
section 1.3: full fp32 logits dominate memory). Without gradient checkpointing (the planner found that
the step fits) the chunks keep their logits too: no recomputation at all.

Shared prompts (`PromptPrefix`): a group's G rollouts have one prompt, so the prompt can run through the
decoder once and each completion attend to its keys and values instead of recomputing them. With
gradient, the prefix's tensors enter each micro-batch as detached leaves; their gradients add up over
the step's micro-batches, and one backward through the prompt forward at the end (`backward`) gives the
LoRA gradient of the prompt tokens summed over the group, exactly what G separate forwards give.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class CompletionStats:
    logprobs: torch.Tensor  # (N, T) log pi(y_t | x, y_<t), logits / temperature
    entropy: torch.Tensor | None  # (N, T) entropy of pi(. | x, y_<t)
    features: torch.Tensor | None  # (N, H) final hidden state (after the last norm), mean over completion


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them, so scoring matches sampling."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class PromptPrefix:
    """Distinct prompts run through the decoder once: each layer's keys and values, and the final hidden
    state at the last prompt position (it predicts a completion's first token)."""

    keys: list[torch.Tensor]  # per layer (U, kv_heads, P, head_dim)
    values: list[torch.Tensor]  # per layer (U, kv_heads, P, head_dim)
    last_hidden: torch.Tensor  # (U, H), after the final norm
    mask: torch.Tensor  # (U, P) left-padded prompt mask
    group_rows: torch.Tensor | None = None  # (B,) the prefix row of each of the step's groups (-1: not run)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, self.last_hidden]

    def leaves(self) -> PromptPrefix:
        """The same values as detached leaves that collect their gradient over the step's micro-batches."""
        layers = len(self.keys)
        leaves = [tensor.detach().requires_grad_() for tensor in self.tensors()]
        return PromptPrefix(leaves[:layers], leaves[layers:-1], leaves[-1], self.mask, self.group_rows)

    def backward(self, leaves: PromptPrefix) -> None:
        """Backpropagate the gradients `leaves` collected through the prompt forward, once."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.tensors(), leaves.tensors(), strict=True)]
        pairs = [(tensor, grad) for tensor, grad in pairs if grad is not None]
        if pairs:
            torch.autograd.backward([tensor for tensor, _ in pairs], [grad for _, grad in pairs])

    def cache(self, rows: torch.Tensor) -> DynamicCache:
        """A KV cache holding prompt `rows[i]` for completion row i (index_select: gradients add up)."""
        return DynamicCache(
            ddp_cache_data=[(k[rows], v[rows]) for k, v in zip(self.keys, self.values, strict=True)]
        )


def prompt_prefix(
    model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, chunk: int | None = None
) -> PromptPrefix | None:
    """Run each prompt (U, P), left-padded, through the decoder once; with gradient unless under no_grad.

    `chunk` feeds that many positions per forward (generation's prefill_chunk_size), each attending to
    the cache of the ones before. None where the model's cache is not one plain full-attention layer per
    decoder layer (sliding-window or hybrid caches): callers then score each row with its own prompt.
    """
    decoder, positions, width = _base(model).get_decoder(), position_ids_for(prompt_mask), prompt_ids.shape[1]
    cache = output = None
    for start in range(0, width, chunk or width):
        end = min(start + (chunk or width), width)
        output = decoder(
            input_ids=prompt_ids[:, start:end],
            attention_mask=prompt_mask[:, :end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
        )
        cache = output.cache
    if cache is None or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PromptPrefix(keys, values, output.last_hidden_state[:, -1], prompt_mask)


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
    prefix: PromptPrefix | None = None,
    prefix_rows: torch.Tensor | None = None,
    checkpoint_chunks: bool | None = None,
) -> CompletionStats:
    """Score completions `input_ids[:, prompt_length:]` under `model` (a PeftModel or a plain causal LM).

    input_ids, attention_mask: (N, P + T), prompts left-padded to P; completion_mask: (N, T).
    With `prefix` (the prompts run once, `prompt_prefix`) and `prefix_rows` (N,), row i's prompt is
    prefix row `prefix_rows[i]`: input_ids and attention_mask then hold the completions only (N, T)
    and prompt_length is 0. `checkpoint_chunks` (None: as the model's gradient checkpointing) recomputes
    each chunk's logits in backward instead of keeping them.
    """
    base = _base(model)
    if checkpoint_chunks is None:  # transformers 5 renames the flag (the old name warns)
        renamed = hasattr(type(base), "is_activation_checkpointing")
        checkpoint_chunks = bool(
            getattr(base, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", True)
        )
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if prefix is not None:
        attention_mask = torch.cat([prefix.mask[prefix_rows], attention_mask], dim=1)  # (N, P + T)
        completion_hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask)[:, prefix.mask.shape[1] :],
            cache=prefix.cache(prefix_rows),
            use_cache=True,  # the completions attend to the prompts' cached keys and values
        ).last_hidden_state  # (N, T, H)
        first = prefix.last_hidden[prefix_rows].unsqueeze(1)  # (N, 1, H): predicts completion token 1
        predicting = torch.cat([first, completion_hidden[:, :-1]], dim=1)  # (N, T, H)
        hidden, prompt_length, completion_length = completion_hidden, 0, input_ids.shape[1]
    else:
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
        if torch.is_grad_enabled() and checkpoint_chunks:
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
