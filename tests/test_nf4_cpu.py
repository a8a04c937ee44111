"""NF4 layers keep passing gradients after a generation, on CPUs where bitsandbytes would repack them.

bitsandbytes repacks a `Linear4bit` in place for a faster inference kernel at its first eval-mode forward
with an input that needs no grad, on CPUs with AVX512-BF16; a repacked layer gives its input no gradient,
so the LoRA adapters below it stop learning (`popo_lite.engine.model.keep_nf4_layers_trainable`). Each test
does that eval forward and checks the gradients against a twin that never did one.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from conftest import live_policy
from torch import nn

from popo_lite.engine.model import keep_nf4_layers_trainable

pytestmark = pytest.mark.skipif(
    not has_avx512bf16(),
    reason="this CPU has no AVX512-BF16: bitsandbytes never repacks NF4 layers here, so nothing to check",
)


def _nf4_stack(seed: int) -> nn.Sequential:
    """A trainable fp32 layer (the stand-in for a LoRA adapter) under a real NF4 layer, 64 -> 128 -> 96."""
    torch.manual_seed(seed)
    lower = nn.Linear(64, 128)
    dense = nn.Linear(128, 96)
    nf4 = bnb.nn.Linear4bit(128, 96, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    nf4.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4", module=nf4)
    nf4.bias = nn.Parameter(dense.bias.data, requires_grad=False)
    stack = nn.Sequential(lower, nf4.to("cpu"))
    keep_nf4_layers_trainable(stack)
    return stack


def _gradients(stack: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    stack.train()
    x = x.clone().requires_grad_(True)
    (stack(x) ** 2).sum().backward()
    assert x.grad is not None, "no gradient reached the input through the NF4 layer"
    return x.grad, stack[0].weight.grad


def test_nf4_layer_after_an_eval_forward_passes_the_same_gradients_as_a_fresh_one():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    generated, fresh = _nf4_stack(seed=0), _nf4_stack(seed=0)
    generated.eval()
    with torch.no_grad():
        eval_out = generated(x)  # what every generation does
    assert not getattr(generated[1].weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(eval_out, fresh(x).detach(), rtol=0, atol=0)  # the same NF4 kernel
    input_grad, lower_grad = _gradients(generated, x)
    fresh_input_grad, fresh_lower_grad = _gradients(fresh, x)
    torch.testing.assert_close(input_grad, fresh_input_grad, rtol=0, atol=0)
    torch.testing.assert_close(lower_grad, fresh_lower_grad, rtol=0, atol=0)
    assert lower_grad.abs().sum() > 0


def test_an_already_repacked_layer_is_converted_back_and_trains_again():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    packed, fresh = _nf4_stack(seed=0), _nf4_stack(seed=0)
    packed[1].support_avx512bf16_for_cpu = True  # as bitsandbytes leaves a layer it created
    packed.eval()
    with torch.no_grad():
        packed(x)
    assert packed[1].weight.quant_state.packing_format_for_cpu  # bitsandbytes repacked it
    assert keep_nf4_layers_trainable(packed) == 1
    assert not packed[1].weight.quant_state.packing_format_for_cpu
    # Packing rounds the block scales (absmax) to bf16 and bitsandbytes' inverse keeps them so: close
    # to the fresh layer's gradients, not bit-equal (bf16 has 8 significant bits).
    for got, want in zip(_gradients(packed, x), _gradients(fresh, x), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def _lora_gradients(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    logits = model(input_ids=tokens).logits  # (B, T, V)
    nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_qlora_policy_after_a_generation_has_the_lora_gradients_of_one_that_never_generated(tiny_config):
    config = tiny_config(qlora=True, gradient_checkpointing=False)
    generated, tokenizer = live_policy(config)
    fresh, _ = live_policy(config)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in generated.modules())
    tokens = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 3, 4]])
    generated.eval()
    with torch.no_grad():
        generated.generate(
            input_ids=tokens[:, :3], max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    got, want = _lora_gradients(generated, tokens), _lora_gradients(fresh, tokens)
    assert len(want) == 2 * 7 * 2  # A and B of the 7 projections of each of the 2 layers
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    first_layer = [g for n, g in want.items() if "layers.0." in n and "lora_A" in n]
    assert all(g.abs().sum() > 0 for g in first_layer)
