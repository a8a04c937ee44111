"""The siamese branch: an fp32 EMA of the policy's LoRA tensors, living as adapter "ema" on the same base.

With a frozen base, an EMA over all parameters equals an EMA over the adapter parameters, so this is
exact (docs/algorithm.md section 2.1). As in the reference, the LoRA factors A and B are averaged separately:
EMA(B) @ EMA(A) is not EMA(B @ A).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

POLICY = "policy"  # the trained LoRA adapter
EMA = "ema"  # the siamese branch: an EMA copy of the policy adapter on the same base


def adapter_pairs(model: nn.Module, policy: str = POLICY) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(policy tensor, ema tensor) for every LoRA parameter, matched by name; `policy` names the
    trained adapter ("policy" in popo_lite, "default" in a TRL-made PeftModel)."""
    params = dict(model.named_parameters())
    pairs = []
    for name, param in params.items():
        if f".{policy}." in name:
            pairs.append((param, params[name.replace(f".{policy}.", f".{EMA}.")]))
    if not pairs:
        raise ValueError(f"model has no LoRA adapter named {policy!r}")
    return pairs


@torch.no_grad()
def ema_reset(model: nn.Module, policy: str = POLICY) -> None:
    """xi <- theta: the siamese branch starts as a copy of the policy adapter."""
    for theta, xi in adapter_pairs(model, policy):
        xi.copy_(theta.float())


@torch.no_grad()
def ema_update(model: nn.Module, tau: float, policy: str = POLICY) -> None:
    """The momentum law, once per optimizer step: xi <- tau * xi + (1 - tau) * theta (in fp32)."""
    for theta, xi in adapter_pairs(model, policy):
        xi.mul_(tau).add_(theta.float(), alpha=1.0 - tau)


@contextmanager
def ema_forward(model) -> Iterator[None]:
    """Run forwards through the EMA adapter, then restore the active adapter and every requires_grad flag.

    peft's `set_adapter` makes the adapter it activates trainable and the others frozen (docs/algorithm.md
    section 2.4); without this restore the policy would silently stop training.
    """
    previous = model.active_adapter
    flags = {name: param.requires_grad for name, param in model.named_parameters()}
    model.set_adapter(EMA)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])


class Predictor(nn.Module):
    """BYOL-style predictor h_phi on the online side: Linear(H, d) -> LayerNorm(d) -> ReLU -> Linear(d, H).

    fp32, Xavier-uniform weights and zero biases (docs/algorithm.md section 1.5.2).
    """

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, hidden_size)
        )
        for layer in (self.net[0], self.net[3]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())
