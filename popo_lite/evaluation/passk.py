"""Evaluation metrics over per-problem correct counts: avg@n and the unbiased pass@k estimator.

With n samples per problem of which c are correct, the chance that k samples drawn without replacement
from those n contain a correct one is pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, "Evaluating
Large Language Models Trained on Code", section 2.1); the benchmark's pass@k is its mean over problems.
avg@n is the mean correctness over all samples, which equals the unbiased pass@1. Both are what the POPO
reference reports (docs/algorithm.md section 3.2). Pure functions of integers: no model, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), for n samples of which c are correct, 1 <= k <= n.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), the same value, because the binomials overflow a
    float at n = 128 long before the ratio stops being meaningful (Chen et al. 2021, figure 3).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(num_correct: Sequence[int], n: int, k: int) -> float:
    """The benchmark's pass@k: `pass_at_k` averaged over problems (num_correct[i] = c of problem i)."""
    if not num_correct:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for c in num_correct) / len(num_correct)


def avg_at_n(num_correct: Sequence[int], n: int) -> float:
    """Mean correctness over all len(num_correct) x n samples (= greedy pass@1 when n = 1)."""
    if not num_correct:
        raise ValueError("avg_at_n needs at least one problem")
    if any(not 0 <= c <= n for c in num_correct):
        raise ValueError(f"avg_at_n: every correct count must be in [0, {n}], got {list(num_correct)}")
    return sum(num_correct) / (len(num_correct) * n)


def summarise(records: list[dict], metric: str, n: int, ks: Sequence[int]) -> dict:
    """One benchmark's numbers from its per-problem records (each with num_correct, tokens, cut lists).

    "score" is `metric` (greedy "pass@1" or "avg@n"): the mean correctness; "pass@k" for every k <= n.
    """
    num_correct = [record["num_correct"] for record in records]
    samples = [(tokens, cut) for r in records for tokens, cut in zip(r["tokens"], r["cut"], strict=True)]
    summary = {
        "problems": len(records),
        "samples": n,
        "metric": metric,
        "score": avg_at_n(num_correct, n),
        "correct": sum(num_correct),
    }
    summary |= {f"pass@{k}": mean_pass_at_k(num_correct, n, k) for k in sorted(set(ks)) if k <= n}
    summary["cut_rate"] = sum(cut for _, cut in samples) / len(samples)  # completions that hit the limit
    summary["mean_tokens"] = sum(tokens for tokens, _ in samples) / len(samples)
    return summary


def markdown_table(results: dict[str, dict]) -> str:
    """Benchmark | problems | score | pass@k for k > 1 | cut at max tokens, in percent, from `summarise`s.

    Greedy scores also show the count (11/30), the form the paper's headline result takes.
    """
    first = next(iter(results.values()))
    metric = first["metric"]
    ks = [int(key[5:]) for key in first if key.startswith("pass@") and key != "pass@1"]
    greedy = metric == "pass@1"
    header = ["benchmark", "problems", "pass@1 (greedy)" if greedy else metric]
    header += [*(f"pass@{k}" for k in ks), "cut at max tokens"]
    rows = [
        [
            name,
            str(result["problems"]),
            f"{100 * result['score']:.1f}"
            + (f" ({result['correct']}/{result['problems']})" if greedy else ""),
            *(f"{100 * result[f'pass@{k}']:.1f}" for k in ks),
            f"{100 * result['cut_rate']:.0f}%",
        ]
        for name, result in results.items()
    ]
    if len(results) > 1:  # the unweighted mean over benchmarks, as papers report it

        def mean(key: str) -> float:
            return 100 * sum(result[key] for result in results.values()) / len(results)

        problems = str(sum(result["problems"] for result in results.values()))
        pass_cells = [f"{mean(f'pass@{k}'):.1f}" for k in ks]
        rows.append(["average", problems, f"{mean('score'):.1f}", *pass_cells, f"{mean('cut_rate'):.0f}%"])
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if not greedy:
        lines.append(f"\n{metric} = mean correctness over all samples = the unbiased pass@1.")
    return "\n".join(lines)
