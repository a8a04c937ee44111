"""The processes that write run directories: training and evaluation jobs, started from the panel.

Why it is shaped as it is:

1. A job runs in its own process group (`start_new_session=True`), output to a log file in its run
   directory, so a reloaded page or a stopped panel never kills it, and math-verify's `signal.alarm`
   timeouts run on that process's main thread, never on a UI worker thread (docs/measurements.md section 3.2).
2. A new run is created here (config.yaml written) and started as `popo_lite.train --resume`: the
   trainer finds no checkpoint and starts at step 0, and the log lives in the run directory from its
   first byte (a plain start refuses a run directory that already holds a file).
3. Every file of a run folder is opened through `training/run_paths.py` (never through a link, never
   outside the run); a resume is refused here, before anything starts, when the run has a history but
   no complete checkpoint (the trainer then checks that one loads and fits: `session.py`).
4. One job per GPU: each job holds its accelerator's lock (`training/job_slot.py`) while it lives;
   `python -m popo_lite.train` takes the same lock, so a terminal run and a panel run never share a GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from popo_lite.config import RUN_NAME, Config, ConfigError, load_config, parse_yaml_text
from popo_lite.panel.paths import BrowserAccess
from popo_lite.training.job_slot import (
    CHILDREN,
    PANEL_JOB_ENV,
    active_job,
    alive,
    busy_message,
    claim,
    lock_path,
    slot_of,
    write_lock,
)
from popo_lite.training.run_paths import (
    check_checkpoint_files,
    check_run_folder,
    entries,
    file_path,
    folder_path,
    locate,
    make_folder,
    open_file,
    save_config,
    scan_checkpoints,
)
from popo_lite.training.runs import (
    RunsError,
    check_name,
    list_checkpoints,
    read_config,
    read_jsonl,
    read_run_text,
    run_path,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_NAME = "train.log"
STOPPED_LINE = "[panel] stopped by the user"


def _child_env() -> dict[str, str]:
    """This environment, with the project importable in a child process."""
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    return env


def _config_values(config_text: str) -> dict:
    """The YAML text of a config as a mapping, or a RunsError saying why not."""
    try:
        return parse_yaml_text(config_text or "", "the config")
    except ConfigError as error:
        raise RunsError(str(error)) from None


def _spawn(root: Path, slot: str, job: dict, command: list[str], run_dir: Path) -> int:
    """Start `command` detached, output to the run's `job["log"]`, holding `slot` for as long as it lives."""
    lock = claim(root, slot, {**job, "pid": None, "started": time.time()})
    try:
        env = {**_child_env(), "PYTHONUNBUFFERED": "1", PANEL_JOB_ENV: slot}
        with open_file(run_dir, job["log"], mode="ab") as output:
            child = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    CHILDREN[child.pid] = child
    write_lock(lock, {**job, "pid": child.pid, "started": time.time()})
    return child.pid


def plan_memory(
    config_text: str,
    overrides: dict,
    gpu_gib: float,
    *,
    root: str | Path,
    access: BrowserAccess | None = None,
) -> str:
    """`python -m popo_lite.plan` on YAML text plus overrides, in a subprocess (it may load a model's
    shapes: torch stays out of the panel process); returns its table, verdict or error. The config is
    held to the browser's path rule (paths.py) against the runs folder `root` first."""
    try:
        values = {**_config_values(config_text), **overrides}
        (access or BrowserAccess()).check(values, root)
    except RunsError as error:
        return str(error)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(values))
        command = [sys.executable, "-m", "popo_lite.plan", "--config", str(path), "--gpu_gib", str(gpu_gib)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_child_env())
        except subprocess.TimeoutExpired:
            return "the memory plan took more than 5 minutes (loading the model's shapes?)"
    return (done.stdout if done.returncode in (0, 1) else done.stderr).strip()


def launch_run(
    root: str | Path,
    name: str,
    config_text: str = "",
    overrides: dict | None = None,
    resume: bool = False,
    *,
    access: BrowserAccess | None = None,
) -> int:
    """Create run `name` from YAML text plus overrides (or resume it) and start training; returns the pid.

    The config (a resumed run's config.yaml too) is held to the browser's path rule (paths.py) first.
    A resumed run trains on with its own config.yaml, which the trainer rewrites only once its
    checkpoint is checked: no overrides then."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_dir = run_path(root, name)
    if resume and overrides:
        raise RunsError("a resumed run keeps its own config.yaml: start a new run to change settings")
    if resume:
        if not run_dir.is_dir() or file_path(run_dir, "config.yaml") is None:
            raise RunsError(f"no run {name!r} to resume")
        check_run_folder(run_dir)
        values = read_config(run_dir, strict=True)
        values.pop("output_dir", None)  # where it was written from: the panel sets it below
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunsError(f"run {name!r} already exists: pick another run name")
        values = {**_config_values(config_text), **(overrides or {})}
    (access or BrowserAccess()).check(values, root)
    values.update(output_dir=str(root), run_name=name)  # the UI decides where a run lives, not the YAML
    try:
        config: Config = load_config(None, values)
    except ConfigError as error:
        raise RunsError(f"config: {error}") from None
    slot = slot_of(config.device)
    holder = active_job(root, slot)
    if holder is not None:  # checked before anything is written: a refused run leaves no folder behind
        raise RunsError(busy_message(slot, holder))
    if resume:
        check_resumable(run_dir, config.steps)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir, config)  # a resumed run's config.yaml is the trainer's to rewrite, once checked
    command = [sys.executable, "-m", "popo_lite.train", "--config", str(locate(run_dir, "config.yaml")),
               "--resume", "--output_dir", str(root), "--run_name", name]  # fmt: skip
    job = {"run": name, "kind": "training", "module": "popo_lite.train", "log": LOG_NAME}
    return _spawn(root, slot, job, command, run_dir)


def check_resumable(run_dir: Path, steps: int) -> None:
    """A RunsError, one line, when a run has a history (metrics.jsonl) but no complete checkpoint:
    resuming would start it over. Which checkpoints were found and why each is refused is named."""
    found, refused = scan_checkpoints(run_dir, steps)
    metrics = file_path(run_dir, "metrics.jsonl")
    if not found and (refused or (metrics is not None and metrics.stat().st_size > 0)):
        listed = "; ".join(refused) if refused else "none (no checkpoints/ entry)"
        raise RunsError(
            f"run {run_dir.name!r} has a history but no complete checkpoint to resume from. Found: "
            f"{listed}. Nothing was changed."
        )


def stop_run(root: str | Path, name: str, grace_s: float = 10.0) -> str:
    """Stop the panel-started job of run `name` (its whole process group); returns a message."""
    root = Path(root).resolve()
    run_dir = run_path(root, name)
    slot = slot_of(read_config(run_dir).get("device", "auto"))
    job = active_job(root, slot)
    if job is None or job.get("run") != name or job.get("pid") is None:
        return f"run {name!r} has no active job started from the panel"
    if job.get("origin") == "command line":
        return f"run {name!r} was started from the command line (pid {job['pid']}): stop it there"
    pid = int(job["pid"])
    os.killpg(pid, signal.SIGTERM)  # the group: the math-verify helper goes too
    deadline = time.monotonic() + grace_s
    while alive(pid, job.get("module", "popo_lite.")) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(pid, job.get("module", "popo_lite.")):
        os.killpg(pid, signal.SIGKILL)
    lock_path(root, slot).unlink(missing_ok=True)
    with open_file(run_dir, str(job.get("log", LOG_NAME)), mode="a") as handle:
        handle.write(f"\n{STOPPED_LINE} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return f"stopped {job.get('kind')} of run {name!r} (pid {pid})"


# --- evaluation --------------------------------------------------------------------------------------

EVALUATE_MODULE = "popo_lite.evaluate"


def launch_evaluation(
    root: str | Path,
    name: str,
    checkpoint: str,
    adapter: str,
    benchmarks: str,
    limit: int,
    max_new_tokens: int | None = None,
    *,
    access: BrowserAccess | None = None,
) -> str:
    """Evaluate one adapter of one checkpoint of run `name`; returns the evaluation's folder name.

    Results land in `<run>/evaluations/<folder>/` (results.md, results.json), the log beside it in
    `<folder>.log` (the evaluator wants a new or empty output folder). The evaluator takes the base model,
    --qlora and the prompt template from the adapter's run. The job holds the run's GPU slot like
    training does: both at once need not fit on the card. The benchmarks, and the model the evaluator
    takes from the run's config.yaml, are held to the browser's path rule (paths.py).
    """
    root = Path(root).resolve()
    run_dir = run_path(root, name)
    if adapter not in ("policy", "ema"):
        raise RunsError(f"adapter must be policy or ema, got {adapter!r}")
    check_name(checkpoint, "checkpoint")
    if checkpoint not in list_checkpoints(run_dir):  # a complete, real folder of this run
        raise RunsError(f"{checkpoint} is not a complete checkpoint of run {name!r}")
    check_checkpoint_files(run_dir, checkpoint)  # no link in it: the evaluator would follow it
    if folder_path(run_dir, "checkpoints", checkpoint, adapter) is None or (
        file_path(run_dir, "checkpoints", checkpoint, adapter, "adapter_config.json") is None
    ):
        raise RunsError(f"{checkpoint} of run {name!r} has no {adapter} adapter")
    adapter_dir = locate(run_dir, "checkpoints", checkpoint, adapter)
    names = [part.strip() for part in benchmarks.split(",") if part.strip()]
    if not names:
        raise RunsError("name at least one benchmark")
    run_config = read_config(run_dir, strict=True)  # what the evaluator reads: a link is refused
    model = {key: run_config[key] for key in ("model", "gguf_file", "trust_remote_code") if key in run_config}
    (access or BrowserAccess()).check({**model, "eval_benchmarks": names}, root)
    if int(limit) < 1 or (max_new_tokens is not None and int(max_new_tokens) < 1):
        raise RunsError("the problem limit and max new tokens must be >= 1")
    folder = f"{checkpoint}-{adapter}-{time.strftime('%Y%m%d-%H%M%S')}"
    make_folder(run_dir, "evaluations")
    output = locate(run_dir, "evaluations", folder)
    command = [sys.executable, "-m", EVALUATE_MODULE, "--adapter", str(adapter_dir), "--limit",
               str(int(limit)), "--output", str(output), "--benchmarks=" + ",".join(names)]  # fmt: skip
    if max_new_tokens is not None:
        command += ["--max_new_tokens", str(int(max_new_tokens))]
    device = run_config.get("device", "auto")
    slot = slot_of(device)  # a device that is not one is refused here
    command += ["--device", str(device)]
    job = {"run": name, "kind": "evaluation", "module": EVALUATE_MODULE, "log": f"evaluations/{folder}.log"}
    _spawn(root, slot, job, command, run_dir)
    return folder


def list_evaluations(run_dir: Path) -> list[str]:
    """Evaluations of a run, newest first (a folder, or only its log while the model loads)."""
    try:
        listed = entries(run_dir, "evaluations")  # a link or a file there: not listed
    except RunsError:
        return []
    names = {p.name[: -len(".log")] if p.suffix == ".log" else p.name for p in listed}
    return sorted((name for name in names if RUN_NAME.fullmatch(name)), reverse=True)


def evaluation_result(root: str | Path, name: str, folder: str) -> tuple[str, str]:
    """(state, markdown): running, done, stopped or failed, with results.md so far (the evaluator rewrites
    it after each benchmark) and, unless done, the log's tail."""
    check_name(folder, "evaluation")
    run_dir = run_path(root, name)
    table = read_run_text(run_dir, "evaluations", folder, "results.md") or ""  # never through a link
    tail = _tail(run_dir, f"evaluations/{folder}.log", 2500)
    job = active_job(root, slot_of(read_config(run_dir).get("device", "auto"))) or {}
    if job.get("kind") == "evaluation" and job.get("log") == f"evaluations/{folder}.log":
        state = "running"
    elif STOPPED_LINE in tail:
        state = "stopped"
    elif table and "Traceback" not in tail and "error:" not in tail:
        return "done", table
    else:
        state = "failed"
    return state, f"{table}\n\n```\n{tail}\n```" if tail else table


# --- progress ----------------------------------------------------------------------------------------


@dataclass
class Progress:
    run: str
    step: int
    total: int
    state: str  # starting, running, finished, stopped, failed, incomplete
    eta_seconds: float | None
    seconds_since_update: float | None


def progress(root: str | Path, name: str) -> Progress:
    run_dir = run_path(root, name)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    steps = read_config(run_dir).get("steps")  # any YAML value: `steps: abc` once raised here
    total = steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else 0
    step = max((int(m.get("step", 0)) for m in metrics), default=0)
    files = [_file_or_none(run_dir, file) for file in ("metrics.jsonl", LOG_NAME)]
    updated = max((p.stat().st_mtime for p in files if p is not None), default=None)
    since = time.time() - updated if updated is not None else None
    job = active_job(root, slot_of(read_config(run_dir).get("device", "auto"))) or {}
    live = job.get("run") == name and job.get("kind") == "training"
    if total and step >= total:
        state = "finished"
    elif live:
        state = "running" if metrics else "starting"
    else:
        state = _ended_state(run_dir)
    recent = [float(m["seconds_step"]) for m in metrics[-5:] if "seconds_step" in m]
    eta = (total - step) * sum(recent) / len(recent) if recent and state == "running" else None
    return Progress(name, step, total, state, eta, since)


def _file_or_none(run_dir: Path, name: str) -> Path | None:
    try:
        return file_path(run_dir, name)
    except RunsError:
        return None


def _ended_state(run_dir: Path) -> str:
    if _file_or_none(run_dir, LOG_NAME) is None:
        return "incomplete"  # e.g. a CLI run: still going or interrupted, nothing here tells which
    tail = _tail(run_dir, LOG_NAME, 4000)
    if STOPPED_LINE in tail:
        return "stopped"
    if "Traceback" in tail or "error:" in tail:
        return "failed"
    return "incomplete"


def log_tail(root: str | Path, name: str, characters: int = 3000) -> str:
    return _tail(run_path(root, name), LOG_NAME, characters)


def _tail(run_dir: Path, log: str, characters: int) -> str:
    """The last `characters` bytes of a run's log; '' when it is missing, a link or not a file."""
    try:
        with open_file(run_dir, log, mode="rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - characters))
            return handle.read().decode("utf-8", "replace")
    except (OSError, RunsError):
        return ""
