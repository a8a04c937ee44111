"""Checkpoints: written to a temporary folder and renamed into place, so a half-written one is never used.

Layout of `checkpoints/step-000010/`:
    policy/           the policy LoRA adapter, a normal PEFT adapter folder
    ema/              the EMA (siamese) adapter, also a normal PEFT adapter (often the better model)
    predictor.pt      the predictor head (POPO)
    trainer_state.pt  optimizer, scheduler, RNG states, data position, step
    COMPLETE          written last; a folder without it is ignored
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from peft.utils import load_peft_weights, set_peft_model_state_dict

from popo_lite.core.siamese import EMA, POLICY

MARKER = "COMPLETE"


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


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint under `folder`, or None."""
    complete = [p for p in folder.glob("step-*") if p.is_dir() and (p / MARKER).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(
    path: Path, model, predictor, optimizer, scheduler, adapters: tuple[str, ...] = (POLICY, EMA)
) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, data position, ...)."""
    device = next(model.parameters()).device
    for adapter in adapters:
        weights = load_peft_weights(str(path / adapter), device=str(device))
        set_peft_model_state_dict(model, weights, adapter_name=adapter)
    if predictor is not None:
        predictor.load_state_dict(torch.load(path / "predictor.pt", map_location=device))
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
