"""Data-parallel training under `accelerate launch`: one process per GPU, prompts sharded, groups whole.

accelerate starts the processes and owns the process group; PyTorch DDP averages the gradients. What
popo_lite adds is only what keeps POPO exact across processes:

- each step's prompts are drawn from ONE sampler (the same on every process) and split by prompt, so a
  group's G rollouts live on one process and its weights (normalised within the group) are the ones a
  single process would compute;
- the gradient forward goes through `core.policy_forward.PolicyForward` (policy log-probs + predictor),
  the one module DDP wraps,
  and every process runs the same number of micro-batch backwards, all but the last under `no_sync`;
- DDP hands every process the same averaged gradient, so the optimizer step, and with it the EMA
  adapter (an fp32 average of the policy's weights), stay identical on every process without any sync;
- files (config, metrics, rollouts, checkpoints, evaluation) are written by the main process only.

On one process none of this is created: `start` returns None and the trainer runs as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from popo_lite.config import Config, check_split
from popo_lite.core.policy_forward import PolicyForward


def shard(items: list, rank: int, world: int) -> list:
    """Process `rank`'s contiguous share of the step's prompts (every process holds the same list)."""
    share = len(items) // world
    return items[rank * share : (rank + 1) * share]


def world_size() -> int:
    """Processes in this launch (`accelerate launch` and `torchrun` set WORLD_SIZE); 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Replicas:
    """This process's place in a data-parallel launch, and the few collectives the trainer needs."""

    def __init__(self, config: Config) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        on_cpu = config.device == "cpu" or not torch.cuda.is_available()
        # The main process evaluates and checkpoints while the others wait at the next collective.
        timeout = InitProcessGroupKwargs(timeout=timedelta(hours=2))
        self.accelerator = Accelerator(cpu=on_cpu, kwargs_handlers=[timeout])
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = torch.device("cpu") if on_cpu else self.accelerator.device
        self.forward: nn.Module | None = None
        check_split(config.prompts_per_step, self.world)

    def wrap(self, forward: PolicyForward) -> None:
        """Hand the scorer to accelerate (DDP). Frozen tensors (the base, the EMA adapter) stay out of DDP:
        every process loads the same base, and the EMA is re-copied from the broadcast policy after this."""
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, param in forward.named_parameters() if not param.requires_grad]
        frozen += [name for name, _ in forward.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(forward, frozen)
        self.forward = self.accelerator.prepare_model(forward, device_placement=False)

    def shard(self, items: list) -> list:
        return shard(items, self.rank, self.world)

    def step_seed(self, seed: int, step: int) -> int:
        """Sampling seed of one step on this process: different per process, reproducible on resume."""
        return (seed * 1_000_003 + step) * 1_009 + self.rank

    def sync(self, last: bool):
        """Gradient all-reduce on the last micro-batch of a step only (`no_sync` before it)."""
        return nullcontext() if last else self.accelerator.no_sync(self.forward)

    def main_first(self, action: Callable[[], Any]) -> Any:
        """Run `action` on the main process and hand its result, or its exception, to every process."""
        from torch.distributed import broadcast_object_list

        box: list = [None, None]
        if self.is_main:
            try:
                box[0] = action()
            except Exception as error:  # re-raised on every process below
                box[1] = error
        broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Concatenate equally shaped per-process tensors along dim 0, in rank order, on every process
        (moved to this process's device first: NCCL gathers GPU tensors only)."""
        return [self.accelerator.gather(tensor.to(self.device).contiguous()).cpu() for tensor in tensors]

    def max_count(self, count: int) -> int:
        """The largest `count` over the processes."""
        value = torch.tensor([count], device=self.device)
        return int(self.accelerator.reduce(value, reduction="max"))

    def mean_metrics(self, metrics: dict) -> dict:
        """Average each numeric metric over the processes that reported it; text is the main process's."""
        from accelerate.utils import gather_object

        reported = gather_object([metrics])
        merged: dict = {}
        for key in dict.fromkeys(key for entry in reported for key in entry):
            values = [entry[key] for entry in reported if key in entry]
            numeric = [v for v in values if isinstance(v, int | float)]
            merged[key] = sum(numeric) / len(numeric) if len(numeric) == len(values) else values[0]
        return merged

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()


def start(config: Config) -> Replicas | None:
    """The data-parallel context when launched on several processes, else None."""
    return Replicas(config) if world_size() > 1 else None
