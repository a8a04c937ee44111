"""Hugging Face's sampling loop with the decoding forward over the rows that have not ended.

`generate` decodes every row of a batch until the longest one ends, so a row that stopped at token 5 of
32 still runs 27 forwards whose tokens are thrown away. `decode_unfinished_rows` is a `custom_generate`
callable: `generate` prepares everything as usual (logits processors, stopping criteria, positions, the
KV cache, a shared prefill) and hands the decoding loop to it. It is `_sample`'s loop with one change:
each forward runs only the unfinished rows, and the KV cache drops a row once it ends.

The random draws stay those of the whole batch. The logits processors, the softmax and
`torch.multinomial` see all rows, the finished ones holding zeros, and a finished row's token is
replaced by padding as `generate` does. The same random numbers go to the same rows, so each row samples
the token `generate` samples whenever its logits are the same (tests/test_rollouts_decoding.py compares
the two loops token for token).

On a CPU the decoding matmuls scale with the rows (docs/measurements.md section 2.6). A GPU decodes a
small batch at the cost of reading the weights, and dropping rows there needs a device sync at every
step, so the trainer uses this loop on a CPU only (`Config.decode_unfinished_rows`).
"""

from __future__ import annotations

import torch


def decode_unfinished_rows(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.Tensor:
    """(N, P + T) prompt and sampled ids, as `generate` returns them, decoding only unfinished rows.

    Receives what `generate` passes its decoding method (`custom_generate=decode_unfinished_rows`): the
    prompt ids, the prepared logits processors and stopping criteria, and the model inputs (the cache,
    the attention mask, the position ids, and anything else the forward takes).
    """
    if synced_gpus or streamer is not None or generation_config.return_dict_in_generate:
        raise ValueError("decode_unfinished_rows: no synced GPUs, streamer or dict output")
    cache = model_kwargs.pop("cache")
    mask = model_kwargs.pop("attention_mask", None)
    if mask is None:  # generate drops a mask of all ones
        mask = torch.ones_like(input_ids)
    positions = model_kwargs.pop("position_ids", None)
    if positions is None:  # as generate makes them: left padding skipped
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    model_kwargs.pop("use_cache", None)
    rows, pad = input_ids.shape[0], generation_config.pad_token_id
    active = torch.arange(rows, device=input_ids.device)  # the rows that still decode, in row order
    unfinished = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    past = cache.get_seq_length()  # a prefill passed in: only the rest of the prompt runs
    step_ids, step_positions = input_ids[:, past:], positions[:, past:]
    chunk = generation_config.prefill_chunk_size  # the prefill only: a decoding step is one position
    while True:
        logits = _forward(model, step_ids, mask[active], step_positions, cache, chunk, model_kwargs)
        scores = logits.new_zeros((rows, logits.shape[-1]), dtype=torch.float32)
        scores[active] = logits.float()  # finished rows keep zeros: drawn for, then replaced by padding
        scores = logits_processor(input_ids, scores)
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        tokens = tokens.masked_fill(~unfinished, pad)
        input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=-1)
        positions = positions[:, -1:] + 1  # (N, 1): each row's next position
        unfinished &= ~stopping_criteria(input_ids, None)  # generate passes no scores either
        if not unfinished.any():
            return input_ids
        going_on = unfinished[active]  # (len(active),)
        if not going_on.all():
            cache.batch_select_indices(going_on.nonzero().squeeze(1))
            active = active[going_on]
        step_ids, step_positions = tokens[active, None], positions[active]


def _forward(model, ids, mask, positions, cache, chunk: int | None, model_kwargs: dict) -> torch.Tensor:
    """The last position's logits (n, V) of `ids` (n, W) after the cache, `chunk` positions per forward."""
    past, width = mask.shape[1] - ids.shape[1], ids.shape[1]
    for start in range(0, width, chunk or width):
        end = min(start + (chunk or width), width)
        output = model(
            input_ids=ids[:, start:end],
            attention_mask=mask[:, : past + end],
            position_ids=positions[:, start:end],
            cache=cache,
            use_cache=True,
            **model_kwargs,
        )
    return output.logits[:, -1]
