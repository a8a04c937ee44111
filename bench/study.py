"""Does POPO work? POPO against GRPO against plain positive-only training (PSR), in miniature.

    python bench/study.py --measure_base                   # the base model on the held-out split only
    python bench/study.py --measure_base --task arithmetic --results bench/results/study-arithmetic
    python bench/study.py                                  # base, grpo, popo, psr x seeds 0 1 2 (resumable)
    python bench/study.py --arms popo no-ema --seeds 0     # any subset of (arm, seed)
    python bench/study.py --arms ablations trl-grpo        # the POPO ablations and TRL's GRPOTrainer
    python bench/study.py --report --arms all              # re-render study.md and the figures only
    python bench/study.py --config configs/study-qwen2.5-math-1.5b.yaml --results bench/results/study-1.5b

One resumable command. Each (arm, seed) is one run; a run already in the results JSON (measured with
the same settings) is skipped, and each finished run is written to the JSON at once, so a killed study
loses at most the run in progress. After every run the Markdown (the PSR paper's pass@k table, a table
of which (arm, seed) cells are missing, diagnostics) and the PNG figures are rendered again.

Arms, identical except for the objective (same model, LoRA, learning rate, rollout budget, prompts,
seeds): `base` (no training), `grpo`, `popo` (defaults), `psr` (plain positive-only, PSR/RAFT-style:
configs/ablations/positive-only.yaml), the POPO ablations `no-similarity`, `no-ema`, `no-entropy`,
`weights-uniform`, `weights-sequence`, `nll-step`, `all-off` (PSR's objective, run at POPO's rate in the
ablations mode; configs/ablations/*.yaml), `psr-rate` (POPO's objective at PSR's rate), and `trl-grpo`:
TRL's own GRPOTrainer on the same task, model, LoRA, prompts and budget (num_generations =
rollouts_per_prompt, prompts_per_step prompts per optimizer step, max_completion_length =
max_new_tokens, the same temperature, learning rate, steps, KL beta = grpo_beta, clip epsilon, loss_type
"grpo" = popo_lite's sequence normalisation, reward = popo_lite.core.rewards.score, the same initial
LoRA adapter; TRL draws the prompts with its own sampler, so in another order), evaluated by the same
code.
`--arms main` = base grpo popo psr, `ablations`, `all`.

Measured per run: held-out greedy pass@1 at step 0, every `--eval_every` steps and at the end (step 0
is the base's measurement: the LoRA B matrices start at zero, so the untrained policy IS the base);
pass@k for k = 1, 2, 4, ..., `--samples` at the end from `--samples` samples per held-out problem at the
training temperature (the unbiased estimator of popo_lite/evaluation/passk.py); after every step a
"probe": a fixed set of held-out completions sampled once from the base (`--probe_prompts` held-out
prompts x `--probe_samples` samples, seed 12345), scored under the current policy: the mean token
entropy of the policy's next-token distribution along them, and the mean token log-prob of its WRONG
ones (the implicit-negative diagnostic of docs/algorithm.md section 5.3, as bench/learning.py) and of its
right ones; for POPO arms with tau > 0 the EMA adapter's greedy pass@1 and pass@k at the end beside the
policy's; per step the train reward, the sequences that carried gradient (nonzero POPO weight = the
positives; nonzero GRPO advantage), and seconds per step and per phase (seconds_* of the step record,
plus the study's own probe and evaluation time).

Task: the bundled synthetic `two_digit_sums` (a, b in 10..99, held out by operand: no held-out problem
shares an operand with training). `--task` picks another bundled set (`arithmetic`, `digit_sums`: their
held-out split is the test split) or a local .jsonl/.json/.parquet file (with --problem_field and
--answer_field; a file is its own held-out set unless --heldout_benchmark names another, so it is then
NOT held out). `--measure_base` measures only the base (greedy pass@1, pass@k from `--samples` samples)
and says whether the task meets the study's target: greedy pass@1 between 5 and 30 %, and
pass@16 at least twice pass@1 (room to learn, and something for pass@k to show).

Every popo_lite config field is also an option (`--model`, `--qlora`, `--learning_rate`, ...); `--config
FILE` starts from a recipe instead of the CPU defaults below; there `eval_benchmarks[0]` is the held-out
set, `eval_limit` the held-out problem count and `eval_every` the evaluation cadence.

Default budget (2-core CPU, the embedded SmolLM2-135M-Instruct, fp32 LoRA r 16): 8 steps of 8 prompts
x 8 rollouts, 32 new tokens, learning rate 2e-4, temperature 0.7; 32 held-out problems, greedy pass@1 at
steps 0, 4, 8, pass@k from 16 samples, a 16 x 4 probe. Estimate, not measured for this script: a step
takes 80-100 s on a quiet 2-core machine (bench/results/default_run.md: the default run's first two
steps took 103 s and 102 s, the second with 22 s of the KL monitor, which the study turns off; its later
steps took 190-435 s while other jobs shared the cores), the probe (one forward of 64 rows) about 10 s
a step, a greedy evaluation of 32 problems about 40 s, pass@16 (512 samples) 1-3 min, the EMA's
evaluation another 2-3 min on the `popo` arm, the base measurement about 4 min once. So a run takes
15-19 min and the three main arms x 3 seeds (+ base) about 2.5 hours (2.3-2.9 h) on a quiet machine;
a loaded one can take twice that: then `--steps 6`, `--heldout 24` or fewer seeds.

Output: --results PREFIX (default bench/results/study): PREFIX.json, PREFIX.md, PREFIX-curves.png (train
reward and held-out pass@1 by step), PREFIX-passk.png (pass@k against k, log scale), PREFIX-entropy.png
(probe entropy and the implicit-negative diagnostic by step). Bands are mean +- one standard deviation
over seeds. The runs' own directories go under --runs_dir (default bench/runs/study).

The modes of the fair study (`--mode`; each cell is (arm, learning rate, seed), resumable, and written to the
JSON as soon as it finishes; two lanes with disjoint cells can share one JSON):

    python bench/study.py --mode sweep --measure_base           # once, before the lanes
    python bench/study.py --mode sweep --seeds 0                # lane 1: grpo popo psr x 5 rates, seed 0
    python bench/study.py --mode sweep --seeds 1                # lane 2: the same, seed 1
    python bench/study_tables.py --chosen                       # the rates the sweep chose
    python bench/study.py --mode confirm --seeds 0 1 2          # each method at its chosen rate
    python bench/study.py --mode ablations --seeds 0 1 2        # POPO's ablations at POPO's rate
    python bench/study_tables.py                                # sweep.md and confirm.md from the JSON

- sweep: grpo, popo, psr at 5e-5, 1e-4, 2e-4, 4e-4, 8e-4 (`--rates`), seeds 0 1, 24 steps; scored by
  greedy pass@1 on the VALIDATION half of two_digit_sums' held-out sums (study_arms.split_heldout); no
  pass@k. The rate is picked by bench/study_selection.py's SELECTION_RULE.
- confirm: each method at its chosen rate (read from --sweep_results), seeds 0-4, 32 steps, greedy
  pass@1 and pass@k (k up to 64) on the REPORTED half only, which the sweep never evaluates.
- ablations: the POPO ablations, `nll-step` and `all-off` (PSR's objective) at POPO's chosen rate, and
  `psr-rate` (POPO at PSR's chosen rate: with all-off, both objectives at both rates), seeds 0-2, into
  confirm's JSON
  (its POPO seeds are the reference, run here too where confirm has not yet; the settings must match,
  which the signature check enforces).
In these modes POPO's tau is 0.5 ** (2 / steps) (the EMA's half-life is half the run), the EMA adapter
is measured only where it moved (study_arms.ema_moved), and the probe runs every `--probe_every` steps.

The arms and settings live in bench/study_arms.py, one cell's run in bench/study_runs.py (TRL's arm in
bench/study_trl.py), the results file and the study's report in bench/study_results.py, the rate rule
and the paired intervals in bench/study_selection.py, the sweep and confirm tables in
bench/study_tables.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.study_arms import (  # noqa: E402
    ARMS,
    CPU_DEFAULTS,
    GROUPS,
    MODES,
    SWEEP_RATES,
    Study,
    StudyError,
    expand_arms,
    split_heldout,
)
from bench.study_figures import METHODS  # noqa: E402
from bench.study_results import (  # noqa: E402
    add_grid,
    add_run,
    base_verdict,
    find_run,
    load_results,
    with_suffix,
    write_report,
)
from bench.study_runs import measure_base, train_arm  # noqa: E402
from bench.study_selection import chosen_rates, sweep_grid  # noqa: E402
from bench.study_tables import write_tables  # noqa: E402
from bench.study_trl import train_trl, trl_arguments, trl_dataset, trl_policy, trl_reward  # noqa: E402
from popo_lite.config import FIELD_NAMES, Config, ConfigError, add_config_options, load_config  # noqa: E402
from popo_lite.evaluation.benchmarks import load_benchmarks  # noqa: E402

# what tests and bench/step_cost.py import from here
__all__ = [
    "ARMS",
    "CPU_DEFAULTS",
    "StudyError",
    "add_run",
    "expand_arms",
    "load_results",
    "main",
    "parser",
    "trl_arguments",
    "trl_dataset",
    "trl_policy",
    "trl_reward",
]
MIN_REPORTED = 96  # at least 96 reported held-out problems: one is about 1 point


def check_signatures(results: dict, study: Study, path: Path) -> None:
    """Refuse to mix cells measured with other settings into this study."""
    for stored in results["runs"]:
        if stored["arm"] not in ARMS:
            continue
        expected = study.signature(stored["arm"], stored.get("learning_rate"))
        if stored.get("signature") != expected:
            old = stored.get("signature") or {}
            changed = sorted(
                k
                for k in set(old) | set(expected)
                if (k in old, old.get(k)) != (k in expected, expected.get(k))
            )
            raise StudyError(
                f"{path} holds {stored['arm']} seed {stored['seed']} measured with other settings "
                f"(differing: {', '.join(changed)}); give this study its own --results PREFIX, or "
                "delete that file"
            )


# ---- the command line ---------------------------------------------------------------------------

BUDGET = {  # study options that are config fields: None = the mode's, the --config file's or the CPU default
    "steps": (int, "optimizer steps per run"),
    "max_new_tokens": (int, "longest completion, in tokens (training and evaluation)"),
    "prompts_per_step": (int, "prompts per optimizer step"),
    "rollouts_per_prompt": (int, "completions per prompt (the group)"),
    "eval_every": (int, "held-out greedy pass@1 every N steps (and at 0 and the end)"),
}


def parser() -> argparse.ArgumentParser:
    described = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve"
    )
    add_config_options(described)  # every config field; the study's own options below replace some
    study = described.add_argument_group("study")
    study.add_argument(
        "--mode",
        choices=list(MODES),
        default="study",
        help="; ".join(f"{k}: {m.about}" for k, m in MODES.items()),
    )
    study.add_argument("--arms", nargs="+", help=f"arms, or groups {list(GROUPS)} (default: the mode's)")
    study.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the mode's)")
    study.add_argument(
        "--rates",
        type=float,
        nargs="+",
        help=f"sweep: learning rates (default {' '.join(map(str, SWEEP_RATES))})",
    )
    study.add_argument(
        "--sweep_results",
        default=str(ROOT / "bench" / "results" / "sweep.json"),
        help="confirm, ablations: the sweep whose chosen rates they run at",
    )
    study.add_argument("--config", help="a recipe to start from instead of the CPU defaults")
    study.add_argument(
        "--task", help="training set and held-out set: a bundled synthetic name or a local file"
    )
    study.add_argument("--heldout_benchmark", help="held-out set (default: the task's test split)")
    from_file = "default: the --config file's, else"
    study.add_argument(
        "--heldout",
        type=int,
        help=f"held-out problems ({from_file} {CPU_DEFAULTS['eval_limit']}; sweep, confirm: all of the part)",
    )
    for name, (kind, help_text) in BUDGET.items():
        study.add_argument(f"--{name}", type=kind, help=f"{help_text} ({from_file} {CPU_DEFAULTS[name]})")
    study.add_argument(
        "--samples", type=int, help="samples per held-out problem for pass@k, 0: none (mode's)"
    )
    study.add_argument("--probe_every", type=int, help="probe every N steps and at the end (default: mode's)")
    study.add_argument(
        "--ema_passk", action="store_true", help="the EMA adapter's pass@k too (default: greedy pass@1 only)"
    )
    options = [
        ("--probe_prompts", 16, "held-out prompts of the probe"),
        ("--probe_samples", 4, "base samples per probe prompt"),
        ("--probe_negatives", 32, "wrong probe completions kept, at most"),
        ("--eval_batch_size", 256, "completions generated at once in evaluation"),
    ]
    for option, default, help_text in options:
        study.add_argument(option, type=int, default=default, help=f"{help_text} (default {default})")
    study.add_argument(
        "--measure_base", action="store_true", help="measure the base only; does the task fit?"
    )
    study.add_argument("--report", action="store_true", help="only render the Markdown (and figures)")
    study.add_argument("--results", help="output prefix (default bench/results/<the mode's name>)")
    study.add_argument("--runs_dir", help="runs' folders (default bench/runs/<mode>)")
    for name in ("seed", "run_name", "output_dir", "algo"):
        study.add_argument(f"--{name}", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    return described


def heldout_part(problems: list, part: str, limit: int | None) -> list:
    """The mode's held-out problems: the first `limit`, or the first `limit` of one half."""
    if part != "first":
        validation, reported = split_heldout(problems)
        problems = validation if part == "validation" else reported
    return problems[:limit] if limit is not None else problems


def build_study(args: argparse.Namespace) -> Study:
    for name in ("seed", "run_name", "output_dir", "algo"):
        if hasattr(args, name):
            raise StudyError(f"--{name} is set by the study for each run (use --seeds / --arms / --runs_dir)")
    mode = MODES[args.mode]
    base = load_config(args.config, None if args.config else CPU_DEFAULTS)
    values = base.to_dict()
    if args.task:
        values.update(dataset=args.task, eval_benchmarks=[args.task])
    config_options = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and k not in BUDGET}
    values.update(config_options)
    if args.heldout_benchmark:
        values["eval_benchmarks"] = [args.heldout_benchmark]
    if mode.part != "first":
        values["eval_limit"] = None  # the whole half, unless --heldout
    if args.heldout is not None:
        values["eval_limit"] = args.heldout
    values.update(
        {k: v for k, v in (("steps", mode.steps), ("eval_every", mode.eval_every)) if v is not None}
    )
    values.update({k: getattr(args, k) for k in BUDGET if getattr(args, k) is not None})
    Config(**values)  # a bad value stops here, naming the field
    if not values["eval_benchmarks"]:
        raise StudyError("no held-out set: give --heldout_benchmark or eval_benchmarks in the --config file")
    name = values["eval_benchmarks"][0]
    problems = load_benchmarks(
        [name],
        limit=values["eval_limit"] if mode.part == "first" else None,
        problem_field=values["problem_field"],
        answer_field=values["answer_field"],
    )[name]
    heldout = heldout_part(problems, mode.part, values["eval_limit"])
    samples = mode.samples if args.samples is None else args.samples
    if samples < 0 or (samples == 0 and args.mode == "study"):
        raise StudyError("--samples must be >= 1 (>= 0 in the sweep)")
    if mode.part == "reported" and len(heldout) < MIN_REPORTED:
        print(f"warning: {len(heldout)} reported held-out problems, fewer than {MIN_REPORTED}", flush=True)
    prefix = Path(args.results) if args.results else ROOT / "bench" / "results" / mode.results
    return Study(
        values=values,
        heldout=heldout,
        samples=samples,
        probe_prompts=args.probe_prompts,
        probe_samples=args.probe_samples,
        probe_negatives=args.probe_negatives,
        eval_batch_size=args.eval_batch_size,
        runs_dir=Path(args.runs_dir) if args.runs_dir else ROOT / "bench" / "runs" / args.mode,
        results=prefix,
        mode=args.mode,
        part=mode.part,
        half_life=mode.half_life_tau,
        probe_every=args.probe_every or mode.probe_every,
        ema_passk=mode.ema_passk or args.ema_passk,
    )


def cell_rates(args: argparse.Namespace, arms: list[str]) -> dict[str, list[float | None]]:
    """The learning rates each arm runs at: the study's one (None: the config's), the sweep's grid, or
    the sweep's chosen rate (POPO's for every ablation but psr-rate, which takes PSR's)."""
    if args.mode == "study":
        return {arm: [None] for arm in arms}
    if args.mode == "sweep":
        return {arm: list(args.rates or SWEEP_RATES) for arm in arms}
    sweep = load_results(Path(args.sweep_results))
    rates, seeds = sweep_grid(sweep)
    chosen = chosen_rates(sweep["runs"], list(METHODS), rates, seeds)
    wanted = {arm: (arm if args.mode == "confirm" and arm in METHODS else ARMS[arm].rate_of) for arm in arms}
    missing = sorted({source for source in wanted.values() if chosen.get(source) is None})
    if missing:
        raise StudyError(
            f"{args.sweep_results}: no chosen rate for {', '.join(missing)} (the sweep is not complete "
            f"for it: every rate x seed {seeds} is needed); finish the sweep first"
        )
    return {arm: [chosen[source]] for arm, source in wanted.items()}


def _describe(arm: str, rate: float | None, seed: int | None) -> str:
    return arm + ("" if rate is None else f" lr {rate:g}") + ("" if seed is None else f" seed {seed}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mode = MODES[args.mode]
    try:
        study = build_study(args)
        arms = expand_arms(args.arms or list(mode.arms))
        seeds = args.seeds if args.seeds is not None else list(mode.seeds)
    except (StudyError, ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = with_suffix(study.results, ".json")
    results = load_results(path)
    results.setdefault("mode", args.mode)
    try:
        check_signatures(results, study, path)
        shared = {"confirm", "ablations"}  # one file: the ablations' POPO reference is confirm's POPO
        if results["mode"] != args.mode and not {results["mode"], args.mode} <= shared:
            raise StudyError(f"{path} holds a {results['mode']} study, not a {args.mode} one")
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.measure_base:
        arms = ["base"]
    if not args.report:
        try:
            rates = cell_rates(args, [arm for arm in arms if arm != "base"])
        except StudyError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.mode == "sweep":  # the planned grid: what "complete" means for the rule, whatever lane
            add_grid(path, results, list(args.rates or SWEEP_RATES), sorted({*seeds, *mode.seeds}))
        # rate by rate across the arms, so a lane stopped early leaves every method equally far along
        trained = [arm for arm in arms if arm != "base"]
        width = max((len(rates[arm]) for arm in trained), default=0)
        cells = [
            (arm, rates[arm][i], seed)
            for seed in seeds
            for i in range(width)
            for arm in trained
            if i < len(rates[arm])
        ]
        todo = [("base", None, None), *cells]
        done = [cell for cell in todo if find_run(results, cell[0], cell[2], cell[1]) is not None]
        todo = [cell for cell in todo if cell not in done]
        print(f"study ({args.mode}): {len(todo)} cells to do, {len(done)} already in {path}", flush=True)
        wall: list[float] = []
        for number, (arm, rate, seed) in enumerate(todo, 1):
            results["runs"] = load_results(path)["runs"] or results["runs"]  # what other lanes finished
            if find_run(results, arm, seed, rate) is not None:
                print(
                    f"[{number}/{len(todo)}] {_describe(arm, rate, seed)}: done by another lane", flush=True
                )
                continue
            eta = (
                f"; about {statistics.mean(wall) * (len(todo) - number + 1) / 60:.0f} min left"
                if wall
                else ""
            )
            print(f"[{number}/{len(todo)}] {args.mode}: {_describe(arm, rate, seed)}{eta}", flush=True)
            started = time.perf_counter()
            base = find_run(results, "base", None)
            if arm == "base":
                outcome = measure_base(study)
            elif ARMS[arm].kind == "trl":
                outcome = train_trl(study, arm, seed, base, rate)
            else:
                outcome = train_arm(study, arm, seed, base, rate)
            add_run(path, results, outcome, list(ARMS))
            seconds = time.perf_counter() - started
            wall += [seconds] if arm != "base" else []  # the ETA is in trained cells
            print(f"  {_describe(arm, rate, seed)} finished in {seconds / 60:.1f} min, in {path}", flush=True)
            _render(args, study, results, arms, seeds)
    if args.measure_base:
        print(base_verdict(find_run(results, "base", None)))
    text = _render(args, study, results, arms, seeds)
    if not args.measure_base:
        print(text)
    return 0


def _render(args: argparse.Namespace, study: Study, results: dict, arms: list[str], seeds: list[int]) -> str:
    if args.mode == "study":
        return write_report(study.results, results, arms, seeds, list(ARMS))
    return write_tables(study.results, results)


if __name__ == "__main__":
    sys.exit(main())
