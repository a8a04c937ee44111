"""The sweep table and the confirmation table, rendered from committed results (no model is loaded):

    python bench/study_tables.py             # bench/results/sweep.md and confirm.md from their JSON
    python bench/study_tables.py --chosen    # print each method's chosen learning rate

bench/study.py renders the same tables after every cell of `--mode sweep`, `confirm` and `ablations`.
All numbers are in %, mean ± standard deviation over seeds; differences in points. The figures
(bench/study_figures.py) are drawn beside each table and linked from it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.study_arms import ABLATIONS, MODES, SWEEP_RATES, ema_moved, rate_name  # noqa: E402
from bench.study_figures import ABLATION_PAIRS, METHODS, PAIRS, confirm_figures, sweep_figure  # noqa: E402
from bench.study_results import load_results, with_suffix  # noqa: E402
from bench.study_selection import (  # noqa: E402
    SELECTION_RULE,
    by_seed,
    chosen_rates,
    paired_difference,
    sweep_grid,
    sweep_means,
)

SHOWN_KS = (1, 16, 64)


def _percent(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _points(fraction: float) -> str:
    """A difference in points, signed; a rounding residue of zero prints as +0.0, not -0.0."""
    return f"{round(100 * fraction, 1) + 0.0:+.1f}"


def _interval(difference: dict | None) -> str:
    if difference is None:
        return "-"
    return f"{_points(difference['mean'])} [{_points(difference['low'])}, {_points(difference['high'])}]"


def _trained(results: dict, arm: str, rate: float | None = None) -> list[dict]:
    return [
        r for r in results["runs"] if r["arm"] == arm and (rate is None or r.get("learning_rate") == rate)
    ]


def _devices(results: dict) -> str:
    """Every machine the cells ran on, with how many cells each: a study can span sessions."""
    counts = Counter(r.get("device", "?") for r in results["runs"])
    if len(counts) == 1:
        return f"device {next(iter(counts))}"
    return "devices " + "; ".join(f"{name} ({n} cell{'s' if n > 1 else ''})" for name, n in counts.items())


def _settings(results: dict) -> list[str]:
    run = next((r for r in results["runs"] if r["arm"] != "base" and "config" in r), None)
    base = next((r for r in results["runs"] if r["arm"] == "base" and "config" in r), None)
    lines = []
    if base is not None:
        c, part = base["config"], base["signature"].get("heldout_part", "first")
        lines.append(
            f"Model `{c['model']}`{' (NF4)' if c.get('qlora') else ''}; held-out "
            f"`{c['eval_benchmarks'][0]}`, {part} part: {base['greedy']['problems']} problems; prompt "
            f"`{c['prompt_template']}`; temperature {c['temperature']}; " + _devices(results) + "."
        )
    if run is not None:
        c = run["config"]
        lines.append(
            f"Budget per cell: {c['steps']} steps of {c['prompts_per_step']} prompts x "
            f"{c['rollouts_per_prompt']} rollouts, {c['max_new_tokens']} new tokens, "
            f"LoRA r {c['lora_rank']}; "
            f"POPO's tau = 0.5 ** (2 / {c['steps']}) = {0.5 ** (2 / c['steps']):.4f} (the EMA's half-life is "
            "half the run); greedy pass@1 every "
            f"{run.get('signature', {}).get('eval_every', '?')} steps."
        )
    return lines


def _wall(runs: list[dict]) -> str:
    minutes = [r["wall_seconds"] / 60 for r in runs if "wall_seconds" in r]
    return f"{statistics.mean(minutes):.0f} min" if minutes else "-"


# ---- the sweep ----------------------------------------------------------------------------------


def sweep_markdown(results: dict) -> str:
    cells = [r for r in results["runs"] if r["arm"] != "base"]
    rates, seeds = sweep_grid(results)
    rates = rates or list(SWEEP_RATES)  # before any invocation: the sweep as planned
    seeds = seeds or [0, 1]
    chosen = chosen_rates(cells, list(METHODS), rates, seeds)
    lines = [
        "# Learning-rate sweep per method",
        "",
        f"Written by `bench/study_tables.py` on {date.today()} from `sweep.json`.",
        *_settings(results),
        "",
        "## The selection rule",
        "",
        "Written down (bench/study_selection.py, and this file) before any sweep cell ran:",
        "",
        f"> {SELECTION_RULE}",
        "",
        "The split: two_digit_sums' 200 held-out sums (no operand shared with training) are cut in two "
        "by unordered pair, so a + b and b + a fall on one side (bench/study_arms.py `split_heldout`): "
        "99 validation sums, which only the sweep evaluates, and 101 reported sums, which only confirm "
        f"and ablations evaluate. Planned: {' '.join(rate_name(r) for r in SWEEP_RATES)} x seeds 0 1 x "
        f"grpo popo psr, {MODES['sweep'].steps} steps each. The chosen rates from the committed JSON: "
        "`python bench/study_tables.py --chosen`.",
        "",
        "## Validation greedy pass@1 at the last step",
        "",
        "Mean over seeds (each seed's value in brackets); `*` marks the chosen rate.",
        "",
        "| method | " + " | ".join(rate_name(r) for r in rates) + " | chosen |",
        "| --- |" + " ---: |" * len(rates) + " --- |",
    ]
    for arm in METHODS:
        means = sweep_means(cells, arm, rates, seeds)
        row = []
        for rate in rates:
            runs = sorted(_trained(results, arm, rate), key=lambda r: r["seed"])
            if not runs:
                row.append("MISSING")
                continue
            values = [r["greedy"]["pass@1"] for r in runs]
            each = " / ".join(f"{100 * v:.1f}" for v in values)
            mark = "*" if chosen[arm] == rate else ""
            mean = (
                f"{100 * means[rate]:.1f}" if means[rate] is not None else f"{len(runs)}/{len(seeds)} seeds"
            )
            row.append(f"{mark}{mean} ({each})")
        pick = rate_name(chosen[arm]) if chosen[arm] is not None else "not yet"
        lines.append(f"| {arm} | " + " | ".join(row) + f" | {pick} |")
    base = next((r for r in results["runs"] if r["arm"] == "base"), None)
    if base is not None:
        lines += ["", f"The base's validation greedy pass@1: {100 * base['greedy']['pass@1']:.1f}."]
    ema = [r for r in _trained(results, "popo") if "greedy" in r.get("ema", {})]
    if ema:
        lines += [
            "",
            "## POPO's EMA adapter",
            "",
            "Shown because its half-life is within the run; the rule above reads the policy only.",
            "",
            "| rate | seeds | policy greedy pass@1 | EMA greedy pass@1 |",
            "| --- | ---: | ---: | ---: |",
        ]
        for rate in rates:
            runs = [r for r in ema if r.get("learning_rate") == rate]
            if runs:
                policy = _percent([r["greedy"]["pass@1"] for r in runs])
                shadow = _percent([r["ema"]["greedy"]["pass@1"] for r in runs])
                lines.append(f"| {rate_name(rate)} | {len(runs)} | {policy} | {shadow} |")
    missing = [
        f"{arm} {rate_name(rate)} seed {seed}"
        for arm in METHODS
        for rate in rates
        for seed in seeds
        if not any(r["seed"] == seed for r in _trained(results, arm, rate))
    ]
    done = len(METHODS) * len(rates) * len(seeds) - len(missing)
    lines += ["", "## Cells", "", f"{done} of {len(METHODS) * len(rates) * len(seeds)} cells measured."]
    lines += [f"Missing: {', '.join(missing)}." if missing else "Every cell is measured."]
    minutes = {arm: _wall(_trained(results, arm)) for arm in METHODS}
    lines += ["Wall time per cell: " + ", ".join(f"{arm} {m}" for arm, m in minutes.items()) + ".", ""]
    return "\n".join(lines)


# ---- confirmation and ablations ------------------------------------------------------------------


def _ks(results: dict) -> list[int]:
    for run in results["runs"]:
        if "passk" in run:
            found = sorted(int(key[5:]) for key in run["passk"] if key.startswith("pass@"))
            return [k for k in found if k in SHOWN_KS or k == found[-1]]
    return []


def _metrics(ks: list[int]) -> list[tuple[str, callable]]:
    metrics = [("greedy pass@1", lambda r: r["greedy"]["pass@1"])]
    return metrics + [(f"pass@{k}", lambda r, k=k: r["passk"][f"pass@{k}"]) for k in ks]


def confirm_markdown(results: dict) -> str:
    ks = _ks(results)
    metrics = _metrics(ks)
    base = next((r for r in results["runs"] if r["arm"] == "base"), None)
    main = {arm: _trained(results, arm) for arm in METHODS}
    popo_rate = main["popo"][0]["learning_rate"] if main["popo"] else None
    lines = [
        "# Confirmation: each method at its own learning rate",
        "",
        f"Written by `bench/study_tables.py` on {date.today()} from `confirm.json`. Rates chosen by the "
        "sweep (sweep.md) on the validation half; every number here is on the reported half, which the "
        "sweep never evaluated.",
        *_settings(results),
        "",
        "## At the end, reported held-out problems",
        "",
        "| method | learning rate | seeds | " + " | ".join(name for name, _ in metrics) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(metrics),
    ]
    if base is not None:
        lines.append("| base | - | - | " + " | ".join(_percent([value(base)]) for _, value in metrics) + " |")
    for arm, runs in main.items():
        if runs:
            rate = rate_name(runs[0]["learning_rate"])
            cells = [_percent([value(r) for r in runs]) for _, value in metrics]
            lines.append(f"| {arm} | {rate} | {len(runs)} | " + " | ".join(cells) + " |")
    if base is not None:
        lines += [
            "",
            "## Against the base",
            "",
            "Mean over seeds of the method minus the base (measured once), in points.",
            "",
            "| method | " + " | ".join(name for name, _ in metrics) + " |",
            "| --- |" + " ---: |" * len(metrics),
        ]
        for arm, runs in main.items():
            if runs:
                cells = [
                    f"{100 * (statistics.mean(value(r) for r in runs) - value(base)):+.1f}"
                    for _, value in metrics
                ]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired per-seed differences",
        "",
        "Per seed, one method minus another (the same seed's arms share step-1 rollouts and evaluation "
        "samples); mean [95 % t interval over seeds], in points. PSR - GRPO compares the two methods "
        "POPO is measured against.",
        "",
        "| difference | seeds | " + " | ".join(name for name, _ in metrics) + " |",
        "| --- | ---: |" + " ---: |" * len(metrics),
    ]
    for first, second in PAIRS:
        differences = [
            paired_difference(by_seed(main[first], value), by_seed(main[second], value))
            for _, value in metrics
        ]
        n = next((d["n"] for d in differences if d), 0)
        lines.append(f"| {first} - {second} | {n} | " + " | ".join(_interval(d) for d in differences) + " |")
    lines += _ema_lines(results, [*METHODS, *ABLATIONS], ks)
    lines += _ablation_lines(results, metrics, popo_rate)
    lines += ["", "## Cells", ""]
    for arm in [*METHODS, *ABLATIONS]:
        runs = _trained(results, arm)
        if runs:
            seeds = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            lines.append(f"- {arm}: seeds {seeds}; {_wall(runs)} per cell")
    lines.append("")
    return "\n".join(lines)


def _ema_lines(results: dict, arms: list[str], ks: list[int]) -> list[str]:
    """The EMA adapter beside the policy, only for arms whose EMA moved (half-life within the run)."""
    top = ks[-1] if ks else None
    rows = []
    for arm in arms:
        runs = [r for r in _trained(results, arm) if "greedy" in r.get("ema", {})]
        runs = [r for r in runs if ema_moved(r["config"]["tau"], r["config"]["steps"])]
        if not runs:
            continue
        row = [
            _percent([r["greedy"]["pass@1"] for r in runs]),
            _percent([r["ema"]["greedy"]["pass@1"] for r in runs]),
        ]
        if top is not None and all("passk" in r["ema"] for r in runs):
            row += [
                _percent([r["passk"][f"pass@{top}"] for r in runs]),
                _percent([r["ema"]["passk"][f"pass@{top}"] for r in runs]),
            ]
        else:
            row += ["-", "-"]
        rows.append(f"| {arm} | {len(runs)} | " + " | ".join(row) + " |")
    if not rows:
        return []
    return [
        "",
        "## The EMA adapter",
        "",
        "Only where the EMA moved (tau ** steps <= 0.5; here tau = 0.5 ** (2 / steps), so 0.25).",
        "",
        f"| arm | seeds | policy greedy pass@1 | EMA greedy pass@1 | policy pass@{top} | EMA pass@{top} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]


def _ablation_lines(results: dict, metrics: list, popo_rate: float | None) -> list[str]:
    """Each ablation's values, then each minus POPO, paired by seed, on every metric."""
    ablations = {arm: _trained(results, arm) for arm in ABLATIONS if _trained(results, arm)}
    if not ablations:
        return []
    reference = _trained(results, "popo", popo_rate)
    names = " | ".join(name for name, _ in metrics)
    lines = [
        "",
        "## Ablations at POPO's rate",
        "",
        f"Each arm changes one term of POPO at POPO's chosen rate "
        f"({rate_name(popo_rate) if popo_rate else '?'}), except psr-rate, which changes the rate "
        "to PSR's; mean ± std over seeds.",
        "",
        f"| arm | seeds | {names} |",
        "| --- | ---: |" + " ---: |" * len(metrics),
    ]
    for arm, runs in ablations.items():
        cells = [_percent([value(r) for r in runs]) for _, value in metrics]
        lines.append(f"| {arm} ({runs[0]['about']}) | {len(runs)} | " + " | ".join(cells) + " |")
    psr = _trained(results, "psr")  # POPO with every term off, at PSR's own rate
    psr_rate = f", at its own rate {rate_name(psr[0]['learning_rate'])}" if psr else ""
    named = {"popo": reference, "psr": psr, **ablations}
    pairs = [  # a pair needs both arms' cells, except POPO's: its rows then read "-"
        (first, named[first], second, named.get(second, []))
        for first, second in ABLATION_PAIRS
        if named.get(first) and (second == "popo" or named.get(second))
    ]
    lines += [
        "",
        "Paired per seed, the first arm minus the second over the seeds both have; mean [95 % t interval], "
        f"in points. PSR - POPO (PSR is POPO with all of its additions off{psr_rate}) is the gap the terms "
        "can explain; all-off is PSR's objective at POPO's rate, so all-off - POPO is the terms' share of "
        "that gap and PSR - all-off the rate's. psr-rate is POPO's objective at PSR's rate: PSR - psr-rate "
        "is the terms' share at PSR's rate, psr-rate - POPO the rate's share for POPO's objective.",
        "",
        f"| difference | seeds | {names} |",
        "| --- | ---: |" + " ---: |" * len(metrics),
    ]
    for first, runs, second, theirs in pairs:
        differences = [
            paired_difference(by_seed(runs, value), by_seed(theirs, value)) for _, value in metrics
        ]
        n = len({r["seed"] for r in runs} & {r["seed"] for r in theirs})
        lines.append(f"| {first} - {second} | {n} | " + " | ".join(_interval(d) for d in differences) + " |")
    return lines


# ---- writing them ---------------------------------------------------------------------------------


def write_tables(prefix: Path, results: dict) -> str:
    """PREFIX.md from the results, as the sweep's or confirm's table (by the file's mode), and its
    figures beside it (bench/study_figures.py), linked at the end."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if results.get("mode") == "sweep":
        text, figures = sweep_markdown(results), sweep_figure(results, prefix)
    else:
        arms, metrics = ["base", *METHODS, *ABLATIONS], _metrics(_ks(results))
        text, figures = confirm_markdown(results), confirm_figures(results, metrics, prefix, arms)
    if figures:
        text += "\n".join(["", "## Figures", "", *[f"![{title}]({path.name})\n" for title, path in figures]])
    with_suffix(prefix, ".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    described = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    described.add_argument("--sweep", default=str(ROOT / "bench" / "results" / "sweep"), help="sweep prefix")
    described.add_argument(
        "--confirm", default=str(ROOT / "bench" / "results" / "confirm"), help="confirm prefix"
    )
    described.add_argument("--chosen", action="store_true", help="print the chosen rates only")
    args = described.parse_args(argv)
    sweep = load_results(with_suffix(Path(args.sweep), ".json"))
    sweep.setdefault("mode", "sweep")
    if args.chosen:
        cells = [r for r in sweep["runs"] if r["arm"] != "base"]
        rates, seeds = sweep_grid(sweep)
        for arm, rate in chosen_rates(cells, list(METHODS), rates, seeds).items():
            print(f"{arm}: {rate:g}" if rate is not None else f"{arm}: not chosen (sweep incomplete)")
        return 0
    written = [write_tables(Path(args.sweep), sweep) and with_suffix(Path(args.sweep), ".md")]
    confirm_path = with_suffix(Path(args.confirm), ".json")
    if confirm_path.is_file():
        write_tables(Path(args.confirm), load_results(confirm_path))
        written.append(with_suffix(Path(args.confirm), ".md"))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
