"""The Unsloth loader's glue, against a stand-in module with Unsloth's API (Unsloth itself needs CUDA).

The stand-in's `FastLanguageModel.from_pretrained` loads the tiny model (real bitsandbytes NF4 layers
when asked for 4-bit) and its `get_peft_model` attaches a PEFT LoRA adapter named "default", as Unsloth
does. What is checked: the arguments popo_lite passes, that the run trains the "policy" adapter with the
"ema" adapter beside it and Unsloth's "default" gone, that every generation sits between
`for_inference` and `for_training` with the policy adapter active, and that the run resumes.
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from popo_lite.config import ConfigError
from popo_lite.core.siamese import EMA, POLICY
from popo_lite.engine import unsloth_loader
from popo_lite.engine.choose import load_policy
from popo_lite.train import main
from popo_lite.training.trainer import prepare, run, train


class FakeFastLanguageModel:
    calls: ClassVar[list] = []
    models: ClassVar[list] = []

    @staticmethod
    def from_pretrained(model_name, **kwargs):
        FakeFastLanguageModel.calls.append(("from_pretrained", kwargs))
        quantization = None
        if kwargs["load_in_4bit"]:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"]
            )
        model = AutoModelForCausalLM.from_pretrained(
            model_name, dtype=kwargs["dtype"], quantization_config=quantization
        )
        model.requires_grad_(False)
        return model, "unsloth's tokenizer"

    @staticmethod
    def get_peft_model(model, **kwargs):
        FakeFastLanguageModel.calls.append(("get_peft_model", kwargs))
        if kwargs["use_gradient_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        adapter = LoraConfig(
            r=kwargs["r"],
            lora_alpha=kwargs["lora_alpha"],
            lora_dropout=kwargs["lora_dropout"],
            target_modules=kwargs["target_modules"],
            bias=kwargs["bias"],
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, adapter)  # adapter name "default", as Unsloth's
        FakeFastLanguageModel.models.append(peft_model)
        return peft_model

    @staticmethod
    def for_inference(model):
        FakeFastLanguageModel.calls.append(("for_inference", model.active_adapter, model.training))
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing=True):
        FakeFastLanguageModel.calls.append(("for_training", use_gradient_checkpointing))
        model.train()
        return model


@pytest.fixture
def fake_unsloth(monkeypatch):
    module = types.ModuleType("unsloth")
    module.FastLanguageModel = FakeFastLanguageModel
    monkeypatch.setitem(sys.modules, "unsloth", module)
    monkeypatch.setattr(unsloth_loader, "require_cuda", lambda device: None)  # the stand-in runs on CPU
    FakeFastLanguageModel.calls, FakeFastLanguageModel.models = [], []
    return FakeFastLanguageModel


def test_unsloth_loader_passes_the_config_and_replaces_its_adapter(fake_unsloth, tiny_config):
    config = tiny_config(model_loader="unsloth", qlora=True, max_new_tokens=3, seed=5)
    model, tokenizer, _ = load_policy(config)
    (_, loaded), (_, peft) = fake_unsloth.calls[:2]
    assert loaded["max_seq_length"] == config.max_prompt_tokens + 3 and loaded["load_in_4bit"] is True
    assert loaded["dtype"] == torch.float32  # CPU: resolve_dtype's choice
    assert peft["r"] == 4 and peft["lora_alpha"] == 8 and peft["random_state"] == 5
    assert peft["target_modules"] == unsloth_loader.ALL_LINEAR and peft["bias"] == "none"
    assert peft["use_gradient_checkpointing"] == "unsloth"
    assert tokenizer != "unsloth's tokenizer" and tokenizer.padding_side == "left"  # popo_lite's own
    assert set(model.peft_config) == {POLICY, EMA} and model.active_adapter == POLICY
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    assert not any(".default." in name for name in lora)
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.requires_grad == (f".{POLICY}." in name) for name, p in lora.items())
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora}
    assert targets == set(unsloth_loader.ALL_LINEAR)
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"


def test_unsloth_run_trains_the_policy_generates_between_mode_switches_and_resumes(fake_unsloth, tiny_config):
    config = tiny_config(model_loader="unsloth", steps=1, save_every=1, seed=1)
    assert [record["step"] for record in train(config)] == [1]  # seed 1: positives in step 1
    model = fake_unsloth.models[-1]
    policy = {n: p.detach().clone() for n, p in model.named_parameters() if f".{POLICY}." in n}
    ema = {n.replace(f".{POLICY}.", f".{EMA}."): p for n, p in policy.items()}
    moved = [n for n, p in policy.items() if "lora_B" in n and p.abs().sum() > 0]
    assert moved, "the policy's lora_B left zero: nothing trained"
    weights = dict(model.named_parameters())
    # The momentum law on the "ema" adapter: it started equal to the policy, whose lora_B starts at 0.
    assert all(torch.allclose(weights[n], (1 - config.tau) * p) for n, p in ema.items() if "lora_B" in n)
    switches = [call for call in fake_unsloth.calls if call[0].startswith("for_")]
    assert switches == [("for_inference", POLICY, True), ("for_training", "unsloth")]

    fake_unsloth.calls = []
    session = prepare(tiny_config(model_loader="unsloth", steps=2, save_every=1, seed=1), resume=True)
    assert session.model is not model and set(session.model.peft_config) == {POLICY, EMA}
    restored = dict(session.model.named_parameters())
    assert all(torch.equal(restored[n], p) for n, p in policy.items())
    assert [record["step"] for record in run(session)] == [2]
    assert [c[0] for c in fake_unsloth.calls if c[0].startswith("for_")] == ["for_inference", "for_training"]


def test_unsloth_loader_says_what_it_needs(monkeypatch, tiny_config, tiny_cli_args, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_policy(tiny_config(model_loader="unsloth", device="cpu"))
    command = [*tiny_cli_args, "--model_loader", "unsloth", "--device", "cpu", "--output_dir", str(tmp_path)]
    assert main(command) == 2
    assert "model_loader: unsloth needs a CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(unsloth_loader, "require_cuda", lambda device: None)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # not installed
    with pytest.raises(ConfigError, match="pip install unsloth"):
        load_policy(tiny_config(model_loader="unsloth", device="cpu"))
    for wrong in ({"generation_backend": "vllm"}, {"generation_cache": "static"}, {"prefill_chunk_size": 8}):
        with pytest.raises(ConfigError, match="model_loader: unsloth generates with Unsloth"):
            tiny_config(model_loader="unsloth", **wrong)
