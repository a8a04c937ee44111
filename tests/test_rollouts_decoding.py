"""Decoding only the unfinished rows (Config.decode_unfinished_rows) samples what `generate`'s loop samples.

`decode_unfinished_rows` drops a row from the decoding forward once it has ended but keeps the whole
batch's random draws. Each test runs both loops from one seed and compares the tokens one for one, on
batches whose rows end at many different steps (several stop tokens).
"""

from __future__ import annotations

import pytest
import torch
from conftest import live_policy

from popo_lite.config import Config, ConfigError
from popo_lite.engine.rollouts import generate_rollouts

PROMPTS = ["7", "12345678", "904", "55+1="]  # different lengths: left padding in every batch
G = 4


def _stopping_often(model, tokenizer) -> None:
    """Stop tokens the tiny model emits often, so rows end at many different steps."""
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "01"]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *digits]


def _rollouts(model, tokenizer, only_unfinished: bool, seed: int = 0, **options):
    torch.manual_seed(seed)
    options = {"max_new_tokens": 12, "temperature": 1.0, **options}
    return generate_rollouts(model, tokenizer, PROMPTS, G, unfinished_rows_only=only_unfinished, **options)


def _row_forwards(model) -> tuple[list[int], object]:
    """Rows of each decoder forward, counted by a hook on the embedding."""
    rows: list[int] = []
    embed = model.get_base_model().get_input_embeddings()
    return rows, embed.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("shared_prompts", [True, False], ids=["shared", "per-rollout"])
def test_sampled_tokens_equal_generate_token_for_token(tiny_config, qlora, shared_prompts):
    model, tokenizer = live_policy(tiny_config(qlora=qlora))
    _stopping_often(model, tokenizer)
    for seed in range(3):
        hf = _rollouts(model, tokenizer, False, seed, shared_prompts=shared_prompts)
        ours = _rollouts(model, tokenizer, True, seed, shared_prompts=shared_prompts)
        assert torch.equal(hf.completion_ids, ours.completion_ids), seed
        assert torch.equal(hf.completion_mask, ours.completion_mask)
        assert hf.texts == ours.texts
        lengths = hf.completion_mask.sum(1)
        assert len(set(lengths.tolist())) >= 3, lengths  # rows ended at several steps: rows were dropped


def test_greedy_tokens_and_generation_batches_equal_generate(tiny_config):
    model, tokenizer = live_policy(tiny_config())
    _stopping_often(model, tokenizer)
    for options in ({"temperature": 0}, {"batch_size": 6}, {"batch_size": 6, "prefill_chunk_size": 2}):
        hf, ours = (_rollouts(model, tokenizer, flag, 1, **options) for flag in (False, True))
        assert torch.equal(hf.completion_ids, ours.completion_ids), options
        assert hf.num_completion_tokens > len(PROMPTS) * G, options  # something was compared


def test_finished_rows_leave_the_decoding_forward(tiny_config):
    """The rows run per forward add up to the rows still decoding, not the batch times every step."""
    model, tokenizer = live_policy(tiny_config())
    _stopping_often(model, tokenizer)
    counts = {}
    for flag in (False, True):
        rows, hook = _row_forwards(model)
        try:
            rollouts = _rollouts(model, tokenizer, flag, shared_prompts=False)
        finally:
            hook.remove()
        counts[flag] = rows
    lengths = rollouts.completion_mask.sum(1)
    n = len(PROMPTS) * G
    # generate: one forward per token of the longest completion (the prefill gives the first), all rows
    assert counts[False] == [n] * int(lengths.max())
    # unfinished rows only: a row whose completion has k tokens takes part in k forwards
    assert counts[True][0] == n
    assert sum(counts[True]) == int(lengths.sum()) < sum(counts[False])


def test_auto_decodes_unfinished_rows_on_the_cpu_only(tiny_config, monkeypatch):
    from popo_lite.engine import rollouts as module

    model, tokenizer = live_policy(tiny_config())
    called = []
    inner = module.decode_unfinished_rows
    monkeypatch.setattr(module, "decode_unfinished_rows", lambda *a, **k: called.append(1) or inner(*a, **k))
    _rollouts(model, tokenizer, "auto")
    assert called  # a CPU: on
    called.clear()
    _rollouts(model, tokenizer, "auto", cache="static")
    assert not called  # the static cache keeps generate's own loop
    with pytest.raises(ConfigError, match="decode_unfinished_rows"):
        Config(decode_unfinished_rows="sometimes")
