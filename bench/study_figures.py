"""The fair study's figures, drawn from the same results as its tables (bench/study_tables.py):

- PREFIX-rates.png (sweep): validation greedy pass@1 against the learning rate, per method; each
  seed a dot, the mean a line, the chosen rate a star, the base a dashed line;
- PREFIX-differences.png (confirm): the paired per-seed differences POPO - GRPO and POPO - PSR, each
  seed a dot, the mean with its 95 % t interval as a bar, per metric (greedy pass@1, pass@k);
- confirm also gets the study's curves, pass@k and entropy figures (study_results.render_figures).

Every figure returns as (what it shows, path) for the Markdown to link.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.study_arms import rate_name
from bench.study_results import render_figures
from bench.study_selection import by_seed, chosen_rates, paired_difference, sweep_grid

METHODS = ("grpo", "popo", "psr")
COLORS = {"grpo": "tab:blue", "popo": "tab:orange", "psr": "tab:green"}  # tab10's first three


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


def differences_figure(results: dict, metrics: list, prefix: Path) -> list[tuple[str, Path]]:
    """POPO minus GRPO and minus PSR per seed, per metric, with the mean's 95 % t interval."""
    by_arm = {arm: [r for r in results["runs"] if r["arm"] == arm] for arm in METHODS}
    pairs = [other for other in ("grpo", "psr") if by_arm[other] and by_arm["popo"]]
    if not pairs:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 4), squeeze=False)
    for ax, (name, value) in zip(axes[0], metrics, strict=True):
        popo = by_seed(by_arm["popo"], value)
        for place, other in enumerate(pairs):
            theirs = by_seed(by_arm[other], value)
            seeds = sorted(set(popo) & set(theirs))
            dots = [100 * (popo[s] - theirs[s]) for s in seeds]
            ax.scatter([place] * len(dots), dots, color=COLORS[other], alpha=0.6, s=16)
            difference = paired_difference(popo, theirs)
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
        ax.set_xticks(range(len(pairs)), [f"popo - {other}" for other in pairs])
        ax.set_xlim(-0.5, len(pairs) - 0.5)
        ax.set(title=name, ylabel="points" if ax is axes[0][0] else None)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Paired differences: dots are seeds; squares the mean with its 95 % t interval", fontsize=9)
    return [("the paired differences per seed", _save(plt, fig, prefix, "differences"))]


def confirm_figures(results: dict, metrics: list, prefix: Path, arms: list[str]) -> list[tuple[str, Path]]:
    """The paired differences, then the curves, pass@k and entropy of every arm measured."""
    present = [arm for arm in arms if any(r["arm"] == arm for r in results["runs"])]
    order = [arm for arm in arms if arm != "base"]  # tab10 in this order: the colours of COLORS
    return differences_figure(results, metrics, prefix) + render_figures(results, present, prefix, order)
