"""Common random numbers: arms of one seed that differ in their method share every other random draw.

GRPO and POPO sample the same step-1 rollouts (the untrained policies are one and the same), and an
ablation that draws less similarity noise still shuffles its micro-batches as POPO does.
"""

from __future__ import annotations

import torch

from popo_lite.core import updates
from popo_lite.training.trainer import prepare, step


def _step_rollouts(config, steps: int = 1):
    """The completion ids each step of a fresh run sampled."""
    session = prepare(config)
    sampled = []
    engine = session.generate

    def capture(*args, **kwargs):
        rollouts = engine(*args, **kwargs)
        sampled.append(rollouts.completion_ids.clone())
        return rollouts

    session.generate = capture
    for _ in range(steps):
        step(session)
    session.writer.release()
    return sampled


def test_grpo_and_popo_of_one_seed_sample_the_same_step_one_rollouts(tiny_config):
    grpo = _step_rollouts(tiny_config(algo="grpo", run_name="grpo", max_new_tokens=4))
    popo = _step_rollouts(tiny_config(algo="popo", run_name="popo", max_new_tokens=4))
    assert torch.equal(grpo[0], popo[0])
    assert len({tuple(row.tolist()) for row in popo[0]}) > 1  # sampled, not one completion copied


def test_an_ablation_without_the_similarity_noise_shuffles_as_popo_does(tiny_config, monkeypatch):
    orders: list[list[int]] = []
    original = updates.batch_order

    def recording(*args):
        orders.append(original(*args).tolist())
        return torch.tensor(orders[-1])

    monkeypatch.setattr(updates, "batch_order", recording)
    shuffled = {}
    for name, alpha in (("popo", 0.1), ("no-similarity", 0.0)):
        orders.clear()
        config = tiny_config(
            run_name=name, alpha=alpha, noise_std=0.5, steps=3, micro_batch_size=4, kl_every=0
        )
        _step_rollouts(config, steps=3)
        shuffled[name] = list(orders)
    assert len(shuffled["popo"]) == 3 and shuffled["popo"][1] != list(range(16))
    assert shuffled["popo"] == shuffled["no-similarity"]
