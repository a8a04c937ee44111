"""The study's results file (bench/results/study.json) and the report rendered from it (study.md and
the PNG figures): everything `bench/study.py` does with finished runs. Runs are plain dicts, one per
cell (arm, learning rate, seed; the 8-step study's store no rate), as bench/study_runs.py records
them; nothing here trains or evaluates. The sweep's and confirm's tables are bench/study_tables.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import sys
from datetime import date, datetime
from pathlib import Path

import torch

from bench.machine import device_name

ROOT = Path(__file__).resolve().parents[1]


def command_line() -> str:
    return "python " + " ".join(sys.argv).replace(str(ROOT) + "/", "")


def load_results(path: Path) -> dict:
    if not path.is_file():
        return {"runs": []}
    return json.loads(path.read_text())


def save_results(path: Path, results: dict) -> None:
    """Written whole to a temporary file and renamed: a kill mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results["updated"] = datetime.now().isoformat(timespec="seconds")
    partial = path.parent / (path.name + ".partial")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, path)


def cell_key(run: dict) -> tuple:
    """A cell: (arm, learning rate, seed); the 8-step study's runs store no rate (None)."""
    return run["arm"], run.get("learning_rate"), run["seed"]


def find_run(results: dict, arm: str, seed: int | None, learning_rate: float | None = None) -> dict | None:
    return next((r for r in results["runs"] if cell_key(r) == (arm, learning_rate, seed)), None)


def add_run(path: Path, results: dict, run_result: dict, order: list[str]) -> None:
    """Adds a finished cell to the JSON as it is on disk now, under a lock: two study processes given
    disjoint cells (one torch thread each) can share one results file. Cells are kept sorted by arm
    (in `order`, the study's arm list), learning rate and seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_results(path)["runs"]
        key = cell_key(run_result)
        mine = {cell_key(r) for r in results["runs"]}
        results["runs"] = [r for r in results["runs"] if cell_key(r) != key]
        results["runs"] += [r for r in on_disk if cell_key(r) not in mine | {key}]
        results["runs"].append(run_result)
        _union_grid(results, load_results(path).get("grid"))
        rank = {arm: i for i, arm in enumerate(order)}
        results["runs"].sort(
            key=lambda r: (rank.get(r["arm"], len(rank)), r.get("learning_rate") or 0, r["seed"] or 0)
        )
        save_results(path, results)


def _union_grid(results: dict, other: dict | None) -> None:
    if other:
        grid = results.setdefault("grid", {"rates": [], "seeds": []})
        for key in ("rates", "seeds"):
            grid[key] = sorted(set(grid[key]) | set(other.get(key, [])))


def add_grid(path: Path, results: dict, rates: list[float], seeds: list[int]) -> None:
    """Adds a sweep invocation's rates and seeds to the file's grid (the cells the selection rule
    waits for), under the same lock as add_run: lanes with other seeds add theirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = load_results(path)
        _union_grid(results, {"rates": rates, "seeds": seeds})
        _union_grid(results, on_disk.get("grid"))
        results["runs"] += [
            r for r in on_disk["runs"] if cell_key(r) not in {cell_key(m) for m in results["runs"]}
        ]
        save_results(path, results)


# ---- the report ---------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _percent(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def _number(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _arm_runs(results: dict, arm: str) -> list[dict]:
    return [r for r in results["runs"] if r["arm"] == arm]


def _ks(results: dict) -> list[int]:
    for stored in results["runs"]:
        if "passk" in stored:
            return sorted(int(key[5:]) for key in stored["passk"] if key.startswith("pass@"))
    return []


def passk_table(results: dict, arms: list[str]) -> list[str]:
    """The PSR paper's table: pass@k per method, the base first; mean ± std over seeds, in %."""
    ks = _ks(results)
    if not ks:
        return ["No run is measured yet."]
    lines = [
        "| method | seeds | greedy pass@1 | " + " | ".join(f"pass@{k}" for k in ks) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(ks),
    ]
    for arm in arms:
        runs = _arm_runs(results, arm)
        if not runs:
            continue
        seeds = "-" if arm == "base" else str(len(runs))
        cells = [_percent([r["passk"][f"pass@{k}"] for r in runs]) for k in ks]
        lines.append(
            f"| {arm} ({runs[0]['about']}) | {seeds} | {_percent([r['greedy']['pass@1'] for r in runs])} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def summary_table(results: dict, arms: list[str]) -> list[str]:
    """One row per arm, the README's table: greedy pass@1, pass@1 / pass@top for the policy and for
    POPO's EMA adapter (mean ± std over seeds, in %), and each run's wall time (min-max over seeds)."""
    ks = _ks(results)
    if not ks:
        return []
    top = ks[-1]

    def pair(passks: list[dict]) -> str:
        return f"{_percent([p['pass@1'] for p in passks])} / {_percent([p[f'pass@{top}'] for p in passks])}"

    lines = [
        f"| arm | seeds | greedy pass@1 | pass@1 / pass@{top} | EMA pass@1 / pass@{top} | wall per run |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for arm in arms:
        runs = [r for r in _arm_runs(results, arm) if "passk" in r]
        if not runs:
            continue
        seeds = ", ".join(str(r["seed"]) for r in runs if r["seed"] is not None) or "-"
        sampled = pair([r["passk"] for r in runs])
        emas = [r["ema"]["passk"] for r in runs if "passk" in r.get("ema", {})]
        if all(r.get("ema", {}).get("same_as_policy") for r in runs):
            ema = "= policy (tau 0)"
        else:
            ema = pair(emas) if emas else "-"
        minutes = sorted({round(r["wall_seconds"] / 60) for r in runs if "wall_seconds" in r})
        if arm == "base" or not minutes:
            wall = "-"
        else:
            wall = f"{minutes[0]} min" if len(minutes) == 1 else f"{minutes[0]}-{minutes[-1]} min"
        greedy = _percent([r["greedy"]["pass@1"] for r in runs])
        lines.append(f"| {arm} | {seeds} | {greedy} | {sampled} | {ema} | {wall} |")
    return lines


def missing_cells(results: dict, arms: list[str], seeds: list[int]) -> tuple[list[str], list[str]]:
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " --- |" * len(seeds)]
    missing = []
    for arm in arms:
        if arm == "base":
            done = find_run(results, "base", None) is not None
            lines.append("| base | " + " | ".join(["done" if done else "MISSING"] * len(seeds)) + " |")
            if not done:
                missing.append("base")
            continue
        cells = []
        for seed in seeds:
            done = find_run(results, arm, seed) is not None
            cells.append("done" if done else "MISSING")
            if not done:
                missing.append(f"{arm} seed {seed}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines, missing


def diagnostics_table(results: dict, arms: list[str]) -> list[str]:
    lines = [
        "| arm | train reward step 1 -> last | sequences with gradient per step | probe entropy start -> end "
        "| wrong-answer log-prob start -> end | right-answer log-prob start -> end "
        "| s per step (generate / update / study probe+eval) | wall per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in arms:
        runs = [r for r in _arm_runs(results, arm) if r.get("steps")]
        if not runs:
            continue
        first = _number([r["steps"][0]["reward_mean"] for r in runs])
        last = _number([r["steps"][-1]["reward_mean"] for r in runs])
        gradient = _number([statistics.mean(s["gradient_sequences"] for s in r["steps"]) for r in runs], 1)
        rollouts = runs[0]["steps"][0].get("rollouts", "?")

        def span(key: str, runs=runs) -> str:
            return f"{_number([r[key][0] for r in runs])} -> {_number([r[key][-1] for r in runs])}"

        step_s = statistics.mean(s.get("seconds_step", 0.0) for r in runs for s in r["steps"])
        gen_s = statistics.mean(s.get("seconds_generate", 0.0) for r in runs for s in r["steps"])
        upd_s = statistics.mean(s.get("seconds_update", 0.0) for r in runs for s in r["steps"])
        study_s = statistics.mean(
            s.get("seconds_probe", 0.0) + s.get("seconds_eval", 0.0) for r in runs for s in r["steps"]
        )
        wall = statistics.mean(r.get("wall_seconds", 0.0) for r in runs)
        lines.append(
            f"| {arm} | {first} -> {last} | {gradient} of {rollouts} | {span('entropy')} "
            f"| {span('negative_logprob')} | {span('positive_logprob')} "
            f"| {step_s:.1f} ({gen_s:.1f} / {upd_s:.1f} / {study_s:.1f}) | {wall:.0f} s |"
        )
    return lines


def ema_table(results: dict, arms: list[str]) -> list[str]:
    """POPO arms: the policy's and the EMA adapter's held-out scores at the end, side by side."""
    top = max(_ks(results) or [1])
    lines = [
        f"| arm | policy greedy pass@1 | EMA greedy pass@1 | policy pass@{top} | EMA pass@{top} |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for arm in arms:
        runs = [r for r in _arm_runs(results, arm) if "ema" in r]
        if not runs:
            continue
        policy = [
            _percent([r["greedy"]["pass@1"] for r in runs]),
            _percent([r["passk"][f"pass@{top}"] for r in runs]),
        ]
        if all(r["ema"].get("same_as_policy") for r in runs):
            ema = ["= policy (tau 0)"] * 2
        else:
            emas = [r["ema"] for r in runs if not r["ema"].get("same_as_policy")]
            ema = [
                _percent([e["greedy"]["pass@1"] for e in emas]),
                _percent([e["passk"][f"pass@{top}"] for e in emas]),
            ]
        lines.append(f"| {arm} | {policy[0]} | {ema[0]} | {policy[1]} | {ema[1]} |")
    return lines if len(lines) > 2 else []


def base_verdict(base: dict) -> str:
    greedy = base["greedy"]["pass@1"]
    if "passk" not in base:  # the sweep samples none
        return (
            f"The base model's greedy pass@1 is {100 * greedy:.1f} % ({base['greedy']['problems']} problems)."
        )
    top = max(int(key[5:]) for key in base["passk"] if key.startswith("pass@"))
    sampled = base["passk"][f"pass@{top}"]
    in_range = 0.05 <= greedy <= 0.30
    room = sampled >= 2 * greedy
    verdict = "meets" if in_range and room else "does NOT meet"
    return (
        f"The base model's greedy pass@1 is {100 * greedy:.1f} % and its pass@{top} {100 * sampled:.1f} % "
        f"(sampled pass@1 {100 * base['passk']['pass@1']:.1f} %): the task {verdict} the study's target "
        f"(greedy pass@1 within 5-30 %: {'yes' if in_range else 'no'}; pass@{top} at least twice pass@1: "
        f"{'yes' if room else 'no'})."
    )


def render(results: dict, arms: list[str], seeds: list[int], prefix: Path, order: list[str]) -> str:
    """The Markdown report: the asked-for `arms` and every arm with runs, in the study's `order`."""
    arms = [arm for arm in order if arm in arms or _arm_runs(results, arm)]
    seeds = sorted(set(seeds) | {r["seed"] for r in results["runs"] if r["seed"] is not None})
    base = find_run(results, "base", None)
    settings = (base or (results["runs"] or [{}])[0]).get("config", {})
    any_run = next((r for r in results["runs"] if r["arm"] != "base"), None)
    lines = [
        "# POPO vs GRPO vs plain positive-only training, in miniature",
        "",
        f"Written by `bench/study.py` on {date.today()}; last command: `{command_line()}`; "
        f"device: {(any_run or base or {}).get('device', device_name())}, torch {torch.__version__}.",
        "",
    ]
    if settings:
        heldout = settings.get("eval_benchmarks", ["?"])[0]
        problems = (base or {}).get("greedy", {}).get("problems", "?")
        lines.append(
            f"Model `{settings['model']}`{' (NF4)' if settings.get('qlora') else ''}; training set "
            f"`{settings['dataset']}`; held-out `{heldout}` ({problems} problems); prompt "
            f"`{settings['prompt_template']}`; temperature {settings['temperature']}."
        )
    if any_run:
        c = any_run["config"]
        lines.append(
            f"Budget per run: {c['steps']} steps of {c['prompts_per_step']} prompts x "
            f"{c['rollouts_per_prompt']} rollouts, {c['max_new_tokens']} new tokens, learning rate "
            f"{c['learning_rate']}, LoRA r "
            f"{c['lora_rank']}; held-out greedy pass@1 every {any_run['signature'].get('eval_every')} steps."
        )
    lines += [""]
    if base is not None:
        lines += ["## The task", "", base_verdict(base), ""]
    ks = _ks(results)
    lines += [
        "## pass@k on the held-out split",
        "",
        f"pass@k from {ks[-1] if ks else '?'} samples per problem at the training temperature (unbiased "
        "estimator), greedy pass@1 from one greedy completion; in %, mean ± standard deviation over seeds "
        "(one value: one seed). The base is measured once.",
        "",
        *passk_table(results, arms),
        "",
    ]
    summary = summary_table(results, arms)
    if summary:
        lines += [
            "In short (pass@1 / pass@k sampled; EMA: POPO's siamese adapter; wall: one run, min-max over "
            "seeds):",
            "",
            *summary,
            "",
        ]
    lines += [
        "## Which runs are measured",
        "",
    ]
    cells, missing = missing_cells(results, arms, seeds)
    lines += cells
    lines += ["", f"Missing: {', '.join(missing)}." if missing else "Every (arm, seed) cell is measured.", ""]
    ema = ema_table(results, arms)
    if ema:
        lines += ["## The EMA adapter", "", "POPO's siamese (EMA) adapter at the end, beside the policy.", ""]
        lines += [*ema, ""]
    lines += [
        "## Diagnostics",
        "",
        "Probe: fixed held-out completions sampled once from the base, scored under the current policy: "
        "mean token entropy along them, and mean token log-prob of the wrong ones (POPO never trains on "
        "them: if the implicit negative gradient is real, it falls) and of the right ones. Sequences with "
        "gradient: nonzero POPO weight (the positives) or nonzero GRPO advantage. Seconds: the step "
        "record's own phases; the study's probe and evaluations are extra.",
        "",
        *diagnostics_table(results, arms),
        "",
    ]
    figures = render_figures(results, arms, prefix, order)
    if figures:
        lines += ["## Figures", "", "Bands: mean ± one standard deviation over seeds.", ""]
        lines += [f"![{title}]({path.name})\n" for title, path in figures]
    return "\n".join(lines)


def _band(ax, x, runs_values: list[list[float]], label: str, color, style: str = "-") -> None:
    width = min(len(values) for values in runs_values)
    if width == 0:
        return
    columns = [[values[i] for values in runs_values if values[i] is not None] for i in range(width)]
    keep = [i for i in range(width) if columns[i]]
    means = [statistics.mean(columns[i]) for i in keep]
    stds = [statistics.stdev(columns[i]) if len(columns[i]) > 1 else 0.0 for i in keep]
    xs = [x[i] for i in keep]
    ax.plot(xs, means, style, marker="o", markersize=3, label=label, color=color)
    if len(runs_values) > 1:
        ax.fill_between(
            xs,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            color=color,
            alpha=0.2,
        )


def render_figures(results: dict, arms: list[str], prefix: Path, order: list[str]) -> list[tuple[str, Path]]:
    """The PNG figures; each arm keeps its colour (its place in `order`) from report to report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(order)}
    trained = [arm for arm in arms if arm != "base" and any(r.get("steps") for r in _arm_runs(results, arm))]
    base = find_run(results, "base", None)
    figures = []
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, fig) -> Path:
        """Grid and legend on every panel, then PREFIX-name.png."""
        for ax in fig.axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        path = prefix.parent / f"{prefix.name}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    if trained:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for arm in trained:
            runs = [r for r in _arm_runs(results, arm) if r.get("steps")]
            steps = [s["step"] for s in runs[0]["steps"]]
            _band(left, steps, [[s["reward_mean"] for s in r["steps"]] for r in runs], arm, colors[arm])
            _band(right, runs[0]["eval_steps"], [r["heldout_pass1"] for r in runs], arm, colors[arm])
        if base is not None:
            right.axhline(base["greedy"]["pass@1"], color="gray", linestyle="--", label="base")
        left.set(xlabel="step", ylabel="train reward (mean over rollouts)", title="Train reward")
        right.set(xlabel="step", ylabel="greedy pass@1", title="Held-out greedy pass@1")
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figures.append(("train reward and held-out pass@1 by step", save("curves", fig)))

    with_passk = [arm for arm in arms if any("passk" in r for r in _arm_runs(results, arm))]
    ks = _ks(results)
    if with_passk and ks:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for arm in with_passk:
            runs = [r for r in _arm_runs(results, arm) if "passk" in r]
            style = "--" if arm == "base" else "-"
            color = "gray" if arm == "base" else colors[arm]
            _band(ax, ks, [[r["passk"][f"pass@{k}"] for k in ks] for r in runs], arm, color, style)
            emas = [r["ema"]["passk"] for r in runs if "passk" in r.get("ema", {})]
            if emas:
                _band(ax, ks, [[e[f"pass@{k}"] for k in ks] for e in emas], f"{arm} (EMA)", colors[arm], ":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(xlabel="k", ylabel="pass@k", title="Held-out pass@k (unbiased, from n samples)")
        figures.append(("pass@k against k", save("passk", fig)))

    if trained:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for arm in trained:
            runs = [r for r in _arm_runs(results, arm) if r.get("steps")]
            steps = runs[0]["probe_steps"]
            _band(left, steps, [r["entropy"] for r in runs], arm, colors[arm])
            _band(right, steps, [r["negative_logprob"] for r in runs], arm, colors[arm])
            _band(right, steps, [r["positive_logprob"] for r in runs], "_nolegend_", colors[arm], "--")
        left.set(
            xlabel="step", ylabel="mean token entropy (nats)", title="Entropy on held-out probe completions"
        )
        right.set(
            xlabel="step", ylabel="mean token log-prob", title="Probe log-prob: wrong (solid), right (dashed)"
        )
        for ax in (left, right):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        figures.append(("entropy and the implicit-negative diagnostic by step", save("entropy", fig)))
    return figures


def write_report(prefix: Path, results: dict, arms: list[str], seeds: list[int], order: list[str]) -> str:
    text = render(results, arms, seeds, prefix, order)
    with_suffix(prefix, ".md").write_text(text)
    return text


def with_suffix(prefix: Path, suffix: str) -> Path:
    """PREFIX + suffix (Path.with_suffix would cut a prefix like study-1.5b at its dot)."""
    return prefix.parent / (prefix.name + suffix)
