"""Binary math reward: 1.0 when the model's FINAL answer equals the gold answer, per math-verify.

Why this module is more than `verify(parse(gold), parse(completion))`:

1. Reward hacking (measured, shared/MEASURED.md section 3). math-verify's default extraction scans the
   whole text, so a completion that merely restates the question ("... the equation 17 + 25.") verifies
   against 42, and `\\boxed{17+25}` verifies too. We therefore extract the model's final answer ourselves
   (`extract_final_answer`) and, when the gold is a plain number, reject answers that are unevaluated
   arithmetic of numbers.
2. Extraction decides whether a small model sees any signal at all (same measurement): the last
   non-empty `\\boxed{}`, else a clearly marked final answer, else the last number.
3. math-verify bounds its time with `signal.alarm`, which raises off the main thread (a web UI worker).
   Off the main thread we verify in a helper process instead, see `math_reward` for the bound.

Rewards are plain functions over lists of strings returning per-sample scores; no exception escapes.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

# Answers longer than this are not verified (score 0): no real final answer is that long, and sympy's cost
# grows with the input, so this is the first bound on verification time.
MAX_ANSWER_CHARS = 300
_MAX_CANDIDATES = 20  # trailing \boxed / "answer is" occurrences tried before falling back
_MAX_BOX_SCAN = 1000  # characters scanned for a closing brace: keeps extraction linear on junk

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_MARKED_RE = re.compile(
    r"(?:(?:final\s+answer|the\s+answer)\s*(?:is\b\s*:?|:)|\banswer\s*:)(?=[ \t*]*([^\n]{0,500}))",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"(?<![\w)\]}.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w)\]}.])-?\d+(?:\.\d+)?")
_WORD_RE = re.compile(r"(?<![\\a-zA-Z{])[a-zA-Z]{3,}")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?\d+(?:\.\d+)?")
_UNIT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}(?:\^\{?\d\}?)?")
_ARITHMETIC_RE = re.compile(r"[\d)}]\s*(?:[-+*×÷^!]|\\times|\\cdot|\\div)|\\frac\{[^{}]*[-+*^]")
_SCIENTIFIC_RE = re.compile(r"-?(?:\d+(?:\.\d+)?(?:\\times|\\cdot|\*|×))?10\^\{?-?\d+\}?")


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the \\boxed{...} / \\fbox{...} / brace-less `\\boxed 2` whose command ends at `start`."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # MATH has `$\boxed 2$`: the answer is the next token
        token = re.match(r"[^\s${}]+", text[i:])
        return token.group(0).rstrip(".,;") if token else None
    depth = 0
    for j in range(i, min(len(text), i + _MAX_BOX_SCAN)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced or absurdly long


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty \\boxed{} or \\fbox{} (balanced braces), or None."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for end in reversed(starts[-_MAX_CANDIDATES:]):
        content = _boxed_content(text, end)
        if content and content.strip():
            return content.strip()
    return None


def _clean_marked(answer: str) -> str:
    """Trim the text after 'the answer is' down to the answer: a $...$ block, else up to the sentence end."""
    answer = answer.strip().strip("*").strip()
    math_block = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", answer)
    if math_block:
        return next(group for group in math_block.groups() if group is not None).strip()
    answer = re.split(r"\.(?:\s|$)", answer, maxsplit=1)[0]
    word = _WORD_RE.search(answer)  # "42 apples", "5 because ..." -> keep what precedes the prose
    if word:
        answer = answer[: word.start()]
    return answer.strip().lstrip("$").strip(" .,;:*")


def extract_final_answer(completion: str) -> str | None:
    """The model's FINAL answer, or None.

    In order: the content of the last non-empty `\\boxed{}`/`\\fbox{}`; else the last clearly marked answer
    ("final answer is X", "the answer is X", "Answer: X"); else the last number in the text. Taking the
    LAST one is what stops a restated question from counting as the answer.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    for match in reversed(list(_MARKED_RE.finditer(completion))[-_MAX_CANDIDATES:]):
        answer = _clean_marked(match.group(1))
        if answer:
            return answer
    numbers = _NUMBER_RE.findall(completion)
    return numbers[-1] if numbers else None


def _is_plain_number(text: str) -> bool:
    return _PLAIN_NUMBER_RE.fullmatch(re.sub(r"\{,\}|,|\s|\$", "", text)) is not None


def _is_unevaluated_arithmetic(answer: str) -> bool:
    """True for `17+25`, `6 \\times 7`, `2^{10}`, `\\frac{40+2}{1}`: numbers joined by operators.

    A plain fraction (`\\frac{1}{2}`, `1/2`) and scientific notation (`1.2 \\times 10^{3}`, `10^{-3}`) are
    numbers, not arithmetic. Units (`\\text{ cm}^2`), `$`, `%` and degree signs are ignored.
    """
    text = _UNIT_RE.sub("", answer)
    text = re.sub(r"\\[,;!: ]|\\?\$|\\?%|\^\s*\{?\\circ\}?|\{,\}|\s", "", text)
    text = text.rsplit("=", 1)[-1]  # judge the value after the last "=": "x = 42", "17+25=42" state 42
    if _SCIENTIFIC_RE.fullmatch(text) or re.fullmatch(r"-?\d+/\d+", text):
        return False
    return _ARITHMETIC_RE.search(text.lstrip("-+")) is not None


def _exponent(text: str, start: int) -> str:
    """The exponent written after the `^` that ends at `start`: a balanced {...} group or one token."""
    group = re.match(r"\s*(-?\d+|\\?[a-zA-Z]+|[^{])", text[start:])
    if not text[start:].lstrip().startswith("{"):
        return group.group(1) if group else ""
    return _boxed_content(text, start) or text[start:]  # unbalanced: the rest, to be judged whole


def _too_costly(answer: str) -> bool:
    """True for answers whose verification could run for minutes: towers like `9^{9^{9}}`, giant
    exponents or factorials, high powers of symbolic expressions (`(1+x)^{1000}` took 11 s here)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return True
    text = answer.replace("**", "^")
    for match in re.finditer(r"\^", text):
        exponent = _exponent(text, match.end())
        if "^" in exponent or "!" in exponent:
            return True
        numeric_base = text[: match.start()].rstrip().endswith(tuple("0123456789"))
        if any(int(digits) > (100_000 if numeric_base else 200) for digits in re.findall(r"\d+", exponent)):
            return True
    if any(int(digits) > 100_000 for digits in re.findall(r"(\d+)\s*!", text)):
        return True
    return bool(re.search(r"[)}]\s*!", text) and "^" in text)  # like (10^{9})!


def _wrap(answer: str) -> str:
    """Box an answer so math-verify parses bare `42`, `\\frac{1}{2}`, `(1,2)` and `x^2+1` as LaTeX."""
    return "\\boxed{" + answer + "}"


def _verify_texts(gold: str, answer: str, timeout: int | None) -> bool:
    """math-verify on two answer strings; `timeout` is math-verify's own (signal-based) limit."""
    from math_verify import parse, verify  # imported here: it pulls in sympy, which is slow to import

    gold_parsed = parse(_wrap(gold), parsing_timeout=timeout)
    answer_parsed = parse(_wrap(answer), parsing_timeout=timeout)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))


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
            ok = _verify_texts(request["gold"], request["answer"], request["timeout"])
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


def _stop_worker() -> None:
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
    _stop_worker()
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
    _stop_worker()
    _worker_broken = True
    return None


def _verify_off_main_thread(gold: str, answer: str, timeout_s: float) -> bool:
    """Verify in the helper process; kill it (score 0) when it overruns the hard deadline."""
    seconds = max(1, math.ceil(timeout_s))
    with _worker_lock:
        proc = _start_worker()
        if proc is None:  # no helper (non-POSIX or spawn failed): only the input guards bound the time
            return _verify_texts(gold, answer, None)
        request = json.dumps({"gold": gold, "answer": answer, "timeout": seconds}) + "\n"
        proc.stdin.write(request.encode())
        proc.stdin.flush()
        line = _read_line(proc, time.monotonic() + 3 * seconds + 1)
        if line is None:
            logger.warning("math verification overran %.0f s; helper process restarted", 3 * seconds + 1)
            _stop_worker()
            return False
        return line == "1"


atexit.register(_stop_worker)


def score(completion: str, gold: str, timeout_s: float = 5.0) -> tuple[float, str | None]:
    """(reward, extracted answer) for one completion; the trainer logs both. Never raises."""
    try:
        answer = extract_final_answer(completion)
        if answer is None or _too_costly(answer):
            return 0.0, answer
        if _is_plain_number(gold) and _is_unevaluated_arithmetic(answer):
            return 0.0, answer
        if os.name != "posix":  # math-verify's non-POSIX timeout pickles a local function: it would fail
            ok = _verify_texts(gold, answer, None)
        elif threading.current_thread() is threading.main_thread():
            ok = _verify_texts(gold, answer, max(1, math.ceil(timeout_s)))
        else:
            ok = _verify_off_main_thread(gold, answer, timeout_s)
        return (1.0 if ok else 0.0), answer
    except ImportError:  # math-verify missing is a broken install, not a wrong answer: say so
        raise
    except Exception:  # a reward must never crash training
        logger.debug("scoring failed", exc_info=True)
        return 0.0, None


def math_reward(completions: list[str], golds: list[str], timeout_s: float = 5.0) -> list[float]:
    """1.0 where math-verify says the completion's final answer equals the gold, else 0.0.

    Time bound per sample: answers over MAX_ANSWER_CHARS characters, power towers, giant exponents and
    giant factorials are scored 0 without verification (everywhere, so the score does not depend on the
    thread). On the main thread math-verify's own `signal.alarm` limits apply: ceil(timeout_s) for each
    of parse(gold), parse(answer) and verify. Off the main thread (where `signal.alarm` raises) the same
    runs in a helper process, whose main thread can use those limits, and the caller kills it after
    3 * ceil(timeout_s) + 1 seconds: a hard bound. Its first use costs the helper's start (1-2 s).
    """
    if len(completions) != len(golds):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(golds)} gold answers")
    return [
        score(completion, gold, timeout_s)[0] for completion, gold in zip(completions, golds, strict=True)
    ]
