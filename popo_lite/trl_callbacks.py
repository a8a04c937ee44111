"""Glue between popo_lite's siamese helpers and TRL's Trainer: the adapter-name view and the EMA callback."""

from __future__ import annotations

from peft import PeftModel
from transformers import TrainerCallback

from popo_lite.model import POLICY
from popo_lite.siamese import Predictor, ema_update


class AdapterView:
    """The model's parameters with adapter `name` shown as "policy", the name `siamese.adapter_pairs` matches.

    The tensors are the model's own, so `ema_reset` / `ema_update` run unchanged on TRL's "default" adapter.
    """

    def __init__(self, model: PeftModel, name: str) -> None:
        self.model, self.name = model, name

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            yield name.replace(f".{self.name}.", f".{POLICY}."), param


class EMAUpdateCallback(TrainerCallback):
    """After each optimizer step: the momentum law on the EMA adapter, and the predictor's gradients cleared
    (Trainer's `model.zero_grad()` does not reach the predictor, which is not part of the model)."""

    def __init__(self, adapters: AdapterView, predictor: Predictor, tau: float) -> None:
        self.adapters, self.predictor, self.tau = adapters, predictor, tau

    def on_step_end(self, args, state, control, **kwargs):
        ema_update(self.adapters, self.tau)
        self.predictor.zero_grad(set_to_none=True)
