"""The static KV cache (Config.generation_cache) samples exactly what the default dynamic cache samples."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import live_policy

from popo_lite.config import ConfigError
from popo_lite.engine.choose import load_policy
from popo_lite.engine.rollouts import _compilable, generate_rollouts
from popo_lite.training.trainer import train

PROMPTS = ["7", "12345678", "904"]  # different lengths: left padding in every batch


@pytest.mark.parametrize("qlora", [False, True], ids=["fp32", "nf4"])
def test_static_cache_greedy_rollouts_equal_dynamic_token_for_token(tiny_config, qlora):
    model, tokenizer = live_policy(tiny_config(qlora=qlora))

    def rollouts(cache: str):
        return generate_rollouts(
            model, tokenizer, PROMPTS, group_size=2, max_new_tokens=10, temperature=0, cache=cache
        )

    dynamic = rollouts("dynamic")
    # the second static call reuses the sized static cache; paged is continuous batching
    for other in (rollouts("static"), rollouts("static"), rollouts("paged")):
        assert torch.equal(dynamic.completion_ids, other.completion_ids)
        assert torch.equal(dynamic.completion_mask, other.completion_mask)
        assert dynamic.texts == other.texts
    assert dynamic.num_completion_tokens > len(PROMPTS) * 2  # not all empty: something was compared


def test_sampled_first_tokens_follow_the_tempered_policy_with_each_cache(tiny_config):
    """Sampling with temperature 0.2: the first tokens' frequencies match softmax(logits / 0.2)."""
    model, tokenizer = live_policy(tiny_config())
    with torch.no_grad():
        prompt = tokenizer("12", return_tensors="pt", add_special_tokens=False)
        logits = model(**prompt).logits[0, -1]
    tempered, plain = torch.softmax(logits / 0.2, -1), torch.softmax(logits, -1)
    assert (tempered - plain).abs().sum() / 2 > 0.2  # an ignored temperature would fail below
    torch.manual_seed(0)
    for cache in ("dynamic", "paged"):
        sampled = generate_rollouts(
            model, tokenizer, ["12"], 1000, max_new_tokens=1, temperature=0.2, cache=cache
        ).completion_ids[:, 0]
        frequencies = torch.bincount(sampled, minlength=len(tempered)).float() / len(sampled)
        assert (frequencies - tempered).abs().sum() / 2 < 0.08, cache  # total variation


def test_chunked_prefill_greedy_rollouts_equal_whole_prompt_prefill(tiny_config):
    model, tokenizer = live_policy(tiny_config())

    def rollouts(chunk: int | None):
        options = {"max_new_tokens": 10, "temperature": 0, "prefill_chunk_size": chunk}
        options["shared_prompts"] = False  # the whole-prompt prefill of every row, counted below
        return generate_rollouts(model, tokenizer, PROMPTS, group_size=2, **options)

    forwards: list[int] = []  # positions fed per decoder forward
    decoder = model.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda _, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    whole = rollouts(None)
    assert forwards[0] == 8  # the longest prompt, in one forward
    for chunk in (1, 3, 5):  # chunks that end inside the padding of the shorter prompts
        forwards.clear()
        chunked = rollouts(chunk)
        assert forwards[: -(10 - 1)] == [chunk] * (8 // chunk) + ([8 % chunk] if 8 % chunk else [])
        assert torch.equal(whole.completion_ids, chunked.completion_ids), chunk
        assert whole.texts == chunked.texts
    hook.remove()
    assert whole.num_completion_tokens > len(PROMPTS) * 2
    with pytest.raises(ConfigError, match="prefill_chunk_size must be > 0"):
        tiny_config(prefill_chunk_size=0)


def test_batches_sorted_by_prompt_length_and_cut_to_it_give_the_same_greedy_rollouts(tiny_config):
    model, tokenizer = live_policy(tiny_config())
    widths: list[int] = []  # prompt positions of each generate call's input
    hook = (
        model.get_base_model()
        .get_decoder()
        .register_forward_pre_hook(
            lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
    )

    def rollouts(batch_size: int | None, cache: str = "dynamic"):
        widths.clear()
        return generate_rollouts(
            model,
            tokenizer,
            PROMPTS,
            2,
            max_new_tokens=10,
            temperature=0,
            batch_size=batch_size,
            cache=cache,
            shared_prompts=False,  # every row prefilled, so the widths below are the prompts'
        )

    together = rollouts(None)
    assert widths[0] == 8
    for size in (2, 3, 4):  # a batch per group, batches splitting groups, mixed lengths in a batch
        batched = rollouts(size)
        assert torch.equal(together.completion_ids, batched.completion_ids), size  # rows back in order
        assert torch.equal(together.prompt_ids, batched.prompt_ids) and together.texts == batched.texts
    prefills = [w for w in widths if w > 1]
    assert prefills == [3, 8]  # sorted by length: "7" and "904" (4 rows, cut to 3 positions), then "12345678"
    rollouts(2, cache="static")
    assert [w for w in widths if w > 1] == [8, 8, 8]  # the static cache keeps one length: no cut
    hook.remove()
    assert together.num_completion_tokens > len(PROMPTS) * 2


def test_config_accepts_the_caches_and_names_the_field_otherwise(tiny_config):
    assert tiny_config().generation_cache == "dynamic"
    assert tiny_config(generation_cache="static").generation_cache == "static"
    assert tiny_config(generation_cache="paged").generation_cache == "paged"
    with pytest.raises(ConfigError, match="generation_cache"):
        tiny_config(generation_cache="offloaded")


def test_generate_rollouts_rejects_an_unknown_cache(tiny_config):
    model, tokenizer, _ = load_policy(tiny_config())
    with pytest.raises(ValueError, match="cache"):
        generate_rollouts(model, tokenizer, PROMPTS, group_size=1, max_new_tokens=2, cache="offloaded")


def test_compile_veto_of_a_bitsandbytes_base_is_lifted_only_inside_the_block():
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="bitsandbytes"))
    other = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gptq"))
    base = SimpleNamespace(hf_quantizer=quantizer)
    model = SimpleNamespace(get_base_model=lambda: base)
    with _compilable(model):
        assert base.hf_quantizer is None
    assert base.hf_quantizer is quantizer
    base.hf_quantizer = other  # another quantiser's veto stands
    with _compilable(model):
        assert base.hf_quantizer is other


def test_trainer_generates_with_the_configured_cache(tiny_config):
    class Stop(Exception):
        pass

    with mock.patch("popo_lite.engine.choose.generate_rollouts", side_effect=Stop) as generate:
        with pytest.raises(Stop):
            next(train(tiny_config(generation_cache="static", steps=1)))
    assert generate.call_args.kwargs["cache"] == "static"


def test_a_training_step_runs_on_the_paged_cache(tiny_config):
    (record,) = train(tiny_config(generation_cache="paged", steps=1, seed=3))
    assert record["step"] == 1 and record["completion_length"] > 0 and record["seconds_generate"] > 0
