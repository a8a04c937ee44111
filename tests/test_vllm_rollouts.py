"""The vLLM rollout engine's glue, against a stand-in module with vLLM's API (vLLM itself needs CUDA).

What is checked: one engine per run, the policy adapter saved and passed with a new LoRA id every step
(the weights of the step being sampled), one request per prompt with n = G, and completions turned into
Rollouts that end with EOS whenever vLLM stopped on it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from popo_lite.config import ConfigError
from popo_lite.training.trainer import train

EOS, FIRST_DIGIT = 1, 3  # the test tokenizer: <pad> 0, <eos> 1, <unk> 2, digits 3..12


class FakeLLM:
    made: ClassVar[list] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.calls = kwargs, []
        FakeLLM.made.append(self)

    def generate(self, requests, params, lora_request=None, use_tqdm=True):
        adapter = load_file(Path(lora_request.lora_path) / "adapter_model.safetensors")
        self.calls.append(
            SimpleNamespace(requests=requests, params=params, lora=lora_request, adapter=adapter)
        )
        samples = [  # EOS kept in token_ids, EOS dropped from token_ids, cut at max_tokens
            SimpleNamespace(token_ids=[FIRST_DIGIT + 2, EOS], finish_reason="stop"),
            SimpleNamespace(token_ids=[FIRST_DIGIT + 4], finish_reason="stop"),
            SimpleNamespace(
                token_ids=[FIRST_DIGIT + 1] * params.kwargs["max_tokens"], finish_reason="length"
            ),
        ]
        n = params.kwargs["n"]
        return [SimpleNamespace(outputs=[samples[k % 3] for k in range(n)]) for _ in requests]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, number, path: SimpleNamespace(
        lora_name=name, lora_int_id=number, lora_path=path
    )
    for name, module in {
        "vllm": vllm,
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.request": request,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeLLM.made = []
    return FakeLLM


def test_vllm_engine_samples_each_step_with_that_steps_policy_adapter(fake_vllm, tiny_config):
    config = tiny_config(
        generation_backend="vllm", steps=2, save_every=1, rollouts_per_prompt=3, max_new_tokens=2
    )
    records = list(train(config))
    assert len(records) == 2 and len(fake_vllm.made) == 1
    engine = fake_vllm.made[0]
    assert engine.kwargs["enable_lora"] and engine.kwargs["max_lora_rank"] == config.lora_rank
    assert (
        engine.kwargs["quantization"] is None
        and engine.kwargs["max_model_len"] == config.max_prompt_tokens + 2
    )
    assert [call.lora.lora_int_id for call in engine.calls] == [1, 2]  # a new id per step
    first, second = engine.calls
    assert len(first.requests) == config.prompts_per_step and first.params.kwargs["n"] == 3
    assert all(EOS not in r["prompt_token_ids"] and 0 not in r["prompt_token_ids"] for r in first.requests)
    # The adapter sampled at step 2 is the policy after step 1's update, as checkpointed.
    trained = load_file(Path(records[0]["checkpoint"]) / "policy" / "adapter_model.safetensors")
    assert trained.keys() == second.adapter.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(second.adapter[name], tensor)
    assert any(not torch.equal(first.adapter[name], second.adapter[name]) for name in trained)
    assert records[0]["completion_length"] == pytest.approx((2 + 2 + 2) / 3)  # EOS appended where dropped


def test_vllm_missing_is_a_clear_config_error(monkeypatch, tiny_config):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match="generation_backend: vllm needs vLLM"):
        next(train(tiny_config(generation_backend="vllm")))
