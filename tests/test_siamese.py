"""The siamese branch: EMA law, the EMA-forward context manager, the predictor; and the model loader."""

from __future__ import annotations

import pytest
import torch

from popo_lite.core.siamese import EMA, POLICY, Predictor, adapter_pairs, ema_forward, ema_reset, ema_update
from popo_lite.engine.choose import load_policy
from popo_lite.engine.model import ModelError


@pytest.fixture
def policy_model(tiny_config):
    model, _, _ = load_policy(tiny_config())
    ema_reset(model)
    return model


def _randomise_policy(model, generator: torch.Generator) -> None:
    with torch.no_grad():
        for policy, _ in adapter_pairs(model):
            policy.copy_(torch.randn(policy.shape, generator=generator))


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_ema_follows_the_momentum_law_exactly_after_k_steps(policy_model, tau):
    generator = torch.Generator().manual_seed(0)
    xi = [ema.detach().clone() for _, ema in adapter_pairs(policy_model)]
    for _ in range(3):
        _randomise_policy(policy_model, generator)
        thetas = [policy.detach().clone() for policy, _ in adapter_pairs(policy_model)]
        ema_update(policy_model, tau)
        xi = [tau * x + (1 - tau) * theta for x, theta in zip(xi, thetas, strict=True)]
    for (policy, ema), expected in zip(adapter_pairs(policy_model), xi, strict=True):
        torch.testing.assert_close(ema, expected, rtol=0, atol=1e-6)
        if tau == 0.0:
            assert torch.equal(ema, policy)  # tau = 0 copies


def test_ema_freezes_at_tau_one_and_starts_as_copy_of_policy(policy_model):
    start = [ema.detach().clone() for _, ema in adapter_pairs(policy_model)]
    for policy, ema in adapter_pairs(policy_model):
        assert torch.equal(policy, ema)
    _randomise_policy(policy_model, torch.Generator().manual_seed(1))
    ema_update(policy_model, 1.0)
    for (_, ema), before in zip(adapter_pairs(policy_model), start, strict=True):
        assert torch.equal(ema, before)


def test_ema_shadow_is_fp32_and_never_trainable(policy_model):
    for policy, ema in adapter_pairs(policy_model):
        assert ema.dtype == torch.float32 and policy.dtype == torch.float32
        assert not ema.requires_grad and policy.requires_grad


def test_ema_forward_restores_active_adapter_and_every_requires_grad_flag(policy_model):
    flags = {name: p.requires_grad for name, p in policy_model.named_parameters()}
    assert policy_model.active_adapter == POLICY
    with ema_forward(policy_model):
        assert policy_model.active_adapter == EMA
        # peft's set_adapter flips trainability to the activated adapter: the trap being guarded against
        assert any(p.requires_grad for n, p in policy_model.named_parameters() if f".{EMA}." in n)
    assert policy_model.active_adapter == POLICY
    assert {name: p.requires_grad for name, p in policy_model.named_parameters()} == flags


def test_ema_forward_restores_flags_even_when_the_forward_raises(policy_model):
    flags = {name: p.requires_grad for name, p in policy_model.named_parameters()}
    with pytest.raises(RuntimeError), ema_forward(policy_model):
        raise RuntimeError("boom")
    assert policy_model.active_adapter == POLICY
    assert {name: p.requires_grad for name, p in policy_model.named_parameters()} == flags


def test_ema_forward_runs_the_ema_adapter_tensors_not_the_policy_or_the_base(policy_model):
    ids = torch.tensor([[3, 4, 5, 6]])
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # both adapters random (LoRA B non-zero) and different from each other
        for policy, ema in adapter_pairs(policy_model):
            policy.copy_(0.3 * torch.randn(policy.shape, generator=generator))
            ema.copy_(0.3 * torch.randn(ema.shape, generator=generator))
        policy_logits = policy_model(input_ids=ids).logits
        with ema_forward(policy_model):
            ema_logits = policy_model(input_ids=ids).logits
        with policy_model.disable_adapter():
            base_logits = policy_model(input_ids=ids).logits
        # the same model with the EMA tensors loaded into the policy adapter
        for policy, ema in adapter_pairs(policy_model):
            policy.copy_(ema)
        policy_holding_ema_logits = policy_model(input_ids=ids).logits
    assert not torch.allclose(ema_logits, policy_logits, atol=1e-3)
    assert not torch.allclose(ema_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(ema_logits, policy_holding_ema_logits)


def test_predictor_shape_init_and_dtype():
    predictor = Predictor(hidden_size=12, width=7)
    linear_in, norm, _, linear_out = predictor.net
    assert (
        linear_in.in_features,
        linear_in.out_features,
        norm.normalized_shape,
        linear_out.out_features,
    ) == (
        12,
        7,
        (7,),
        12,
    )
    assert torch.all(linear_in.bias == 0) and torch.all(linear_out.bias == 0)
    bound = (6 / (12 + 7)) ** 0.5  # Xavier-uniform bound for fan_in 12, fan_out 7
    assert linear_in.weight.abs().max() <= bound
    out = predictor(torch.randn(3, 12, dtype=torch.bfloat16))
    assert out.shape == (3, 12) and out.dtype == torch.float32


def test_missing_local_model_folder_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_policy(tiny_config(model=str(tmp_path)))
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_policy(tiny_config(model=str(tmp_path / "missing.gguf")))
