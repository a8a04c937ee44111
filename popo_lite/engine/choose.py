"""The one place that chooses the engines: the model loader and the rollout generator, from the config.

Everything that loads a policy for training (the trainer, benchmarks, tests) or samples rollouts calls
these two functions; the engines themselves do not know of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from popo_lite.config import Config, ConfigError
from popo_lite.core.rollouts import Rollouts
from popo_lite.engine.model import attach_adapters, device_memory_gib, load_base, resolve_device
from popo_lite.engine.rollouts import generate_rollouts


def load_policy(config: Config, check_tokenizer=None) -> tuple[PeftModel, object, torch.device]:
    """The frozen base with the "policy" and "ema" LoRA adapters: (model, tokenizer, device).

    `model_loader: hf` loads with transformers (`engine/model.py`); `unsloth` with Unsloth's
    FastLanguageModel (`engine/unsloth_loader.py`, CUDA only). `check_tokenizer(tokenizer)` runs before
    the weights load.
    """
    config = resolve_checkpointing(config)
    if config.model_loader == "unsloth":
        from popo_lite.engine import unsloth_loader

        return unsloth_loader.load_policy(config, check_tokenizer)
    base, tokenizer, device = load_base(config, check_tokenizer)
    return attach_adapters(base, config), tokenizer, device


def resolve_checkpointing(config: Config) -> Config:
    """`gradient_checkpointing: auto` decided by the memory planner for this device, the reason printed;
    a config that says true or false is returned as it is."""
    if config.gradient_checkpointing != "auto":
        return config
    from popo_lite.planning.estimate import checkpointing_choice

    device = resolve_device(config.device)
    sized = replace(config, device="cpu") if device.type == "cpu" else config  # fp32 compute on a CPU
    try:
        on, reason = checkpointing_choice(sized, device_memory_gib(device))
    except ConfigError as error:  # shapes the planner cannot read: the safe choice
        on, reason = True, f"on: the planner cannot size this model ({error})"
    print(f"gradient_checkpointing auto: {reason}")
    return replace(config, gradient_checkpointing=on)


def rollout_engine(config: Config, run_dir: Path, rank: int = 0) -> Callable[..., Rollouts]:
    """`generate_rollouts` with the config's batch size and cache, or the optional vLLM engine.

    The vLLM engine writes the policy adapter it is handed under `run_dir/vllm_adapter/process-<rank>`,
    a folder made fresh here (a copy rewritten every step: whatever was planted there is removed,
    links themselves, never their targets).
    """
    if config.generation_backend == "vllm":
        from popo_lite.engine.vllm_rollouts import VLLMRollouts
        from popo_lite.training.run_paths import make_folder, remove

        remove(run_dir, "vllm_adapter", f"process-{rank}")
        return VLLMRollouts(config, make_folder(run_dir, "vllm_adapter", f"process-{rank}"))
    return partial(
        generate_rollouts,
        batch_size=config.generation_batch_size,
        cache=config.generation_cache,
        prefill_chunk_size=config.prefill_chunk_size,
        shared_prompts=config.shared_prompts,
        unfinished_rows_only=config.decode_unfinished_rows,
    )
