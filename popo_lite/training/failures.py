"""What stops a run, and the one message that says what to change: out of memory, disk full.

Kept free of heavy imports: `popo_lite.plan` names the same config fields before anything loads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from popo_lite.config import Config


class TrainingError(RuntimeError):
    """A run cannot go on (out of memory, disk full); the message says what to change.

    Raised only between checkpoints: the last complete checkpoint is always left valid.
    """


OOM_ADVICE = {  # also popo_lite.plan's advice when a config does not fit
    "generation": "set or lower prefill_chunk_size (now {prefill_chunk_size}), or lower "
    "generation_batch_size (now {generation_batch_size}), max_prompt_tokens (now {max_prompt_tokens}), "
    "max_new_tokens (now {max_new_tokens}) or prompts_per_step x rollouts_per_prompt (now "
    "{prompts_per_step} x {rollouts_per_prompt})",
    "update": "lower micro_batch_size (now {micro_batch_size}) or max_new_tokens (now {max_new_tokens}), "
    "keep gradient_checkpointing on (now {gradient_checkpointing}), or use --qlora (now {qlora})",
}


@contextmanager
def out_of_memory_advice(config: Config, phase: str, last_checkpoint: Path | None) -> Iterator[None]:
    """Turn a GPU out-of-memory error into one message naming the config fields to lower."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kept = f"; the last checkpoint ({last_checkpoint}) is intact" if last_checkpoint else ""
        advice = OOM_ADVICE[phase].format(**config.to_dict())
        raise TrainingError(f"out of GPU memory during {phase}: {advice}{kept}") from None
