"""One process of the data-parallel test (tests/test_distributed.py), started by `accelerate launch`.

Trains through `popo_lite.trainer` like `python -m popo_lite.train` does, and saves what this process
holds afterwards (policy and EMA adapters, predictor) and which problems it was given, for the test
to compare across processes. Usage: distributed_worker.py CONFIG.yaml OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from popo_lite import trainer
from popo_lite.config import load_config


def main(config_path: str, out_dir: str) -> None:
    session = trainer.prepare(load_config(config_path))
    seen: list[str] = []
    format_prompt = trainer.format_prompt

    def recording(problem: str, *args, **kwargs) -> str:
        seen.append(problem)
        return format_prompt(problem, *args, **kwargs)

    trainer.format_prompt = recording
    initial = {name: p.detach().clone() for name, p in session.model.named_parameters() if p.requires_grad}
    records = list(trainer.run(session))
    state = {name: p.detach().clone() for name, p in session.model.named_parameters() if "lora_" in name}
    if session.predictor is not None:
        state.update({f"predictor.{k}": v.clone() for k, v in session.predictor.state_dict().items()})
    rank = session.replicas.rank
    torch.save(
        {
            "state": state,
            "initial": initial,
            "records": records,
            "problems": seen,
            "world": session.replicas.world,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
