"""Optional rollout engine: vLLM, given the current policy adapter with every request.

`generation_backend: vllm` starts one vLLM engine on the training GPU (`vllm_gpu_memory_utilization` of
its memory) over the same base model, quantised with bitsandbytes when `qlora` is on. Each step the
policy adapter is saved (`<run>/vllm_adapter/policy`) and passed as a LoRA request with a new id, so
vLLM samples from exactly the weights being trained; scoring, weights and the loss stay on the training
model. vLLM holds its own copy of the base weights (about 3.8 GB for a 7B in NF4).

Not run by popo_lite's CI: vLLM needs a CUDA GPU and is not in requirements.txt (`pip install vllm` on
a CUDA machine). tests/test_vllm_backend.py checks this glue against a stand-in module with vLLM's API
(`LLM`, `SamplingParams`, `LoRARequest`), not vLLM itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from popo_lite.config import Config, ConfigError
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import POLICY
from popo_lite.engine.model import resolve_device, resolve_dtype, resolve_model_source
from popo_lite.engine.rollouts import assemble, encode_prompts, eos_ids


class VLLMRollouts:
    """A callable with `generate_rollouts`' positional arguments, sampling with vLLM."""

    def __init__(self, config: Config, adapter_dir: Path) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(
                "generation_backend: vllm needs vLLM on a CUDA machine (pip install vllm); or use hf"
            ) from None
        device = resolve_device(config.device)
        self.llm = LLM(
            model=resolve_model_source(config),
            enable_lora=True,
            max_lora_rank=config.lora_rank,
            max_loras=1,
            quantization="bitsandbytes" if config.qlora else None,
            dtype=str(resolve_dtype(config.dtype, device)).removeprefix("torch."),
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            max_model_len=config.max_prompt_tokens + config.max_new_tokens,
            seed=config.seed,
            trust_remote_code=config.trust_remote_code,
        )
        self.adapter_dir = Path(adapter_dir)
        self.version = 0

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer,
        prompts: list[str],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_prompt_tokens: int = 512,
    ) -> Rollouts:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        self.version += 1  # a new id: vLLM caches adapters by id, and this step's weights are new
        model.save_pretrained(self.adapter_dir, selected_adapters=[POLICY])  # -> adapter_dir/policy
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, group_size, max_prompt_tokens, device)
        stop_ids = eos_ids(model, tokenizer)
        params = SamplingParams(
            n=group_size,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            stop_token_ids=stop_ids,
        )
        firsts = range(0, prompt_ids.shape[0], group_size)  # one request per prompt, n = G samples each
        requests = [{"prompt_token_ids": prompt_ids[i][prompt_mask[i].bool()].tolist()} for i in firsts]
        adapter = LoRARequest(f"{POLICY}-{self.version}", self.version, str(self.adapter_dir / POLICY))
        outputs = self.llm.generate(requests, params, lora_request=adapter, use_tqdm=False)
        pieces = [_completion(sample, stop_ids) for output in outputs for sample in output.outputs]
        if len(pieces) != prompt_ids.shape[0]:
            raise RuntimeError(f"vLLM returned {len(pieces)} completions for {prompt_ids.shape[0]} requested")
        return assemble(prompt_ids, prompt_mask, pieces, tokenizer, stop_ids, group_size, start)


def _completion(sample, stop_ids: list[int]) -> torch.Tensor:
    """(1, T) ids of one vLLM sample, ending with an EOS id whenever it stopped on one, so the loss
    trains the stop as the Hugging Face path does (whatever vLLM's version keeps in `token_ids`)."""
    tokens = list(sample.token_ids)
    if sample.finish_reason == "stop" and (not tokens or tokens[-1] not in stop_ids):
        tokens.append(stop_ids[0])
    return torch.tensor([tokens or [stop_ids[0]]])
