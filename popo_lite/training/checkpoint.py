"""Checkpoints: written to a temporary folder and renamed into place, so a half-written one is never used.

Layout of `checkpoints/step-000010/`:
    policy/           the policy LoRA adapter, a normal PEFT adapter folder
    ema/              the EMA (siamese) adapter, also a normal PEFT adapter (often the better model)
    predictor.pt      the predictor head (POPO)
    trainer_state.pt  optimizer, scheduler, RNG states, data position, step
    COMPLETE          written last; a folder without it is ignored

Only `step-NNNNNN` folders count: a `step-NNNNNN.partial` is never a checkpoint, even holding COMPLETE
(a kill between the marker and the rename). On resume a checkpoint that does not load (a truncated file,
non-finite weights) is skipped with a warning for the next older one (`load_latest`).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from peft.utils import load_peft_weights, set_peft_model_state_dict

from popo_lite.core.siamese import EMA, POLICY

MARKER = "COMPLETE"
CHECKPOINT = re.compile(r"step-(\d+)")  # the folder name, whole: never a `.partial`
logger = logging.getLogger(__name__)


class CheckpointUnreadable(ValueError):
    """A complete checkpoint's files do not load (truncated, corrupt) or hold non-finite numbers."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    step: int,
    model,
    predictor,
    optimizer,
    scheduler,
    extra: dict,
    adapters: tuple[str, ...] = (POLICY, EMA),
) -> Path:
    """Write checkpoint `step` under `folder` atomically; returns its path."""
    final = folder / checkpoint_name(step)
    partial = folder / (checkpoint_name(step) + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model.save_pretrained(partial, selected_adapters=list(adapters))
    if predictor is not None:
        torch.save(predictor.state_dict(), partial / "predictor.pt")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            **extra,
        },
        partial / "trainer_state.pt",
    )
    (partial / MARKER).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints under `folder`, newest first (`.partial` folders never count)."""
    found = [
        p for p in Path(folder).glob("step-*") if CHECKPOINT.fullmatch(p.name) and (p / MARKER).is_file()
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT.fullmatch(p.name).group(1)), reverse=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under `folder`, or None."""
    return next(iter(complete_checkpoints(folder)), None)


def read_checkpoint(path: Path, adapters: tuple[str, ...], with_predictor: bool) -> dict:
    """Everything checkpoint `path` holds, read into CPU memory and checked, before any of it is applied.

    Raises CheckpointUnreadable (saying which file and why) for a file that does not load or a tensor
    with NaN or inf: a run then never resumes into a half-restored or non-finite state.
    """
    saved: dict = {"adapters": {}}
    file = ""
    try:
        for adapter in adapters:
            file = f"{adapter}/"
            if not (path / adapter).is_dir():  # else load_peft_weights would look for a Hub id
                raise FileNotFoundError(f"no folder {path / adapter}")
            saved["adapters"][adapter] = load_peft_weights(str(path / adapter), device="cpu")
        if with_predictor:
            file = "predictor.pt"
            saved["predictor"] = torch.load(path / file, map_location="cpu")
        file = "trainer_state.pt"
        saved["state"] = torch.load(path / file, map_location="cpu", weights_only=False)
        for key in ("step", "optimizer", "scheduler", "rng", "sampler", "noise_generator"):
            if key not in saved["state"]:
                raise KeyError(f"no {key!r} in it")
    except Exception as error:  # truncated zip, bad safetensors header, unpickling error, missing file
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointUnreadable(f"{file} does not load ({reason})") from None
    tensors = [("policy/ema adapter", t) for weights in saved["adapters"].values() for t in weights.values()]
    tensors += [("predictor.pt", t) for t in saved.get("predictor", {}).values()]
    tensors += [
        ("optimizer state", t)
        for entry in saved["state"]["optimizer"].get("state", {}).values()
        for t in entry.values()
    ]
    for where, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointUnreadable(f"its {where} holds non-finite values (NaN or inf)")
    return saved


def apply_checkpoint(saved: dict, model, predictor, optimizer, scheduler) -> dict:
    """Restore what `read_checkpoint` read; returns the trainer state (step, data position, ...)."""
    for adapter, weights in saved["adapters"].items():
        set_peft_model_state_dict(model, weights, adapter_name=adapter)
    if predictor is not None:
        predictor.load_state_dict(saved["predictor"])
    state = saved["state"]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def load_checkpoint(
    path: Path, model, predictor, optimizer, scheduler, adapters: tuple[str, ...] = (POLICY, EMA)
) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, data position, ...)."""
    saved = read_checkpoint(path, adapters, predictor is not None)
    return apply_checkpoint(saved, model, predictor, optimizer, scheduler)


def load_latest(
    folder: Path, model, predictor, optimizer, scheduler, adapters: tuple[str, ...] = (POLICY, EMA)
) -> tuple[Path, dict] | None:
    """Restore the newest checkpoint under `folder` that loads: (its path, trainer state), or None when
    there is none. A newer one that does not load is skipped with a warning naming it and why; when
    checkpoints exist but none loads, CheckpointUnreadable (resuming from scratch would lose the run)."""
    found = complete_checkpoints(folder)
    for path in found:
        try:
            saved = read_checkpoint(path, adapters, predictor is not None)
        except CheckpointUnreadable as error:
            logger.warning("resume: checkpoint %s skipped: %s", path, error)
            continue
        return path, apply_checkpoint(saved, model, predictor, optimizer, scheduler)
    if found:
        raise CheckpointUnreadable(
            f"no checkpoint of {folder} loads ({', '.join(p.name for p in found)}: see the warnings "
            "above); move them away to start the run over"
        )
    return None
