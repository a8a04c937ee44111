"""Evaluation on the math benchmarks: greedy pass@1, or avg@n and unbiased pass@k from n samples.

`python -m popo_lite.evaluate` (evaluate.py) is a thin shell over `iter_evaluate`; it, `evaluate_model`
(benchmarks by name) and `evaluate_problems` (problems already loaded) are what the trainer and the web
panel call with the model they already hold: the ACTIVE adapter is evaluated (wrap the call in
`siamese.ema_forward(model)` to evaluate the EMA adapter).

How it follows the reference protocol (docs/algorithm.md section 3.2), and where it departs:

1. Greedy pass@1 is the default (temperature 0); `--preset reference` samples at temperature 0.7,
   top_p 0.95, up to 4096 new tokens with the qwen_math prompt, but n = 16 rather than 128 by default:
   128 samples of 4096 tokens per problem is days of single-GPU time (`--n 128` restores it).
2. Scoring is the training reward, `rewards.score`, so evaluation and training curves measure the same
   thing, including its guards against a restated question counting as an answer.
3. Sampling reuses `rollouts.generate_rollouts` (top_k off, as in training); greedy decoding has its
   own path because HF `generate` refuses temperature 0 with sampling on.
4. Each generation batch gets its own seed inside `torch.random.fork_rng`: samples repeat for the same
   benchmarks, limit, batch size and seed, and evaluating mid-training leaves the trainer's RNG alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from popo_lite.core.rewards import score
from popo_lite.core.rollouts import Rollouts
from popo_lite.data.problems import BUNDLED, EVAL_BENCHMARKS, TEMPLATES, Problem, format_prompt, load_problems
from popo_lite.engine.rollouts import eos_ids, generate_rollouts
from popo_lite.evaluation.passk import summarise

logger = logging.getLogger(__name__)
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128)  # reported where k <= n
REFERENCE = {
    "n": 16,
    "temperature": 0.7,
    "top_p": 0.95,
    "max_new_tokens": 4096,
    "prompt_template": "qwen_math",
}


class EvaluationError(ValueError):
    """A benchmark, adapter, option or output folder is wrong; the message names it."""


@dataclass(frozen=True)
class EvalSettings:
    """How completions are generated and scored; bad values raise EvaluationError naming the field."""

    n: int = 1  # samples per problem
    temperature: float = 0.0  # 0 = greedy decoding
    top_p: float = 1.0  # nucleus threshold when sampling
    max_new_tokens: int = 1024  # the reference's training completion length; the reference eval uses 4096
    prompt_template: str = "qwen_math"  # one of data.TEMPLATES
    # Completions generated at once (prompts per call = batch_size // n, at least 1). Qwen2.5-Math-7B's
    # KV cache for 64 x 4.6k tokens is 17 GB: fits beside the weights on one 80 GB GPU.
    batch_size: int = 64
    ks: tuple[int, ...] = DEFAULT_KS  # pass@k is reported for the k <= n among these
    max_prompt_tokens: int = 4096  # longer prompts are cut (with a warning): set it above every prompt
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise EvaluationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvaluationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.greedy and self.n > 1:
            raise EvaluationError(
                f"n = {self.n} with greedy decoding (temperature 0) gives {self.n} identical samples: "
                "set temperature > 0 (e.g. 0.7, or --preset reference) or n = 1"
            )
        if self.prompt_template not in TEMPLATES:
            raise EvaluationError(
                f"prompt_template must be one of {', '.join(TEMPLATES)}, got {self.prompt_template!r}"
            )
        if not self.ks or any(k < 1 for k in self.ks):
            raise EvaluationError(f"ks must be positive sample counts, got {self.ks}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def metric(self) -> str:
        return "pass@1" if self.greedy else f"avg@{self.n}"

    @property
    def reported_ks(self) -> tuple[int, ...]:
        return tuple(k for k in sorted(set(self.ks)) if k <= self.n)


# ---- generation and scoring -------------------------------------------------------------------------


def _lengths_and_cuts(rollouts: Rollouts, stop_ids: list[int]) -> tuple[list[int], list[bool]]:
    """Completion lengths in tokens, and whether each was cut at max_new_tokens (ends without an EOS)."""
    lengths = rollouts.completion_mask.sum(1)  # (N,)
    last = rollouts.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]  # (N,)
    ended = torch.isin(last, torch.tensor(stop_ids, device=last.device)) & (lengths > 0)
    return lengths.tolist(), (~ended).tolist()


def _record(name: str, problem: Problem, prompt: str, texts: list[str], lengths, cuts) -> dict:
    scored = [score(text, problem.answer, question=problem.problem) for text in texts]
    correct = [reward > 0 for reward, _ in scored]
    return {
        "benchmark": name,
        "id": problem.id,
        "prompt": prompt,
        "gold": problem.answer,
        "completions": texts,
        "extracted": [extracted for _, extracted in scored],
        "correct": correct,
        "num_correct": sum(correct),
        "tokens": lengths,
        "cut": cuts,
    }


def iter_evaluate(
    model,
    tokenizer,
    benchmarks: dict[str, list[Problem]],
    settings: EvalSettings | None = None,
    *,
    progress: bool = False,
) -> Iterator[tuple[str, dict]]:
    """Generate, score and summarise each benchmark with the model's active adapter, in order.

    Yields (name, result) as each benchmark completes; result = `passk.summarise(...)` plus
    "elapsed_seconds" (since the start: batches are shared) and "records" (one dict per problem, in the
    benchmark's order). Generation batches run across benchmark boundaries because decoding is
    memory-bound: one decoding step of the embedded model took 1.2 s for 5 rows and for 35 alike on a
    loaded 2-core machine, so `--limit 5` on the 7 benchmarks is one batch, not 7.
    """
    settings = settings or EvalSettings()
    if tokenizer.padding_side != "left":
        raise EvaluationError(
            "the tokenizer must pad on the left for batched generation (load_tokenizer does)"
        )
    for name, problems in benchmarks.items():
        if not problems:
            raise EvaluationError(f"benchmark {name!r} has no problems")
    started = time.perf_counter()
    items = []  # (benchmark, index, prompt): benchmarks in order, the longest prompts of each first
    for name, problems in benchmarks.items():
        prompts = [
            format_prompt(problem.problem, settings.prompt_template, tokenizer) for problem in problems
        ]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        if (too_long := sum(length > settings.max_prompt_tokens for length in lengths)) > 0:
            logger.warning("%s: %d prompts exceed max_prompt_tokens and are cut", name, too_long)
        # Longest first: an out-of-memory batch fails at once, and similar lengths share little padding.
        items += [(name, i, prompts[i]) for i in sorted(range(len(problems)), key=lambda i: -lengths[i])]
    records: dict[str, list[dict]] = {name: [{} for _ in problems] for name, problems in benchmarks.items()}
    remaining = {name: len(problems) for name, problems in benchmarks.items()}
    per_call = max(1, settings.batch_size // settings.n)
    stop_ids = eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with tqdm(total=len(items), desc="evaluating", unit="problem", disable=not progress) as bar:
        for first in range(0, len(items), per_call):
            chunk = items[first : first + per_call]
            # A seed per batch inside fork_rng: reproducible samples, and the caller's RNG (a training
            # run's) is left exactly where it was.
            with torch.random.fork_rng(devices=cuda_devices):
                torch.manual_seed(settings.seed * 1_000_003 + first)
                rollouts = _generate(model, tokenizer, [prompt for _, _, prompt in chunk], settings)
            lengths, cuts = _lengths_and_cuts(rollouts, stop_ids)
            n = settings.n
            for j, (name, i, prompt) in enumerate(chunk):  # rows j*n .. j*n + n - 1 belong to item j
                rows = slice(j * n, (j + 1) * n)
                problem = benchmarks[name][i]
                records[name][i] = _record(
                    name, problem, prompt, rollouts.texts[rows], lengths[rows], cuts[rows]
                )
                remaining[name] -= 1
            bar.update(len(chunk))
            for name in [name for name, left in remaining.items() if left == 0]:
                del remaining[name]
                summary = summarise(records[name], settings.metric, settings.n, settings.reported_ks)
                yield (
                    name,
                    {
                        **summary,
                        "elapsed_seconds": time.perf_counter() - started,
                        "records": records.pop(name),
                    },
                )


def _generate(model, tokenizer, prompts: list[str], settings: EvalSettings) -> Rollouts:
    return generate_rollouts(
        model,
        tokenizer,
        prompts,
        settings.n,
        settings.max_new_tokens,
        settings.temperature,  # 0 = greedy
        settings.top_p,
        settings.max_prompt_tokens,
        settings.batch_size,
    )


def evaluate_problems(
    model, tokenizer, problems: list[Problem], settings: EvalSettings | None = None, *, name: str = "problems"
) -> dict:
    """One benchmark's result (see `iter_evaluate`) on problems already loaded, e.g. a held-out split."""
    return dict(iter_evaluate(model, tokenizer, {name: problems}, settings))[name]


def load_benchmarks(
    names: Sequence[str],
    *,
    limit: int | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
) -> dict[str, list[Problem]]:
    """Problems of each benchmark (first `limit` of each), loaded before any model so a typo fails fast.

    A name is one of data.EVAL_BENCHMARKS, another bundled set (its test split: "gsm8k" is gsm8k_test,
    "arithmetic" the 200 held-out sums), a local .jsonl/.json/.parquet file, or a Hub dataset id.
    """
    loaded: dict[str, list[Problem]] = {}
    for name in dict.fromkeys(names):  # drop repeats, keep order
        if name not in BUNDLED and "/" not in name and "." not in name:
            others = [other for other in BUNDLED if other not in EVAL_BENCHMARKS]
            raise EvaluationError(
                f"unknown benchmark {name!r}: use one of {', '.join(EVAL_BENCHMARKS)}, another bundled set "
                f"({', '.join(others)}), or a .jsonl/.json/.parquet file"
            )
        try:
            loaded[name] = load_problems(
                name, problem_field=problem_field, answer_field=answer_field, split="test", limit=limit
            )
        except Exception as error:  # file, field and Hub errors alike: one message naming the benchmark
            raise EvaluationError(f"benchmark {name!r}: {error}") from error
    return loaded


def evaluate_model(
    model,
    tokenizer,
    benchmarks: Sequence[str] = EVAL_BENCHMARKS,
    settings: EvalSettings | None = None,
    *,
    limit: int | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """{benchmark: result} for benchmarks given by name (see `load_benchmarks` and `iter_evaluate`)."""
    loaded = load_benchmarks(benchmarks, limit=limit, problem_field=problem_field, answer_field=answer_field)
    return dict(iter_evaluate(model, tokenizer, loaded, settings, progress=progress))
