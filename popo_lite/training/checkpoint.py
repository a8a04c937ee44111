"""Checkpoints: written to a temporary folder and renamed into place, so a half-written one is never used.

Layout of `checkpoints/step-000010/`:
    policy/           the policy LoRA adapter, a normal PEFT adapter folder
    ema/              the EMA (siamese) adapter, also a normal PEFT adapter (often the better model)
    predictor.pt      the predictor head (POPO)
    trainer_state.pt  optimizer, scheduler, RNG states, data position, step
    shape.json        the config's LoRA rank and targets, algo and predictor width (what a resume must keep)
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
    file_path,
    folder_path,
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
    shape: dict | None = None,
) -> Path:
    """Write checkpoint `step` under `folder` (a run's `checkpoints/`) atomically; returns its path.
    `shape` (`shape_of(config)`) is kept in shape.json, for a resume to check its config against.

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
    if shape is not None:
        write_text(run_dir, "checkpoints", name + ".partial", SHAPE_FILE, text=json.dumps(shape))
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


SHAPE = ("lora_rank", "lora_target_modules", "algo", "predictor_dim")  # what a resume must keep
SHAPE_FILE = "shape.json"  # the config's SHAPE fields, in every checkpoint


def shape_of(config) -> dict:
    return {name: getattr(config, name) for name in SHAPE}


def _saved_shape(path: Path) -> dict:
    """The shape checkpoint `path` was trained with: its shape.json, or what its files tell (a
    checkpoint written before shape.json: algo, rank and predictor width, not the targets)."""
    run_dir, parts = path.parent.parent, ("checkpoints", path.name)
    text = read_text(run_dir, *parts, SHAPE_FILE)
    if text:
        return json.loads(text)
    shape: dict = {"algo": "popo" if folder_path(run_dir, *parts, EMA) else "grpo"}
    settings = json.loads(read_text(run_dir, *parts, POLICY, "adapter_config.json") or "{}")
    if "r" in settings:
        shape["lora_rank"] = settings["r"]
    predictor = file_path(run_dir, *parts, "predictor.pt")
    if predictor is not None:
        weights = torch.load(predictor, map_location="cpu", weights_only=True)
        shape["predictor_dim"] = int(weights["net.0.weight"].shape[0])
    return shape


def _comparable(value):
    return sorted(value) if isinstance(value, list | tuple) else value


def shape_mismatches(path: Path, config) -> list[str]:
    """The SHAPE fields of `config` that checkpoint `path` was not trained with, each as
    "field X in the checkpoint, Y in the config"; [] when it fits (or its files do not say: then
    `read_checkpoint` names what is wrong with them)."""
    try:
        saved = _saved_shape(path)
    except Exception:  # a damaged or planted file: read_checkpoint refuses it with the reason
        return []
    wanted = shape_of(config)
    both_popo = saved.get("algo") == config.algo == "popo"
    return [
        f"{name} {saved[name]!r} in the checkpoint, {wanted[name]!r} in the config"
        for name in SHAPE
        if name in saved
        and _comparable(saved[name]) != _comparable(wanted[name])
        and (name != "predictor_dim" or both_popo)
    ]


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
