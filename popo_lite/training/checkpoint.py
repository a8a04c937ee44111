"""Checkpoints: written to a temporary folder and renamed into place, so a half-written one is never used.

Layout of `checkpoints/step-000010/`:
    policy/           the policy LoRA adapter, a normal PEFT adapter folder
    ema/              the EMA (siamese) adapter, also a normal PEFT adapter (often the better model)
    predictor.pt      the predictor head (POPO)
    trainer_state.pt  optimizer, scheduler, RNG states, data position, step
    COMPLETE          written last; a folder without it is ignored

Only real `step-NNNNNN` folders with N at most the run's `steps` count (`run_paths.scan_checkpoints`):
a `step-NNNNNN.partial` is never a checkpoint, even holding COMPLETE (a kill between the marker and the
rename); a link, a file, another name or a step beyond the run is skipped, with the reason. On resume a
checkpoint that does not load (a truncated file, non-finite weights) is skipped with a warning for the
next older one (`read_latest`); one that loads but does not fit the config's shapes (LoRA rank and
targets, algo, predictor width) stops the resume, naming the fields (`shape_mismatches`).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from peft.utils import load_peft_weights, set_peft_model_state_dict

from popo_lite.core.siamese import EMA, POLICY
from popo_lite.training.run_paths import (
    MARKER,
    RunsError,
    check_checkpoint_files,
    make_folder,
    read_text,
    remove,
    scan_checkpoints,
    write_text,
)

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
    """Write checkpoint `step` under `folder` (a run's `checkpoints/`) atomically; returns its path.

    What stood at its name before (an older try, a planted link or loop) is removed first: a link
    itself, never what it points at (run_paths.remove)."""
    run_dir, name = Path(folder).parent, checkpoint_name(step)
    final = Path(folder) / name
    remove(run_dir, "checkpoints", name + ".partial")
    partial = make_folder(run_dir, "checkpoints", name + ".partial")
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
    write_text(run_dir, "checkpoints", name + ".partial", MARKER, text=f"{step}\n")
    remove(run_dir, "checkpoints", name)
    partial.rename(final)
    return final


def complete_checkpoints(folder: Path, steps: int | None = None) -> list[Path]:
    """The complete checkpoints under `folder` (a run's `checkpoints/`), newest first."""
    return [path for _, path in scan_checkpoints(Path(folder).parent, steps)[0]]


def latest_checkpoint(folder: Path, steps: int | None = None) -> Path | None:
    """The newest complete checkpoint under `folder`, or None."""
    return next(iter(complete_checkpoints(folder, steps)), None)


def read_checkpoint(path: Path, adapters: tuple[str, ...], with_predictor: bool) -> dict:
    """Everything checkpoint `path` holds, read into CPU memory and checked, before any of it is applied.

    Raises CheckpointUnreadable (saying which file and why) for a file that does not load or a tensor
    with NaN or inf: a run then never resumes into a half-restored or non-finite state.
    """
    saved: dict = {"adapters": {}}
    file = ""
    try:
        check_checkpoint_files(path.parent.parent, path.name)
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
    except RunsError as error:
        raise CheckpointUnreadable(str(error)) from None
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


class CheckpointMismatch(ValueError):
    """The newest checkpoint was trained with other shapes than the config asks for (rank, targets, ...)."""


def _adapter_settings(path: Path) -> dict:
    try:
        text = read_text(path.parent.parent, "checkpoints", path.name, POLICY, "adapter_config.json")
        return json.loads(text or "{}")
    except (RunsError, OSError, ValueError):
        return {}  # read_checkpoint then says what is wrong with the adapter


def _targets(value) -> list[str] | str:
    return sorted(value) if isinstance(value, list | tuple | set) else str(value)


def shape_mismatches(path: Path, config) -> list[str]:
    """The shape fields of `config` that checkpoint `path` was not trained with, each as
    'field: the checkpoint's value, not the config's' (lora_rank, lora_target_modules, algo,
    predictor_dim); [] when it fits. Read from the checkpoint's own files, never from config.yaml."""
    mismatches = []
    algo = "popo" if (path / EMA).is_dir() or (path / "predictor.pt").is_file() else "grpo"
    if algo != config.algo:
        mismatches.append(f"algo: the checkpoint's is {algo}, not {config.algo}")
    settings = _adapter_settings(path)
    if "r" in settings and settings["r"] != config.lora_rank:
        mismatches.append(f"lora_rank: the checkpoint's is {settings['r']}, not {config.lora_rank}")
    targets = settings.get("target_modules")
    wanted = config.lora_target_modules
    if targets is not None and not (isinstance(wanted, str) and wanted == "all-linear"):
        if _targets(targets) != _targets(wanted):
            mismatches.append(
                f"lora_target_modules: the checkpoint's are {_targets(targets)}, not {_targets(wanted)}"
            )
    if algo == config.algo == "popo" and (path / "predictor.pt").is_file():
        try:
            width = torch.load(path / "predictor.pt", map_location="cpu", weights_only=True)[
                "net.0.weight"
            ].shape[0]
        except Exception:  # a damaged file: read_checkpoint says so
            width = config.predictor_dim
        if width != config.predictor_dim:
            mismatches.append(f"predictor_dim: the checkpoint's is {width}, not {config.predictor_dim}")
    return mismatches


def read_latest(
    run_dir: Path, config, adapters: tuple[str, ...] = (POLICY, EMA)
) -> tuple[Path | None, dict | None, list[str]]:
    """The newest checkpoint of run `run_dir` that loads, read into CPU memory and checked, before any
    model exists: (its path, what it holds, why each entry before it was refused), or (None, None,
    the reasons) when none loads. A newer one that does not load is skipped with a warning naming it
    and why. CheckpointMismatch when the newest complete checkpoint does not fit the config's shapes."""
    found, refused = scan_checkpoints(run_dir, config.steps)
    for reason in refused:
        logger.warning("resume: skipped %s", reason)
    if found and (mismatches := shape_mismatches(found[0][1], config)):
        raise CheckpointMismatch(f"{found[0][1].name} does not fit the config: {'; '.join(mismatches)}")
    for step, path in found:
        try:
            saved = read_checkpoint(path, adapters, config.algo == "popo")
            if saved["state"]["step"] != step:
                raise CheckpointUnreadable(f"it holds step {saved['state']['step']}, not {step}")
        except CheckpointUnreadable as error:
            logger.warning("resume: checkpoint %s skipped: %s", path, error)
            refused.append(f"{path.name}: {error}")
            continue
        return path, saved, refused
    return None, None, refused
