"""math-verify under a time bound, on any thread (the reward's last stage, `rewards.score`).

`verify(gold, answer, timeout_s)` is the one entry point; it picks how the time is bounded.
math-verify bounds its own time with `signal.alarm`, which only the main thread may use. On the main
thread `verify_texts` passes it the limit; off the main thread (a web panel worker) `verify_off_main_thread`
sends the pair to a helper process, whose main thread can use the alarm, and kills it at a hard deadline.
Off POSIX math-verify's own timeout cannot run (it pickles a local function), so only the reward's input
guards bound the time there.

This file imports nothing from the package: the helper process loads it by path, without torch.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import select
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)


def _wrap(answer: str) -> str:
    """Box an answer so math-verify parses bare `42`, `\\frac{1}{2}`, `(1,2)` and `x^2+1` as LaTeX."""
    return "\\boxed{" + answer + "}"


def verify(gold: str, answer: str, timeout_s: float) -> bool:
    """True when math-verify finds `answer` equal to `gold`, within about `timeout_s` per stage."""
    if os.name != "posix":
        return verify_texts(gold, answer, None)
    if threading.current_thread() is threading.main_thread():
        return verify_texts(gold, answer, max(1, math.ceil(timeout_s)))
    return verify_off_main_thread(gold, answer, timeout_s)


def verify_texts(gold: str, answer: str, timeout: int | None) -> bool:
    """math-verify on two answer strings; `timeout` is math-verify's own (signal-based) limit."""
    from math_verify import parse, verify  # imported here: it pulls in sympy, which is slow to import

    gold_parsed = parse(_wrap(gold), parsing_timeout=timeout)
    answer_parsed = parse(_wrap(answer), parsing_timeout=timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


def read_gold(gold: str) -> str | None:
    """What math-verify reads a boxed gold as, as the reward will: the number it reads, `""` for any other
    expression, or None when it reads nothing but text (no answer could then be compared by value).

    For the load-time check of golds (popo_lite/data/golds.py). Off the main thread math-verify's
    `signal.alarm` cannot run, so there the parse has no time limit: a gold is one short string."""
    from math_verify import parse

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    parsed = parse(_wrap(gold), parsing_timeout=timeout)
    if not parsed or isinstance(parsed[0], str):
        return None
    return str(parsed[0]) if getattr(parsed[0], "is_Number", False) else ""


# ---- off-main-thread verification: a helper process whose main thread may use signal.alarm ----------

_worker: subprocess.Popen | None = None
_worker_broken = False
_worker_buffer = b""
_worker_lock = threading.Lock()
_WORKER_START_S = 120.0
# Load this file as a module without importing the package (whose __init__ may import torch).
_WORKER_CODE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_popo_rewards_worker', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "module._serve()\n"
)


def _serve() -> None:
    """Helper-process loop: one JSON request per stdin line, one '1'/'0' per stdout line."""
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers may reach the protocol stream
    import math_verify  # noqa: F401  fail before "ready" if missing; the caller then verifies in-thread

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = verify_texts(request["gold"], request["answer"], request["timeout"])
        except Exception:
            ok = False
        out.write("1\n" if ok else "0\n")
        out.flush()


def _read_line(proc: subprocess.Popen, deadline: float) -> str | None:
    """One line from the helper, or None when `deadline` (time.monotonic) passes first."""
    global _worker_buffer
    fd = proc.stdout.fileno()
    while b"\n" not in _worker_buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        _worker_buffer += chunk
    line, _worker_buffer = _worker_buffer.split(b"\n", 1)
    return line.decode()


def stop_worker() -> None:
    """Kill the helper process (it also exits by itself when our end of its stdin closes)."""
    global _worker, _worker_buffer
    if _worker is not None:
        _worker.kill()
        _worker.wait()
    _worker, _worker_buffer = None, b""


def _start_worker() -> subprocess.Popen | None:
    """The running helper, started if needed; None where it cannot run (then verify in-thread)."""
    global _worker, _worker_broken
    if _worker is not None and _worker.poll() is None:
        return _worker
    stop_worker()
    if _worker_broken or os.name != "posix":
        return None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        _worker = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        if _read_line(_worker, time.monotonic() + _WORKER_START_S) == "ready":
            return _worker
    except OSError:
        pass
    logger.warning("math reward helper process did not start; verifying in-thread without time limits")
    stop_worker()
    _worker_broken = True
    return None


def verify_off_main_thread(gold: str, answer: str, timeout_s: float) -> bool:
    """Verify in the helper process; kill it (score 0) when it overruns the hard deadline."""
    seconds = max(1, math.ceil(timeout_s))
    with _worker_lock:
        proc = _start_worker()
        if proc is None:  # no helper (non-POSIX or spawn failed): only the input guards bound the time
            return verify_texts(gold, answer, None)
        request = json.dumps({"gold": gold, "answer": answer, "timeout": seconds}) + "\n"
        proc.stdin.write(request.encode())
        proc.stdin.flush()
        line = _read_line(proc, time.monotonic() + 3 * seconds + 1)
        if line is None:
            logger.warning("math verification overran %.0f s; helper process restarted", 3 * seconds + 1)
            stop_worker()
            return False
        return line == "1"


atexit.register(stop_worker)
