"""Sampling B prompts x G completions with Hugging Face `generate`, keeping token ids and masks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import CompileConfig

from popo_lite.core.logprobs import prompt_prefix
from popo_lite.core.rollouts import Rollouts
from popo_lite.engine.decoding import decode_unfinished_rows

CACHES = ("dynamic", "static", "paged")  # Config.generation_cache
PAGE_SIZE = 256  # tokens per page of the paged cache (transformers' ContinuousBatchingConfig default)


def completion_mask_from(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    eos_seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (N, T)
    return (~eos_seen_before).long()


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cache_options(cache: str, device: torch.device) -> dict:
    """`generate` arguments for a KV cache choice (Config.generation_cache)."""
    if cache not in CACHES:
        raise ValueError(f"cache: {cache!r} is not one of {', '.join(CACHES)}")
    if cache in ("dynamic", "paged"):  # paged: continuous batching, not `generate` (_continuous_batching)
        return {}
    options: dict = {"cache_implementation": "static"}
    if device.type == "cuda":
        # generate compiles the decoding forward (not the prefill) once the cache is static; transformers'
        # defaults: inductor, reduce-overhead (CUDA graphs). A new batch or cache length compiles again.
        # On a CPU transformers never compiles (`_valid_auto_compile_criteria`): static cache only.
        options["compile_config"] = CompileConfig()
    return options


@contextmanager
def _compilable(model) -> Iterator[None]:
    """Lift transformers' compile veto on a bitsandbytes-quantised base for the span of a `generate`.

    transformers 5.24 compiles only if the model's quantiser says it can, and its bitsandbytes quantiser
    inherits "no" (`HfQuantizer.is_compileable`). Its NF4 layers are plain bnb `Linear4bit`s, which
    decoded 1.6x faster compiled with a static cache (docs/measurements.md section 1.4, a hand-built NF4
    model that had no quantiser attached to veto it).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or method != "bitsandbytes":
        yield
        return
    base.hf_quantizer = None
    try:
        yield
    finally:
        base.hf_quantizer = quantizer


@contextmanager
def generation_mode(model) -> Iterator[None]:
    """The model in eval mode for generation (no dropout; no checkpointing: the KV cache), then as it was.

    A model loaded by `model_loader: unsloth` carries its own switch (Unsloth's for_inference /
    for_training, unsloth_backend.py).
    """
    switch = getattr(model, "popo_lite_generation_mode", None)
    if switch is not None:
        with switch(model):
            yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_rollouts(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_prompt_tokens: int = 512,
    batch_size: int | None = None,
    cache: str = "dynamic",
    prefill_chunk_size: int | None = None,
    shared_prompts: bool = True,
    unfinished_rows_only: bool | str = "auto",
) -> Rollouts:
    """Sample `group_size` completions for each prompt with the model's active adapter.

    temperature 0 means greedy decoding (evaluation); training always samples. `cache` "static" is
    HF's static KV cache, compiled on CUDA (Config.generation_cache); it samples the same tokens.
    "paged" is transformers' continuous batching instead of `generate` (same greedy tokens).
    `shared_prompts` (dynamic cache): each distinct prompt is prefilled once and its KV cache copied to
    its rows (`_shared_prefill`); the same tokens as G prefills. `unfinished_rows_only` (dynamic cache):
    each decoding forward runs only the rows that have not ended (`decoding.py`); the same tokens;
    "auto" on a CPU only (Config.decode_unfinished_rows).
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    cache_options = _cache_options(cache, device)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, group_size, max_prompt_tokens, device)
    stop_ids = eos_ids(model, tokenizer)
    if temperature == 0:
        # None clears sampling knobs a model's generation_config may carry (Qwen ships temperature 0.7).
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    generation = {
        **sampling,
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with generation_mode(model):
        if cache == "paged":
            completions = _continuous_batching(
                model, prompt_ids, prompt_mask, group_size, generation, prefill_chunk_size
            )
        else:
            if prefill_chunk_size is not None:  # prompts enter the KV cache this many positions per forward
                cache_options["prefill_chunk_size"] = prefill_chunk_size
            options = {**generation, **cache_options, "use_cache": True}
            # Unsloth's own inference path and the static cache build their caches themselves
            plain_dynamic = cache == "dynamic" and getattr(model, "popo_lite_generation_mode", None) is None
            shared = (group_size, prefill_chunk_size) if shared_prompts and plain_dynamic else None
            if unfinished_rows_only == "auto":
                unfinished_rows_only = device.type == "cpu"
            if unfinished_rows_only and plain_dynamic:
                options["custom_generate"] = decode_unfinished_rows
            completions = _generate_by_length(
                model, prompt_ids, prompt_mask, options, batch_size, cache, shared
            )
    return assemble(prompt_ids, prompt_mask, [completions], tokenizer, stop_ids, group_size, start)


def _shared_prefill(
    model, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, group_size: int, chunk: int | None
):
    """A DynamicCache of every row's prompt but its last token, each distinct prompt prefilled once
    (`chunk` positions per forward when given).

    ids, mask: (n, P) the batch's left-padded prompts; rows: (n,) their rows in the step (row // G is the
    prompt). `generate` then runs the last prompt token itself, as after any prefill of its own, and
    decodes on: the same positions, logits and random draws as G separate prefills. None where the
    model's cache cannot be shared (`prompt_prefix`) or a prompt is one token wide.
    """
    if ids.shape[1] < 2:
        return None
    prompts, inverse = torch.unique(rows // group_size, return_inverse=True)  # (U,), (n,)
    first = torch.zeros(len(prompts), dtype=torch.long, device=ids.device)
    first[inverse] = torch.arange(len(rows), device=ids.device)  # one row per prompt (all rows alike)
    prefix = prompt_prefix(model, ids[first, :-1], mask[first, :-1], chunk)
    return prefix.cache(inverse) if prefix is not None else None


def _generate_by_length(
    model, prompt_ids, prompt_mask, options: dict, batch_size: int | None, cache: str, shared=None
) -> torch.Tensor:
    """Completion ids (B*G, T) from HF `generate`, `batch_size` rows per call, in the rows' order.

    Smaller batches are formed by prompt length (stable: a group's rows stay together), each cut to its
    longest prompt, so short prompts do not carry a long one's left padding through every decoding step.
    Not with the static cache: one cache length, one compile. With `shared` = (group size, prefill
    chunk), each batch's distinct prompts are prefilled once (`_shared_prefill`).
    """
    rows = prompt_ids.shape[0]
    step = min(batch_size or rows, rows)
    order = torch.sort(prompt_mask.sum(1), stable=True).indices if step < rows else torch.arange(rows)
    pieces = []
    with _compilable(model) if "compile_config" in options else nullcontext():
        for first in range(0, rows, step):
            index = order[first : first + step].to(prompt_ids.device)
            width = int(prompt_mask[index].sum(1).max()) if cache == "dynamic" else prompt_ids.shape[1]
            ids, mask = prompt_ids[index, -width:], prompt_mask[index, -width:]
            prefilled = {}
            if shared is not None:
                prefix_cache = _shared_prefill(model, ids, mask, index, *shared)
                prefilled = {"cache": prefix_cache} if prefix_cache is not None else {}
            output = model.generate(input_ids=ids, attention_mask=mask, **options, **prefilled)
            pieces.append(output[:, width:])
    return pad_right(pieces, options["pad_token_id"])[torch.argsort(order).to(prompt_ids.device)]


def _continuous_batching(
    model, prompt_ids, prompt_mask, group_size: int, generation: dict, prefill_chunk: int | None
) -> torch.Tensor:
    """Completion ids (B*G, T) from transformers' continuous batching (`generate_batch`).

    A paged KV cache, where a group's G samples share their prompt's pages, and a scheduler that drops
    a finished sequence from the batch: no compute on padding or on sequences past their EOS. The cache
    is sized for the worst case (every row at its full length), as the dynamic cache would reach; one
    forward takes every decoding row plus `prefill_chunk` prompt positions (a whole prompt when None).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    firsts = zip(prompt_ids[::group_size], prompt_mask[::group_size], strict=True)
    prompts = [ids[mask.bool()].tolist() for ids, mask in firsts]
    rows, sampled = len(prompts) * group_size, generation["do_sample"]
    config = GenerationConfig(
        **{key: value for key, value in generation.items() if value is not None},
        # greedy: one sequence per prompt, copied G times below (generate_batch refuses G greedy ones)
        num_return_sequences=group_size if sampled else 1,
    )
    new = generation["max_new_tokens"]
    pages = sum(-(-(len(prompt) + new) // PAGE_SIZE) for prompt in prompts) * group_size
    batching = ContinuousBatchingConfig(
        page_size=PAGE_SIZE,
        num_blocks=pages,
        max_batch_tokens=rows + (prefill_chunk or max(map(len, prompts))),
    )
    results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
    outputs = list(results.values())  # in prompt order, a prompt's G samples together
    if not sampled:
        outputs = [output for output in outputs for _ in range(group_size)]
    failed = [output.error for output in outputs if output.error is not None]
    if len(outputs) != rows or failed:
        raise RuntimeError(
            f"continuous batching returned {len(outputs) - len(failed)} of {rows} completions "
            f"({'; '.join(failed[:3]) or 'see the log above'}); generation_cache: dynamic avoids it"
        )
    pieces = [torch.tensor([output.generated_tokens]) for output in outputs]
    return pad_right(pieces, generation["pad_token_id"]).to(prompt_ids.device)


def pad_right(pieces: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Row batches of completion ids, of any widths, as one right-padded tensor."""
    width = max(piece.shape[1] for piece in pieces)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces])


def encode_prompts(
    tokenizer, prompts: list[str], group_size: int, max_prompt_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, each prompt repeated for its group: (B*G, P) each."""
    encoded = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_prompt_tokens,
        add_special_tokens=False,
    )
    prompt_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0).to(device)  # (B*G, P)
    prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0).to(device)
    return prompt_ids, prompt_mask


def assemble(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    pieces: list[torch.Tensor],
    tokenizer,
    stop_ids: list[int],
    group_size: int,
    start: float,
) -> Rollouts:
    """Rollouts from sampled completion ids (row batches of any width): padded, masked after EOS, decoded."""
    completion_ids = pad_right(pieces, tokenizer.pad_token_id).to(prompt_ids.device)  # (B*G, T)
    completion_mask = completion_mask_from(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    lengths = completion_mask.sum(1).tolist()
    texts = tokenizer.batch_decode(
        [row[:length].tolist() for row, length in zip(completion_ids, lengths, strict=True)],
        skip_special_tokens=True,
    )
    return Rollouts(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        texts=texts,
        group_size=group_size,
        seconds=time.perf_counter() - start,
    )
