"""One job per accelerator: the lock a training or evaluation job holds while it lives.

An exclusive lock file `<runs folder>/.active-<slot>.json` holds the job's pid, taken with O_EXCL. A
lock whose process is gone (ended, crashed, machine rebooted) is stale: the next look clears it, so
nothing has to be watching when a job ends. The web panel takes it for the jobs it starts
(`panel/jobs.py`); `python -m popo_lite.train` takes it for its own pid (`holding_slot`), so a terminal
run and a panel run never share a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from popo_lite.training.runs import RunsError

PANEL_JOB_ENV = "POPO_LITE_PANEL_JOB"  # set in a panel job's environment: the panel holds its slot
CHILDREN: dict[int, subprocess.Popen] = {}  # the panel's own children, polled so they never linger as zombies


def slot_of(device: str) -> str:
    """The accelerator a run's `device` setting occupies: 'auto' and 'cuda' mean GPU 0."""
    if device in ("auto", "cuda"):
        return "gpu0"
    if str(device).startswith("cuda:"):
        return "gpu" + str(device).split(":", 1)[1]
    return "cpu"


def alive(pid: int, module: str) -> bool:
    """Is `pid` a live (not zombie) process running `module`? The module check guards a recycled pid."""
    child = CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del CHILDREN[pid]  # reaped now, so it does not linger as a zombie
        return False
    if not Path("/proc/self").is_dir():  # no procfs: existence is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and module in command


def lock_path(root: Path, slot: str) -> Path:
    return Path(root) / f".active-{slot}.json"


def active_job(root: str | Path, slot: str) -> dict | None:
    """The live job holding `slot` ({run, kind, pid, module, started}), clearing a stale lock."""
    path = lock_path(Path(root), slot)
    try:
        job = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        job = {"started": path.stat().st_mtime if path.exists() else 0}  # being written: judge by age
    pid = job.get("pid")
    starting = pid is None and time.time() - float(job.get("started", 0)) < 60
    if starting or (pid is not None and alive(int(pid), job.get("module", "popo_lite."))):
        return job
    path.unlink(missing_ok=True)
    return None


def busy_message(slot: str, job: dict) -> str:
    return (
        f"{slot} is busy: {job.get('kind', 'a job')} of run {job.get('run')!r} (pid {job.get('pid')}) is "
        "active. Stop it or wait for it to end: one job per GPU at a time."
    )


def claim(root: Path, slot: str, job: dict) -> Path:
    """Take `slot` atomically (O_EXCL), or raise RunsError naming the job that holds it."""
    path = lock_path(root, slot)
    for _ in range(2):  # the second try follows the clearing of a stale lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = active_job(root, slot)
            if holder is not None:
                raise RunsError(busy_message(slot, holder)) from None
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(job, handle)
        return path
    raise RunsError(f"could not take the lock {path.name}; try again")


@contextmanager
def holding_slot(root: str | Path, slot: str, run: str) -> Iterator[None]:
    """Hold `slot` for a command-line training run while it lives (RunsError when another job has it).

    A job the panel started already holds its slot for this process: nothing to take then.
    """
    if os.environ.get(PANEL_JOB_ENV) == slot:
        yield
        return
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    job = {"run": run, "kind": "training", "module": "popo_lite.train", "origin": "command line"}
    path = claim(root, slot, {**job, "pid": os.getpid(), "started": time.time()})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def active_jobs(root: str | Path) -> list[dict]:
    """Every live job started from the panel under `root`, each with its `slot`."""
    base = Path(root)
    slots = sorted(p.name[len(".active-") : -len(".json")] for p in base.glob(".active-*.json"))
    return [{**job, "slot": slot} for slot in slots if (job := active_job(base, slot)) is not None]
