"""Trainer-level behaviour that matches the authors' reference trainer (docs/algorithm.md section 7):
a step with no positive still steps the optimizer, clipping covers the policy adapter only, warm-up as
Hugging Face's schedulers, micro-batches from a shuffled batch."""

from __future__ import annotations

import math

import pytest
import torch

from popo_lite.core.updates import batch_order, popo_update
from popo_lite.training import trainer
from popo_lite.training.session import lr_lambda, prepare


def test_a_step_with_no_positive_still_steps_adamw_on_the_policy_adapter(tiny_config, monkeypatch):
    monkeypatch.setattr(trainer, "score", lambda text, gold, question=None: (0.0, None))  # all wrong
    config = tiny_config(steps=1, weight_decay=0.1, learning_rate=0.05)
    session = prepare(config)
    before = [p.detach().clone() for p in session.policy_parameters]
    (record,) = trainer.run(session)
    assert record["positive_rate"] == 0 and "skipped" not in record
    assert record["grad_norm"] == 0.0 and "train_tokens_per_s" not in record  # no update work ran
    for param, old in zip(session.policy_parameters, before, strict=True):
        assert session.optimizer.state[param]["step"] == 1  # AdamW took the step
        # zero gradient: Adam's move is 0, decoupled weight decay still shrinks the weights
        torch.testing.assert_close(param.detach(), old * (1 - 0.05 * 0.1), rtol=0, atol=1e-7)
    for param in session.predictor.parameters():
        assert param not in session.optimizer.state  # the predictor is not in that (zero) graph


def test_popo_update_with_no_positive_gives_the_policy_zero_gradients(tiny_config):
    config = tiny_config()
    session = prepare(config)
    rollouts = trainer.generate(session, trainer.next_prompts(session)[1])
    rewards = torch.zeros(config.prompts_per_step, config.rollouts_per_prompt)
    update = popo_update(session.model, session.predictor, rollouts, rewards, config, session.generator)
    assert update.metrics == {} and float(update.row_weights.abs().sum()) == 0
    assert all(p.grad is not None and not p.grad.any() for p in session.policy_parameters)
    assert all(p.grad is None for p in session.predictor.parameters())


def test_gradient_clipping_covers_the_policy_adapter_and_not_the_predictor(tiny_config):
    session = prepare(tiny_config(max_grad_norm=1.0))
    for param in session.policy_parameters:
        param.grad = torch.zeros_like(param)
    session.policy_parameters[0].grad.view(-1)[0] = 0.5  # policy gradient norm 0.5, under the clip
    predictor_params = list(session.predictor.parameters())
    for param in predictor_params:
        param.grad = torch.full_like(param, 100.0)  # a huge predictor gradient
    before = [p.detach().clone() for p in session.policy_parameters]
    grad_norm, skipped = trainer.optimizer_step(session, None)
    assert skipped is None and grad_norm == pytest.approx(0.5)
    # unclipped: Adam's first step moves each touched weight by lr (its sign), whatever the scale
    moved = session.policy_parameters[0].detach().view(-1)[0] - before[0].view(-1)[0]
    lr = session.config.learning_rate
    assert float(moved) == pytest.approx(
        -lr - lr * session.config.weight_decay * float(before[0].view(-1)[0])
    )


@pytest.mark.parametrize(
    ("steps", "ratio", "schedule", "expected"),
    [
        (10, 0.25, "constant", [0.0, 1 / 3, 2 / 3, 1.0, 1.0]),  # ceil(2.5) = 3 warm-up steps from 0
        (10, 0.0, "constant", [1.0, 1.0]),
        (4, 0.5, "cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 2)), 0.0]),
    ],
)
def test_warmup_and_schedule_follow_hugging_face(tiny_config, steps, ratio, schedule, expected):
    factor = lr_lambda(tiny_config(steps=steps, warmup_ratio=ratio, lr_schedule=schedule))
    assert [factor(step) for step in range(len(expected))] == pytest.approx(expected)


def test_micro_batches_come_from_a_seeded_shuffle_of_the_batch_or_keep_row_order():
    order = batch_order(16, True, torch.Generator().manual_seed(3), "cpu")
    assert sorted(order.tolist()) == list(range(16)) and order.tolist() != list(range(16))
    assert torch.equal(order, batch_order(16, True, torch.Generator().manual_seed(3), "cpu"))
    assert batch_order(16, False, torch.Generator().manual_seed(3), "cpu").tolist() == list(range(16))


def test_the_split_changes_the_gradient_and_the_shuffle_reaches_popo_update(tiny_config):
    """NLL and similarity are normalised per micro-batch, so which rows share one matters."""
    rewards = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]])

    names = iter(range(100))

    def gradient(**overrides) -> torch.Tensor:
        config = tiny_config(noise_std=0.0, lora_dropout=0.0, run_name=f"run-{next(names)}", **overrides)
        session = prepare(config)
        with torch.no_grad():  # a live adapter, the same in every call
            for name, param in session.model.named_parameters():
                if "lora_B.policy" in name:
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        torch.manual_seed(0)
        rollouts = trainer.generate(session, trainer.next_prompts(session)[1])
        popo_update(
            session.model, session.predictor, rollouts, rewards, config, torch.Generator().manual_seed(1)
        )
        return torch.cat([p.grad.flatten() for p in session.policy_parameters])

    whole = gradient(micro_batch_size=16, shuffle_micro_batches=True)
    torch.testing.assert_close(whole, gradient(micro_batch_size=16, shuffle_micro_batches=False))
    in_order, shuffled = (
        gradient(micro_batch_size=4, shuffle_micro_batches=False),
        gradient(micro_batch_size=4),
    )
    assert not torch.allclose(in_order, shuffled)
