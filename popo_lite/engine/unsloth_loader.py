"""Optional model loader: Unsloth's `FastLanguageModel` (fused LoRA kernels, offloaded checkpointing).

`model_loader: unsloth` loads the base through `FastLanguageModel.from_pretrained` (NF4 when `qlora`) and
lets `FastLanguageModel.get_peft_model` patch its fast LoRA forward. Unsloth names its adapter "default";
popo_lite then adds its two adapters, "policy" (trained) and "ema" (the siamese branch), and deletes
"default", so everything downstream (EMA law, checkpoints, evaluation) is the same as with the hf
loader. Unsloth's kernels read the ACTIVE adapter at every call (`proj.active_adapters[0]`), which is
what the EMA forward switches. Generation runs between `FastLanguageModel.for_inference` and
`for_training` (Unsloth caches merged LoRA weights for inference; `for_training` drops them, so each step
samples from the current policy).

Not run by popo_lite's CI: Unsloth needs a CUDA GPU and is not in requirements.txt (`pip install
unsloth` on a CUDA machine). tests/test_unsloth_backend.py checks this glue against a stand-in module
with Unsloth's API, not Unsloth itself. A trained adapter is a plain PEFT adapter: evaluation loads it
on the hf loader's base (same NF4 weights).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from popo_lite.config import Config, ConfigError
from popo_lite.engine.model import (
    POLICY,
    finish_adapters,
    keep_nf4_layers_trainable,
    load_tokenizer,
    lora_config,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
)

UNSLOTH_ADAPTER = "default"  # the name FastLanguageModel.get_peft_model gives its adapter
# "all-linear" spelled out: the projections of the Llama/Qwen/Mistral blocks Unsloth patches.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fast_language_model():
    try:
        from unsloth import FastLanguageModel
    except Exception as error:  # ImportError when missing; Unsloth raises others when it finds no GPU
        raise ConfigError(
            f"model_loader: unsloth needs Unsloth on a CUDA machine (pip install unsloth); or use hf "
            f"({type(error).__name__}: {error})"
        ) from None
    return FastLanguageModel


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ConfigError(f"model_loader: unsloth needs a CUDA GPU, and the device is {device}; use hf")


def load_policy(config: Config, check_tokenizer=None) -> tuple[object, object, torch.device]:
    """The base through Unsloth, with the "policy" and "ema" adapters: (model, tokenizer, device)."""
    device = resolve_device(config.device)
    require_cuda(device)
    FastLanguageModel = fast_language_model()
    source = resolve_model_source(config)
    # popo_lite's own tokenizer (left padding, pad token): the same prompts as with the hf loader, and
    # checked before the weights load.
    tokenizer = load_tokenizer(source, config)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    targets = ALL_LINEAR if config.lora_target_modules == "all-linear" else list(config.lora_target_modules)
    checkpointing = "unsloth" if config.gradient_checkpointing else False
    model, _ = FastLanguageModel.from_pretrained(
        model_name=source,
        max_seq_length=config.max_prompt_tokens + config.max_new_tokens,
        dtype=resolve_dtype(config.dtype, device),
        load_in_4bit=config.qlora,
        device_map={"": device},
        trust_remote_code=config.trust_remote_code,
    )
    keep_nf4_layers_trainable(model)  # as load_base does: see that function
    model = FastLanguageModel.get_peft_model(
        model,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing=checkpointing,
        random_state=config.seed,
    )
    adapter = lora_config(config)
    adapter.target_modules = set(targets)
    model.add_adapter(POLICY, adapter)
    model.set_adapter(POLICY)
    model.delete_adapter(UNSLOTH_ADAPTER)
    finish_adapters(model, adapter)
    model.popo_lite_generation_mode = lambda m: _unsloth_generation(m, FastLanguageModel, checkpointing)
    return model, tokenizer, device


@contextmanager
def _unsloth_generation(model, FastLanguageModel, checkpointing) -> Iterator[None]:
    was_training = model.training
    FastLanguageModel.for_inference(model)
    try:
        yield
    finally:
        FastLanguageModel.for_training(model, use_gradient_checkpointing=checkpointing)
        model.train(was_training)
