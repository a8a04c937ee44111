"""Math problems with normalised gold answers, and the prompt templates that frame them.

Why the care over gold answers: the reward is binary math-verify equality, so every benchmark's own
answer format (GSM8K's `#### 72`, AIME 2024's `"025"`, AMC's `27.0`, OlympiadBench's `["$x$"]`, MATH's
last `\\boxed{}`) must be normalised once, here, or correct rollouts score 0. The bundled files live in
`popo_lite/data/bundled/` (sources, licenses and checksums in its SOURCES.md) and load lazily, per set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from popo_lite.core.rewards import last_boxed, without_sentence_end
from popo_lite.data.golds import gold_reading, misread_as

logger = logging.getLogger(__name__)
DATA_DIR = Path(__file__).parent / "bundled"


class DataError(ValueError):
    """A dataset cannot be used as configured; the message names the file, field or name."""


@dataclass(frozen=True)
class Problem:
    """One training or evaluation item; `answer` is already normalised, so the reward compares as is."""

    id: str
    problem: str  # the question text, never the solution
    answer: str  # normalised gold answer string for math-verify
    source: str  # dataset name or path
    level: int | None = None


# ---- gold-answer normalisation, one function per format ---------------------------------------------


def _after_hashes(solution: str) -> str:
    """GSM8K: the number after `####`, without thousands commas."""
    return solution.split("####")[-1].strip().replace(",", "")


def _strip_zeros(answer: str) -> str:
    """AIME 2024 pads to three digits ("025"); math-verify would still match, but logs should read 25."""
    return answer.strip().lstrip("0") or "0"


def _number(value: float | int) -> str:
    """AMC 2023 stores floats: 27.0 -> "27"; a non-integer stays as written."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _dollar_list(values: Iterable[str]) -> str:
    """OlympiadBench `["$69$,$84$"]` -> "69, 84": strip the `$` delimiters, join multiple answers."""
    parts = [part.strip().strip("$").strip() for value in values for part in re.split(r"\$\s*,\s*\$", value)]
    return ", ".join(part for part in parts if part)


def _boxed_solution(solution: str) -> str:
    """MATH train / Minerva: the last non-empty `\\boxed{}` (or brace-less `\\boxed 2`) of the worked
    solution; "" when there is none (2 MATH train solutions box nothing), and such rows are dropped."""
    return last_boxed(solution) or ""


def _math_level(level: Any) -> int | None:
    """ "Level 3" -> 3, 3 -> 3, 3.0 -> 3; "Level ?" and DeepScaleR's 0.0 -> None."""
    match = re.search(r"\d+", str(level)) if level is not None else None
    return (int(match.group(0)) or None) if match else None


def generic_answer(value: Any, field: str = "answer") -> str:
    """Best-effort gold answer from a user's dataset: numbers, lists, `####` and boxed solutions."""
    if value is None:
        return ""  # dropped by load_problems, with a warning
    if isinstance(value, bool):
        raise DataError(f"gold answer {value!r} is not an answer")
    if isinstance(value, (int, float)):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return _dollar_list(str(item) for item in value)
    text = str(value).strip()
    if "####" in text:
        return _after_hashes(text)
    if field == "solution" or "\\boxed" in text:
        return _boxed_solution(text)
    return text.strip("$").strip()


# ---- bundled sets ---------------------------------------------------------------------------------

Row = dict[str, Any]


class Bundled(NamedTuple):
    path: str | None  # relative to DATA_DIR; None for the synthetic set
    to_problem: Callable[[Row, int, str], Problem]


def _row_id(row: Row, index: int, *keys: str) -> str:
    return next((str(row[key]) for key in keys if row.get(key) is not None), str(index))


def _gsm8k(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{index}", row["question"], _after_hashes(row["answer"]), source)


def _math_solution(row: Row, index: int, source: str) -> Problem:
    level = _math_level(row["level"])
    return Problem(row["unique_id"], row["problem"], _boxed_solution(row["solution"]), source, level)


def _deepscaler(row: Row, index: int, source: str) -> Problem:
    level = _math_level(row["difficulty"])
    return Problem(f"{source}/{index}", row["problem"], (row["answer"] or "").strip(), source, level)


def _math500(row: Row, index: int, source: str) -> Problem:
    level = _math_level(row["level"])
    return Problem(row["unique_id"], row["problem"], row["answer"].strip(), source, level)


def _aime24(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{row['id']}", row["problem"], _strip_zeros(row["answer"]), source)


def _aime25(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{row['id']}", row["problem"], str(row["answer"]), source)


def _amc23(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{row['id']}", row["problem"], _number(row["answer"]), source)


def _minerva(row: Row, index: int, source: str) -> Problem:
    problem_id = f"{source}/{_row_id(row, index, 'idx')}"
    return Problem(problem_id, row["problem"], _boxed_solution(row["solution"]), source)


def _olympiadbench(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{row['id']}", row["question"], _dollar_list(row["final_answer"]), source)


def _arithmetic(row: Row, index: int, source: str) -> Problem:
    return Problem(f"{source}/{index}", row["problem"], row["answer"], source)


BUNDLED: dict[str, Bundled] = {
    "gsm8k": Bundled("gsm8k/train.jsonl", _gsm8k),
    "gsm8k_test": Bundled("gsm8k/test.jsonl", _gsm8k),
    "math_train": Bundled("math_train/train.jsonl", _math_solution),
    "deepscaler_math": Bundled("math_train_deepscaler/math.json", _deepscaler),
    "math500": Bundled("math500/test.jsonl", _math500),
    "aime24": Bundled("aime24/test.jsonl", _aime24),
    "aime25": Bundled("aime25/test.jsonl", _aime25),
    "amc23": Bundled("amc23/test.jsonl", _amc23),
    "minerva_math": Bundled("minerva_math/test.jsonl", _minerva),
    "olympiadbench": Bundled("olympiadbench/test.jsonl", _olympiadbench),
    "arithmetic": Bundled(None, _arithmetic),
    "digit_sums": Bundled(None, _arithmetic),
    "two_digit_sums": Bundled(None, _arithmetic),
}
EVAL_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench", "gsm8k_test")


def _sum_rows(pairs: list[tuple[int, int]]) -> list[Row]:
    return [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]


def _held_out_pairs(name: str, pairs: list, held_out: int, split: str, seed: int) -> list[Row]:
    """`held_out` of the shuffled `pairs` for split="test"; 5,000 draws, with repeats, from the rest for
    split="train". Deterministic."""
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if split == "test":
        return _sum_rows(pairs[:held_out])
    if split == "train":
        return _sum_rows([rng.choice(pairs[held_out:]) for _ in range(5000)])
    raise DataError(f"{name} has splits 'train' and 'test', not {split!r}")


def arithmetic_rows(split: str = "train", seed: int = 1234) -> list[Row]:
    """Synthetic "What is a + b?" (a in 10..99, b in 1..9): 200 of the 810 (a, b) pairs held out."""
    pairs = [(a, b) for a in range(10, 100) for b in range(1, 10)]
    return _held_out_pairs("arithmetic", pairs, 200, split, seed)


def digit_sum_rows(split: str = "train", seed: int = 1234) -> list[Row]:
    """Synthetic "What is a + b?" with a and b in 1..9: the embedded default's task, easy enough that the
    4-bit (NF4) 135M model answers about a fifth of its samples right at temperature 0.7
    (docs/measurements.md section 2.5). 21 of the 81 pairs held out."""
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    return _held_out_pairs("digit_sums", pairs, 21, split, seed)


def two_digit_sum_rows(split: str = "train", seed: int = 1234) -> list[Row]:
    """Synthetic "What is a + b?" with a and b in 10..99, held out by operand: 18 of the 90 values are
    test-only, so no held-out problem shares an operand with training. split="test": the first 200 of
    the 324 pairs of held-out values; train: 5,000 draws from the 5,184 pairs of the other 72 values."""
    values = list(range(10, 100))
    rng = random.Random(seed)
    rng.shuffle(values)
    held_out, training = values[:18], values[18:]
    if split == "test":
        pairs = [(a, b) for a in held_out for b in held_out]
        rng.shuffle(pairs)
        return _sum_rows(pairs[:200])
    if split == "train":
        return _sum_rows([(rng.choice(training), rng.choice(training)) for _ in range(5000)])
    raise DataError(f"two_digit_sums has splits 'train' and 'test', not {split!r}")


SYNTHETIC = {
    "arithmetic": arithmetic_rows,
    "digit_sums": digit_sum_rows,
    "two_digit_sums": two_digit_sum_rows,
}


# ---- reading files --------------------------------------------------------------------------------


def _read_rows(path: Path) -> list[Row]:
    """Rows of a .jsonl, .json (array of objects) or .parquet file; a DataError names the file (and the
    line) that is not UTF-8 or not JSON."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with `datasets`; imported only when needed

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow's ArrowInvalid and kin: not a parquet file
            reason = " ".join(str(error).split())[:200]
            raise DataError(f"{path}: not a readable parquet file ({reason})") from None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if suffix == ".json":
        try:
            rows = json.loads(text) if text.strip() else []
        except ValueError as error:
            raise DataError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects, got {type(rows).__name__}")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise DataError(f"{path}: line {number} is not valid JSON: {error}") from None
    return rows


def _pick_field(rows: list[Row], given: str | None, defaults: tuple[str, ...], role: str, where: str) -> str:
    keys = sorted(rows[0].keys())
    if given is not None:
        if given not in rows[0]:
            raise DataError(f"{role} field {given!r} not found in {where}; keys found: {keys}")
        return given
    for name in defaults:
        if name in rows[0]:
            return name
    raise DataError(
        f"no {role} field in {where}: looked for {list(defaults)}; keys found: {keys}. "
        f"Pass {role}_field=... to name it."
    )


def _generic_problems(
    rows: list[Row], source: str, problem_field: str | None, answer_field: str | None
) -> list[Problem]:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{source}: row {index} is not an object with fields but {type(row).__name__} "
                f"{str(row)[:60]!r}: each row must be a JSON object of fields (problem, answer, ...)"
            )
    problem_key = _pick_field(rows, problem_field, ("problem", "question", "prompt"), "problem", source)
    answer_key = _pick_field(rows, answer_field, ("answer", "final_answer", "solution"), "answer", source)
    problems = []
    for index, row in enumerate(rows):
        if problem_key not in row or answer_key not in row:
            missing = problem_key if problem_key not in row else answer_key
            raise DataError(f"{source}: row {index} has no field {missing!r}; keys found: {sorted(row)}")
        try:
            answer = generic_answer(row[answer_key], answer_key)
        except ValueError as error:
            raise DataError(f"{source}: row {index}, field {answer_key!r}: {error}") from error
        level = _math_level(row["level"]) if row.get("level") is not None else None
        problems.append(
            Problem(_row_id(row, index, "id", "unique_id"), str(row[problem_key]), answer, source, level)
        )
    return problems


def _parses(answer: str) -> bool:
    """Can a completion state this gold? The reward reads a completion's `\\boxed{...}` with the same
    brace matching (`last_boxed`): a gold that does not come back out of its own box (`\\frac{`, `}{`)
    can never score, so its row teaches nothing."""
    return last_boxed("\\boxed{" + answer + "}") == without_sentence_end(answer)


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith((".jsonl", ".json", ".parquet")) or source.startswith((".", "/", "~"))


def load_problems(
    source: str,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    levels: tuple[int, ...] | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a bundled name (see BUNDLED), a local .jsonl/.json/.parquet file or a Hub dataset id.

    `split` selects the split of a Hub dataset and of the synthetic sums (arithmetic, digit_sums,
    two_digit_sums); "gsm8k" with split="test" is
    "gsm8k_test"; the other bundled sets are single files and ignore it. `levels` keeps only those
    MATH levels (problems without a level are dropped); `limit` keeps the first N after filtering.
    """
    if source == "gsm8k" and split == "test":
        source = "gsm8k_test"
    if source in BUNDLED:
        entry = BUNDLED[source]
        rows = SYNTHETIC[source](split) if entry.path is None else _read_rows(DATA_DIR / entry.path)
        problems = [entry.to_problem(row, index, source) for index, row in enumerate(rows)]
    else:
        path = Path(source).expanduser()
        if path.is_file():
            rows = _read_rows(path)
        elif _looks_like_path(source) or path.exists():
            raise FileNotFoundError(f"dataset file not found (or not a file): {source}")
        elif "/" in source:
            rows = _load_hub(source, split)
        else:
            raise DataError(
                f"unknown dataset {source!r}: not a bundled name ({', '.join(BUNDLED)}), "
                "not an existing file, and not a Hub id (owner/name)"
            )
        if not rows:
            raise DataError(f"dataset {source!r} is empty: no rows to train or evaluate on")
        problems = _generic_problems(rows, source, problem_field, answer_field)
    answered = [problem for problem in problems if problem.answer]
    usable = [problem for problem in answered if _parses(problem.answer)]
    if source not in BUNDLED:  # bundled counts are documented instead (every bundled gold parses)
        if len(answered) < len(problems):
            logger.warning("%s: dropped %d rows without a gold answer", source, len(problems) - len(answered))
        if len(usable) < len(answered):
            example = next(p.answer for p in answered if not _parses(p.answer))
            logger.warning(
                "%s: dropped %d rows whose gold answer cannot be parsed (unbalanced braces, e.g. %r): no "
                "completion could match them",
                source,
                len(answered) - len(usable),
                example[:60],
            )
    if not usable:
        raise DataError(f"dataset {source!r} has no row with a gold answer that parses")
    problems = usable
    if levels is not None:
        problems = [problem for problem in problems if problem.level in set(levels)]
        if not problems:
            raise DataError(f"no problem of {source!r} has a level in {tuple(levels)} (does it have levels?)")
    return _gradable(problems, source, limit)


def _gradable(problems: list[Problem], source: str, limit: int | None) -> list[Problem]:
    """The first `limit` problems whose gold math-verify reads as its text says (golds.gold_reading), a
    misread gold replaced by the rewrite it reads right; those no rewrite fixes are left out, with a
    count printed. Golds are checked only until `limit` problems are found."""
    kept: list[Problem] = []
    rewritten, ungradable = [], []
    for problem in problems:
        if limit is not None and len(kept) >= limit:
            break
        reading = gold_reading(problem.answer)
        if reading is None:
            ungradable.append(problem)
        elif reading != problem.answer:
            rewritten.append(problem)
            kept.append(dataclasses.replace(problem, answer=reading))
        else:
            kept.append(problem)
    if rewritten:
        logger.warning(
            "%s: %d gold answers read as rewritten, as math-verify misreads them as written (e.g. %s: %r)",
            source,
            len(rewritten),
            rewritten[0].id,
            rewritten[0].answer[:60],
        )
    if ungradable:
        example = ungradable[0]
        logger.warning(
            "%s: %d problems left out of training and evaluation: math-verify reads their gold as a number "
            "it does not state, so that number would pay (e.g. %s: %r read as %s)",
            source,
            len(ungradable),
            example.id,
            example.answer[:60],
            misread_as(example.answer),
        )
    if not kept:
        raise DataError(f"dataset {source!r} has no problem whose gold answer math-verify reads right")
    return kept


def _load_hub(dataset_id: str, split: str) -> list[Row]:
    """A Hub dataset (needs network access); `datasets` is imported only on this path because it is slow."""
    from datasets import load_dataset

    return list(load_dataset(dataset_id, split=split))


# ---- prompts --------------------------------------------------------------------------------------

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("qwen_math", "chat", "plain")


def format_prompt(problem: str, template: str, tokenizer: Any = None) -> str:
    """The prompt text for one problem.

    "qwen_math" is the ChatML prompt of the paper's runs (docs/algorithm.md section 3.1), right for the
    Qwen2.5-Math models; "chat" uses the tokenizer's own chat template (instruct models); "plain" is for
    base models without one. All ask for `\\boxed{}`, which the reward reads first.
    """
    if template == "qwen_math":
        return (
            f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
        )
    if template == "plain":
        return f"Question: {problem}\nPut the final answer in \\boxed{{}}.\nAnswer:"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            which = "no tokenizer was given" if tokenizer is None else "this tokenizer has no chat_template"
            raise DataError(
                f"prompt template 'chat' needs the tokenizer's chat template, but {which}; "
                "use template 'plain' (base models) or 'qwen_math' (Qwen ChatML) instead"
            )
        messages = [{"role": "user", "content": problem + " Put the final answer in \\boxed{}."}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise DataError(f"unknown prompt template {template!r}; choose one of {', '.join(TEMPLATES)}")


def training_problems(config) -> list[Problem]:
    """The training problems a Config names (`dataset`, its fields, split and MATH levels)."""
    return load_problems(
        config.dataset,
        problem_field=config.problem_field,
        answer_field=config.answer_field,
        split=config.dataset_split,
        levels=tuple(config.levels) if config.levels else None,
    )
