"""The fair study's figures, drawn from the same results as its tables (bench/study_tables.py):

- PREFIX-rates.png (sweep): validation greedy pass@1 against the learning rate, per method; each
  seed a dot, the mean a line, the chosen rate a star, the base a dashed line;
- PREFIX-differences.png (confirm): the paired per-seed differences POPO - GRPO, POPO - PSR and
  PSR - GRPO, each seed a dot, the mean with its 95 % t interval as a bar, per metric (greedy pass@1, pass@k);
- PREFIX-ablations.png (confirm): the same for each ablation minus POPO, PSR (all of POPO's
  additions off, at its own rate) minus POPO as the gap the terms can explain, and PSR minus all-off
  (PSR's objective at POPO's rate) as the rate's share of it, and PSR minus psr-rate (POPO's objective
  at PSR's rate) as the terms' share at PSR's rate;
- confirm also gets the study's curves, pass@k and entropy figures (study_results.render_figures).

Every figure returns as (what it shows, path) for the Markdown to link.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.study_arms import ABLATIONS, rate_name
from bench.study_results import render_figures
from bench.study_selection import by_seed, chosen_rates, paired_difference, sweep_grid

METHODS = ("grpo", "popo", "psr")
COLORS = {"grpo": "tab:blue", "popo": "tab:orange", "psr": "tab:green"}  # tab10's first three
PAIRS = (("popo", "grpo"), ("popo", "psr"), ("psr", "grpo"))  # the confirmation's paired differences
# the ablations' paired differences: each ablation minus POPO, then PSR minus POPO, all-off and psr-rate
ABLATION_PAIRS = (
    *((arm, "popo") for arm in ABLATIONS),
    ("psr", "popo"),
    ("psr", "all-off"),
    ("psr", "psr-rate"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, prefix: Path, name: str) -> Path:
    path = prefix.parent / f"{prefix.name}-{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _means_by_rate(runs: list[dict], value) -> tuple[list[float], list[float]]:
    """The rates measured, ascending, and the mean of `value` over each rate's runs, in %."""
    measured = sorted({r["learning_rate"] for r in runs})
    means = [100 * statistics.mean(value(r) for r in runs if r["learning_rate"] == rate) for rate in measured]
    return measured, means


def sweep_figure(results: dict, prefix: Path) -> list[tuple[str, Path]]:
    """Validation greedy pass@1 against the learning rate, per method (nothing before any cell)."""
    cells = [r for r in results["runs"] if r["arm"] != "base" and "greedy" in r]
    if not cells:
        return []
    plt = _pyplot()
    rates, seeds = sweep_grid(results)
    chosen = chosen_rates(cells, list(METHODS), rates, seeds)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in METHODS:
        runs = [r for r in cells if r["arm"] == arm]
        if not runs:
            continue
        ax.scatter(
            [r["learning_rate"] for r in runs],
            [100 * r["greedy"]["pass@1"] for r in runs],
            color=COLORS[arm],
            alpha=0.45,
            s=14,
        )
        measured, means = _means_by_rate(runs, lambda r: r["greedy"]["pass@1"])
        ax.plot(measured, means, "-", color=COLORS[arm], label=arm)
        if chosen.get(arm) is not None:
            at = means[measured.index(chosen[arm])]
            ax.plot([chosen[arm]], [at], "*", color=COLORS[arm], markersize=14, markeredgecolor="black")
    emas = [r for r in cells if r["arm"] == "popo" and "greedy" in r.get("ema", {})]
    if emas:
        measured, means = _means_by_rate(emas, lambda r: r["ema"]["greedy"]["pass@1"])
        ax.plot(measured, means, ":", color=COLORS["popo"], label="popo's EMA adapter")
    base = next((r for r in results["runs"] if r["arm"] == "base" and "greedy" in r), None)
    if base is not None:
        ax.axhline(100 * base["greedy"]["pass@1"], color="gray", linestyle="--", label="base")
    ax.set_xscale("log")
    ax.set_xticks(rates, [rate_name(rate) for rate in rates])
    ax.minorticks_off()
    ax.set(
        xlabel="learning rate (LoRA)",
        ylabel="validation greedy pass@1 (%)",
        title="Sweep: dots are seeds, lines their mean, stars the chosen rates",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [("validation greedy pass@1 against the learning rate", _save(plt, fig, prefix, "rates"))]


def differences_figure(
    results: dict, metrics: list, prefix: Path, pairs: list[tuple[str, str]], name: str, shows: str
) -> list[tuple[str, Path]]:
    """first minus second per seed for each (first, second) of `pairs` that has runs, per metric, with
    the mean's 95 % t interval; each seed a dot in the colour of the pair."""
    runs = {arm: [r for r in results["runs"] if r["arm"] == arm] for pair in pairs for arm in pair}
    pairs = [(first, second) for first, second in pairs if runs[first] and runs[second]]
    if not pairs:
        return []
    plt = _pyplot()
    colours = plt.get_cmap("tab10").colors
    columns = len(metrics) if len(pairs) <= 3 else 2  # many pairs: two panels a row
    rows = -(-len(metrics) // columns)
    width = max(3.4, 0.9 * len(pairs) + 1.6)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.set_visible(False)
    for index, (metric, value) in enumerate(metrics):
        ax = axes.flat[index]
        for place, (first, second) in enumerate(pairs):
            ours, theirs = by_seed(runs[first], value), by_seed(runs[second], value)
            dots = [100 * (ours[s] - theirs[s]) for s in sorted(set(ours) & set(theirs))]
            colour = COLORS[second] if first == "popo" else colours[(place + 3) % len(colours)]
            ax.scatter([place] * len(dots), dots, color=colour, alpha=0.6, s=16)
            difference = paired_difference(ours, theirs)
            if difference is not None:
                mean = 100 * difference["mean"]
                low, high = 100 * difference["low"], 100 * difference["high"]
                ax.errorbar(
                    [place + 0.18],
                    [mean],
                    yerr=[[mean - low], [high - mean]],
                    fmt="s",
                    color="black",
                    capsize=4,
                    markersize=5,
                )
        ax.axhline(0, color="gray", linewidth=1)
        labels = [
            f"{first}\n- {second}" if len(pairs) > 3 else f"{first} - {second}" for first, second in pairs
        ]
        ax.set_xticks(range(len(pairs)), labels, fontsize=8 if len(pairs) > 3 else None)
        ax.set_xlim(-0.5, len(pairs) - 0.5)
        ax.set(title=metric, ylabel="points" if index % columns == 0 else None)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"{shows[0].upper()}{shows[1:]}: dots are seeds; squares the mean with its 95 % t interval",
        fontsize=9,
    )
    return [(shows, _save(plt, fig, prefix, name))]


def confirm_figures(results: dict, metrics: list, prefix: Path, arms: list[str]) -> list[tuple[str, Path]]:
    """The paired differences, then the curves, pass@k and entropy of every arm measured."""
    present = [arm for arm in arms if any(r["arm"] == arm for r in results["runs"])]
    order = [arm for arm in arms if arm != "base"]  # tab10 in this order: the colours of COLORS
    main = differences_figure(
        results,
        metrics,
        prefix,
        list(PAIRS),
        "differences",
        "the paired differences per seed",
    )
    ablations = []
    if any(r["arm"] in ABLATIONS for r in results["runs"]):
        ablations = differences_figure(
            results,
            metrics,
            prefix,
            list(ABLATION_PAIRS),
            "ablations",
            "each ablation minus POPO per seed, PSR (every term off, its own rate) minus POPO, and PSR "
            "minus all-off (the same objective at POPO's rate) and minus psr-rate (POPO's objective at "
            "PSR's rate)",
        )
    return main + ablations + render_figures(results, present, prefix, order)
