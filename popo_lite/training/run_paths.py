"""Every path popo_lite reads, writes, lists or deletes under a run folder, and the one rule they keep.

The command line, the trainer, the evaluator and the panel open a run's files through these functions
only (planted symlinks once made them write, delete and show files outside the runs folder):

1. A path is named by the run folder and plain parts below it (`"checkpoints", "step-000002"`); a part
   that is empty, `.` or `..` is refused.
2. Every folder on the way resolves (symlinks followed) inside the run folder, else a RunsError.
3. The last part is never followed: it is opened with `O_NOFOLLOW`, so a symlink there is refused,
   whether it points outside the run or not. A file must be a regular file (not a folder, FIFO or
   device), a folder a real folder.
4. Deleting a link deletes the link, never what it points at.

Torch-free: the panel imports it. Lock and slot names under the runs folder are not built here but
from a closed set (`job_slot.slot_of`).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import IO

import yaml

CHECKPOINT = re.compile(r"step-(\d{6,})")  # a checkpoint folder's whole name (never a `.partial`)
MARKER = "COMPLETE"  # written last into a checkpoint: a folder without it is unfinished
FILES = ("config.yaml", "metrics.jsonl", "rollouts.jsonl", "train.log", ".writer.lock")
FOLDERS = ("checkpoints", "eval", "evaluations", "tensorboard", "vllm_adapter", "wandb")
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # not on Windows: there the resolve check below is all


class RunsError(ValueError):
    """A request about runs cannot be done; the message says why, fit to show in the panel."""


def _parts(parts: tuple[str, ...]) -> list[str]:
    names = [name for part in parts for name in Path(str(part)).parts]
    if not names or any(name in ("", ".", "..") or name.startswith("/") for name in names):
        raise RunsError(f"{'/'.join(map(str, parts))!r}: a run file is named by plain parts, never '..'")
    return names


def locate(run_dir: str | Path, *parts: str) -> Path:
    """`run_dir/parts` with every folder on the way resolved inside `run_dir`; the last part unresolved.

    Raises RunsError naming the path when a folder on the way leaves the run folder or loops."""
    names = _parts(parts)
    base = Path(run_dir).resolve()
    shown = "/".join(names)
    try:
        parent = base.joinpath(*names[:-1]).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        raise RunsError(f"{shown} in run {base.name!r}: a folder on the way is a symlink loop") from None
    if not parent.is_relative_to(base):
        raise RunsError(f"{shown} in run {base.name!r} leaves the run folder (through a symlink)")
    return parent / names[-1]


def _kind(path: Path) -> str | None:
    """'file', 'folder', 'link' or 'other' for what is at `path` (never followed); None when nothing."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RunsError(f"{path}: {error.strerror or error}") from None
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode) else "other"


def _refuse(path: Path, kind: str, wanted: str) -> RunsError:
    what = {"link": "a symbolic link", "folder": "a folder", "file": "a file"}.get(
        kind, "not a regular file or folder (a FIFO, socket or device)"
    )
    return RunsError(f"{path} is {what}, not a {wanted}: popo_lite uses only real files inside a run folder")


def file_path(run_dir: str | Path, *parts: str) -> Path | None:
    """The path of an existing regular file under the run, None when there is nothing; RunsError when
    it leaves the run or is a link, a folder or anything but a regular file."""
    path = locate(run_dir, *parts)
    kind = _kind(path)
    if kind not in (None, "file"):
        raise _refuse(path, kind, "file")
    return path if kind else None


def folder_path(run_dir: str | Path, *parts: str) -> Path | None:
    """The path of an existing real folder under the run, None when there is nothing; RunsError else."""
    path = locate(run_dir, *parts)
    kind = _kind(path)
    if kind not in (None, "folder"):
        raise _refuse(path, kind, "folder")
    return path if kind else None


def open_file(run_dir: str | Path, *parts: str, mode: str = "r") -> IO:
    """Open a run file: 'r'/'rb' read, 'w'/'wb' replace, 'a'/'ab' append (created when missing).

    `O_NOFOLLOW`, and a FIFO or device is refused before it can block (`O_NONBLOCK`) or be written."""
    path = locate(run_dir, *parts)
    flags = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC}
    flags["a"] = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    extra = NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags[mode[0]] | extra, 0o644)
    except OSError:
        kind = _kind(path)
        if kind not in (None, "file"):
            raise _refuse(path, kind, "file") from None
        raise
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise _refuse(path, "other", "file")
    os.set_blocking(descriptor, True)
    binary = "b" in mode
    return os.fdopen(descriptor, mode, **({} if binary else {"encoding": "utf-8", "errors": "replace"}))


def read_text(run_dir: str | Path, *parts: str, limit: int | None = None) -> str | None:
    """A run file's text (at most `limit` characters from its start), None when it is missing."""
    if file_path(run_dir, *parts) is None:
        return None
    with open_file(run_dir, *parts) as handle:
        return handle.read() if limit is None else handle.read(limit)


def write_text(run_dir: str | Path, *parts: str, text: str) -> Path:
    """Replace (or create) a run file with `text`; returns its path."""
    with open_file(run_dir, *parts, mode="w") as handle:
        handle.write(text)
    return locate(run_dir, *parts)


def save_config(run_dir: str | Path, config) -> Path:
    """`config.yaml`, the resolved config, as `Config.save` writes it but never through a link."""
    return write_text(run_dir, "config.yaml", text=yaml.safe_dump(config.to_dict(), sort_keys=False))


def make_folder(run_dir: str | Path, *parts: str) -> Path:
    """Create a folder under the run (parents too, each checked), or find it; returns its path."""
    names = _parts(parts)
    for end in range(1, len(names) + 1):
        path = folder_path(run_dir, *names[:end])
        if path is None:
            path = locate(run_dir, *names[:end])
            try:
                path.mkdir()
            except FileExistsError:  # made meanwhile: checked again
                pass
            folder_path(run_dir, *names[:end])
    return locate(run_dir, *names)


def entries(run_dir: str | Path, *parts: str) -> list[Path]:
    """What a folder under the run holds (paths, unresolved), sorted; [] when the folder is missing."""
    folder = folder_path(run_dir, *parts)
    return sorted(folder.iterdir()) if folder is not None else []


def remove(run_dir: str | Path, *parts: str) -> None:
    """Delete a file, a link (the link itself) or a folder tree under the run; nothing there is fine."""
    path = locate(run_dir, *parts)
    kind = _kind(path)
    if kind == "folder":
        shutil.rmtree(path)  # rmtree removes links inside a tree, never what they point at
    elif kind is not None:
        path.unlink()


def check_run_folder(run_dir: str | Path) -> None:
    """Before a run folder is resumed or written: each of its known files is a regular file and each
    known folder a real folder, inside the run. RunsError naming the first that is not."""
    for name in FILES:
        file_path(run_dir, name)
    for name in FOLDERS:
        folder_path(run_dir, name)


# --- checkpoint folders (their contents: training/checkpoint.py) ----------------------------------


def scan_checkpoints(run_dir: str | Path, steps: int | None) -> tuple[list[tuple[int, Path]], list[str]]:
    """The run's complete checkpoints, newest first, as (step, path); and every other entry of
    `checkpoints/` as 'name: why it is skipped'. A checkpoint is a real folder `step-N` (N at most
    `steps`, the run's) holding a regular file COMPLETE."""
    found: list[tuple[int, Path]] = []
    skipped: list[str] = []
    try:
        listed = entries(run_dir, "checkpoints")
    except RunsError as error:
        return [], [f"checkpoints: {error}"]
    for path in listed:
        match = CHECKPOINT.fullmatch(path.name)
        step = int(match.group(1)) if match else None
        try:
            kind = _kind(path)
            marker = _kind(path / MARKER) if kind == "folder" else None
        except RunsError as error:
            skipped.append(f"{path.name}: {error}")
            continue
        if path.name.endswith(".partial"):
            reason = "an unfinished write (.partial)"
        elif step is None or path.name != f"step-{step:06d}":
            reason = "not a checkpoint name (step-NNNNNN)"
        elif steps is not None and step > steps:
            reason = f"step {step} is beyond the run's {steps} steps"
        elif kind != "folder":
            reason = {"link": "a symbolic link", "file": "a file"}.get(kind, "not a folder")
        elif marker is None:
            reason = f"no {MARKER} file (the save did not finish)"
        elif marker != "file":
            reason = f"its {MARKER} is {'a folder' if marker == 'folder' else 'a link'}, not a file"
        else:
            found.append((step, path))
            continue
        skipped.append(f"{path.name}: {reason}")
    found.sort(key=lambda item: item[0], reverse=True)
    return found, skipped


def check_checkpoint_files(run_dir: str | Path, name: str) -> None:
    """RunsError unless every file of checkpoint `name` (and of its adapter folders) is a regular file
    inside the run: the loaders follow links, so a planted one would read a file from outside."""
    parts = ("checkpoints", name)
    for entry in entries(run_dir, *parts):
        if _kind(entry) == "folder":
            for inner in entries(run_dir, *parts, entry.name):
                file_path(run_dir, *parts, entry.name, inner.name)
        else:
            file_path(run_dir, *parts, entry.name)
