"""Glue between popo_lite's siamese helpers and TRL's Trainer: the EMA update as a callback."""

from __future__ import annotations

from peft import PeftModel
from transformers import TrainerCallback

from popo_lite.siamese import Predictor, ema_update


class EMAUpdateCallback(TrainerCallback):
    """After each optimizer step: the momentum law on the EMA adapter, and the predictor's gradients cleared
    (Trainer's `model.zero_grad()` does not reach the predictor, which is not part of the model)."""

    def __init__(self, model: PeftModel, policy: str, predictor: Predictor, tau: float) -> None:
        self.model, self.policy, self.predictor, self.tau = model, policy, predictor, tau

    def on_step_end(self, args, state, control, **kwargs):
        ema_update(self.model, self.tau, self.policy)
        self.predictor.zero_grad(set_to_none=True)
