"""One process of the data-parallel tests (tests/test_distributed.py), started by `accelerate launch`.

distributed_worker.py CONFIG.yaml OUT_DIR train      trains like `python -m popo_lite.train`, then saves
                                                     this process's adapters, EMA, predictor and prompts
distributed_worker.py CONFIG.yaml OUT_DIR gradient   one POPO update on this process's share of FIXED
                                                     rollouts; saves the all-reduced gradients
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from popo_lite.config import Config, load_config
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.updates import popo_update
from popo_lite.training import trainer

# 4 prompts x 4 rollouts; prompt 1 has no positive (a zero-positive micro-batch at micro_batch_size 4).
REWARDS = torch.tensor(
    [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]]
)


def fixed_rollouts(vocab: int, group: int = 4) -> Rollouts:
    """Deterministic rollouts for REWARDS: left-padded prompts, completions of different lengths."""
    generator = torch.Generator().manual_seed(0)
    rows = REWARDS.numel()
    prompt_ids = torch.randint(3, vocab, (rows, 6), generator=generator)
    prompt_mask = torch.ones(rows, 6, dtype=torch.long)
    prompt_mask[::3, :2] = 0
    completion_ids = torch.randint(3, vocab, (rows, 5), generator=generator)
    lengths = torch.randint(1, 6, (rows,), generator=generator)
    completion_mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    return Rollouts(prompt_ids, prompt_mask, completion_ids, completion_mask, [""] * rows, group, 0.0)


def share(rollouts: Rollouts, rewards: torch.Tensor, rank: int, world: int) -> tuple[Rollouts, torch.Tensor]:
    """Process `rank`'s whole prompt groups, as the trainer shards them."""
    prompts = rewards.shape[0] // world
    rows = slice(rank * prompts * rollouts.group_size, (rank + 1) * prompts * rollouts.group_size)
    part = Rollouts(
        rollouts.prompt_ids[rows],
        rollouts.prompt_mask[rows],
        rollouts.completion_ids[rows],
        rollouts.completion_mask[rows],
        rollouts.texts[rows],
        rollouts.group_size,
        0.0,
    )
    return part, rewards[rank * prompts : (rank + 1) * prompts]


def gradients(session: trainer.Session, config: Config, world: int, rank: int) -> dict[str, torch.Tensor]:
    """One POPO update on this process's share of the fixed rollouts; the trainable parameters' gradients."""
    rollouts, rewards = share(fixed_rollouts(session.tokenizer.vocab_size), REWARDS, rank, world)
    popo_update(
        session.model,
        session.predictor,
        rollouts,
        rewards,
        config,
        torch.Generator().manual_seed(0),
        session.replicas,
    )
    named = [*session.model.named_parameters(), *session.predictor.named_parameters(prefix="predictor")]
    return {name: p.grad.clone() for name, p in named if p.requires_grad}


def main(config_path: str, out_dir: str, mode: str) -> None:
    config = load_config(config_path)
    session = trainer.prepare(config)
    rank, world = session.replicas.rank, session.replicas.world
    out = Path(out_dir) / f"{mode}-rank{rank}.pt"
    if mode == "gradient":
        torch.save(gradients(session, config, world, rank), out)
        return
    seen: list[str] = []
    format_prompt = trainer.format_prompt

    def recording(problem: str, *args, **kwargs) -> str:
        seen.append(problem)
        return format_prompt(problem, *args, **kwargs)

    trainer.format_prompt = recording
    initial = {name: p.detach().clone() for name, p in session.model.named_parameters() if p.requires_grad}
    records = list(trainer.run(session))
    state = {name: p.detach().clone() for name, p in session.model.named_parameters() if "lora_" in name}
    state.update({f"predictor.{k}": v.clone() for k, v in session.predictor.state_dict().items()})
    torch.save(
        {"state": state, "initial": initial, "records": records, "problems": seen, "world": world}, out
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
