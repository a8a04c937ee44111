"""How the sweep picks each method's learning rate, and how confirm compares methods: pure functions
of the stored cells (plain dicts, as bench/study_runs.py records them). Nothing here trains.

The rule was written down, here and in bench/results/sweep.md, before any sweep cell
ran; SELECTION_RULE is the text both carry.
"""

from __future__ import annotations

import math
import statistics

SELECTION_RULE = (
    "For each method (grpo, popo, psr), the chosen learning rate is the swept rate with the highest mean, "
    "over the sweep's seeds, of the policy's greedy pass@1 on the VALIDATION part of the held-out sums at "
    "the last step. Only rates with every seed measured compete, and a method is chosen only when all its "
    "rates are complete. Ties (equal means) go to the smaller rate. The reported part of the held-out "
    "sums is never evaluated in the sweep."
)

# Student's t, 0.975 quantile, by degrees of freedom (two-sided 95 %); no scipy in the environment.
T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (a table, conservative between
    its rows: the next smaller tabled df)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 paired seeds")
    return T_975[max(d for d in T_975 if d <= df)] if df <= 30 else 1.960 + 2.4 / df


def final_validation(cell: dict) -> float:
    """A sweep cell's selection metric: the policy's greedy pass@1 at the last step."""
    return cell["greedy"]["pass@1"]


def sweep_means(
    cells: list[dict], arm: str, rates: list[float], seeds: list[int]
) -> dict[float, float | None]:
    """{rate: mean over `seeds` of the selection metric}, None where a seed is missing."""
    means: dict[float, float | None] = {}
    for rate in rates:
        values = [
            final_validation(c)
            for c in cells
            if c["arm"] == arm and c.get("learning_rate") == rate and c["seed"] in seeds
        ]
        found = {c["seed"] for c in cells if c["arm"] == arm and c.get("learning_rate") == rate}
        means[rate] = statistics.mean(values) if set(seeds) <= found else None
    return means


def choose_rate(means: dict[float, float | None]) -> float | None:
    """SELECTION_RULE on one method's means: the highest mean, ties to the smaller rate; None unless
    every rate is measured."""
    if not means or any(mean is None for mean in means.values()):
        return None
    best = max(means.values())
    return min(rate for rate, mean in means.items() if math.isclose(mean, best, rel_tol=0, abs_tol=1e-12))


def chosen_rates(
    cells: list[dict], arms: list[str], rates: list[float], seeds: list[int]
) -> dict[str, float | None]:
    return {arm: choose_rate(sweep_means(cells, arm, rates, seeds)) for arm in arms}


def sweep_grid(results: dict) -> tuple[list[float], list[int]]:
    """The sweep's rates and seeds, sorted: the grid its invocations asked for (results["grid"], kept by
    bench/study_results.add_grid) and any rate or seed a stored cell has."""
    grid = results.get("grid", {})
    cells = [c for c in results["runs"] if c["arm"] != "base"]
    rates = set(grid.get("rates", [])) | {
        c["learning_rate"] for c in cells if c.get("learning_rate") is not None
    }
    seeds = set(grid.get("seeds", [])) | {c["seed"] for c in cells if c["seed"] is not None}
    return sorted(rates), sorted(seeds)


def by_seed(runs: list[dict], value) -> dict[int, float]:
    """{seed: value(run)} over one arm's runs: the per-seed side of a paired difference."""
    return {r["seed"]: value(r) for r in runs}


def paired_difference(first: dict[int, float], second: dict[int, float]) -> dict | None:
    """first - second over the seeds both have: mean, the 95 % t interval over seeds, n.

    The arms of one seed share their step-1 rollouts and evaluation samples (common random numbers),
    so the per-seed difference removes what the seed does to both. None with fewer than 2 seeds.
    """
    seeds = sorted(set(first) & set(second))
    if len(seeds) < 2:
        return None
    differences = [first[s] - second[s] for s in seeds]
    mean = statistics.mean(differences)
    half = t_975(len(seeds) - 1) * statistics.stdev(differences) / math.sqrt(len(seeds))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(seeds), "seeds": seeds}
