"""One job per accelerator: the lock a training or evaluation job holds while it lives.

An exclusive lock file `<runs folder>/.active-<slot>.json` holds the job's pid, taken with O_EXCL. A
lock whose process is gone (ended, crashed, machine rebooted) is stale: the next look clears it, so
nothing has to be watching when a job ends. The web panel takes it for the jobs it starts
(`panel/jobs.py`); `python -m popo_lite.train` takes it for its own pid (`holding_slot`), so a terminal
run and a panel run never share a GPU.

Slot names come from a closed set, `cpu` and `gpuN` (N below 100), computed from a device setting that
must be one of auto, cpu, mps, cuda, cuda:N: text from a config never becomes part of a lock's path.
A lock file is opened without following a link.

One writer per run directory, whatever the device spelling: the trainer's main process holds
`<run>/.writer.lock` (flock, its pid inside) from `prepare` until training ends (`hold_run_directory`).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from popo_lite.config import DEVICE
from popo_lite.training.run_paths import NOFOLLOW, RunsError, locate

SLOT = re.compile(r"cpu|gpu(0|[1-9][0-9]?)")  # every slot name there is

PANEL_JOB_ENV = "POPO_LITE_PANEL_JOB"  # set in a panel job's environment: the panel holds its slot
CHILDREN: dict[int, subprocess.Popen] = {}  # the panel's own children, polled so they never linger as zombies


def slot_of(device: str) -> str:
    """The accelerator a run's `device` setting occupies: 'cuda' means GPU 0, and so does 'auto' where
    CUDA is available ('auto' is the CPU's slot elsewhere, as the trainer resolves it). A setting that
    is not a device (a hand-edited config.yaml) is a RunsError, never part of a lock's name."""
    device = str(device)
    if not DEVICE.fullmatch(device):
        raise RunsError(f"device {device[:100]!r} is not one of auto, cpu, mps, cuda, cuda:N (N below 100)")
    if device == "auto":
        import torch  # here: the panel reads slots without loading torch until it must

        return "gpu0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return "gpu" + (device.split(":", 1)[1] if ":" in device else "0")
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
    if not SLOT.fullmatch(str(slot)):
        raise RunsError(f"no slot {str(slot)[:100]!r}: slots are cpu and gpu0 to gpu99")
    return Path(root) / f".active-{slot}.json"


def write_lock(path: Path, job: dict) -> None:
    """Rewrite a lock file this process created (never through a link)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_TRUNC | NOFOLLOW)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(job, handle)


def _read_lock(path: Path) -> dict | None:
    """The job a lock file names ({"started": its age} while it is being written); None when there is
    nothing at `path` or no lock file (a link, a folder: planted, never followed; `claim` names it)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | NOFOLLOW)
    except OSError:  # missing, or a link
        return None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            return None
        try:
            job = json.loads(os.read(descriptor, 65536))
        except ValueError:
            job = None
    finally:
        os.close(descriptor)
    return job if isinstance(job, dict) else {"started": status.st_mtime}


def active_job(root: str | Path, slot: str) -> dict | None:
    """The live job holding `slot` ({run, kind, pid, module, started}), clearing a stale lock."""
    path = lock_path(Path(root), slot)
    job = _read_lock(path)
    if job is None:
        return None
    pid = job.get("pid")
    starting = pid is None and time.time() - float(job.get("started", 0)) < 60
    if starting or (pid is not None and alive(int(pid), job.get("module", "popo_lite."))):
        return job
    path.unlink(missing_ok=True)  # a stale lock: the file itself (never followed)
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
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | NOFOLLOW, 0o644)
        except FileExistsError:
            if path.is_symlink() or not path.is_file():
                raise RunsError(f"{path} is not a lock file (a link or a folder): remove it") from None
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
    job = {"run": run, "kind": "training", "module": "popo_lite.train", "origin": "command line"}
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = claim(root, slot, {**job, "pid": os.getpid(), "started": time.time()})
    except OSError as error:  # read-only, or a file where the folder should be
        raise RunsError(f"output_dir: cannot write to {root} ({error.strerror or error})") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def active_jobs(root: str | Path) -> list[dict]:
    """Every live job started from the panel under `root`, each with its `slot`."""
    base = Path(root)
    slots = sorted(p.name[len(".active-") : -len(".json")] for p in base.glob(".active-*.json"))
    slots = [slot for slot in slots if SLOT.fullmatch(slot)]
    return [{**job, "slot": slot} for slot in slots if (job := active_job(base, slot)) is not None]


# --- one writer per run directory ---------------------------------------------------------------------

WRITER_LOCK = ".writer.lock"
_HELD: dict[Path, WriterLock] = {}  # the run directories this process writes


@dataclass(eq=False)
class WriterLock:
    """This process's hold on a run directory: an open, flock()ed `.writer.lock` holding our pid."""

    path: Path
    descriptor: int | None

    def release(self) -> None:
        """Remove the lock file and let go (once; a lock a newer session of this process took is kept)."""
        if _HELD.get(self.path) is not self:
            return
        del _HELD[self.path]
        self.path.unlink(missing_ok=True)  # before closing: a waiter on the old file then sees it gone
        if self.descriptor is not None:
            os.close(self.descriptor)


def hold_run_directory(run_dir: Path, resume: bool) -> WriterLock:
    """Become the one writer of `run_dir` (created if missing), or a RunsError naming the holder's pid.

    The lock is the kernel's (flock), so it ends with its process however that ends (a kill, a crash):
    nothing is ever stale, and a recycled pid cannot hold it. A session this same process abandoned (a
    notebook's unfinished run) is taken over. A fresh run must find the folder empty but for the lock
    once it holds it: two starts at the same moment give one run and one refusal.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = locate(run_dir, WRITER_LOCK)
    previous = _HELD.get(path)
    if previous is not None:  # taken over: the abandoned session's release is then a no-op
        lock = WriterLock(path, previous.descriptor)
    else:
        lock = WriterLock(path, _flock(path, run_dir.name))
    _HELD[path] = lock
    if not resume and any(p.name != WRITER_LOCK for p in run_dir.iterdir()):
        lock.release()
        raise RunsError(f"run directory {run_dir} already holds a run: use --resume or another --run_name")
    return lock


def _flock(path: Path, run: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (the slot lock still keeps one run per accelerator)
        return None
    for _ in range(10):  # a retry follows a holder that removed the file while we opened it
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_RDWR | NOFOLLOW, 0o644)
        except OSError:
            if path.is_symlink():
                raise RunsError(f"{path} is a symbolic link, not a lock file: remove it") from None
            raise
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(descriptor, 4096).decode("utf-8", "replace")
            os.close(descriptor)
            try:
                pid = json.loads(holder).get("pid")
            except (ValueError, AttributeError):
                pid = "unknown, starting"
            raise RunsError(
                f"run {run!r} is being written by another process (pid {pid}): one writer per run "
                "directory; wait for it to end or pick another run_name"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(descriptor)
            continue
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
        return descriptor
    raise RunsError(f"could not take the lock {path}; try again")
