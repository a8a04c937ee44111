"""The study's arms, its modes and its settings: what one cell (arm, learning rate, seed) of
`bench/study.py` trains, on which held-out problems, and what its numbers depend on (its signature).
Nothing here loads a model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from popo_lite.config import FIELD_NAMES, Config
from popo_lite.data.problems import Problem
from popo_lite.evaluation.benchmarks import EvalSettings

ROOT = Path(__file__).resolve().parents[1]
PROBE_SEED = 12345  # the probe's samples, as bench/learning.py draws its negatives

# The CPU study (when no --config is given): the embedded default's sizes on two_digit_sums.
CPU_DEFAULTS = {
    "model": "embedded",
    "dataset": "two_digit_sums",
    "eval_benchmarks": ["two_digit_sums"],  # a synthetic set's test split: held out by operand
    "eval_limit": 32,
    "eval_every": 4,
    "prompt_template": "chat",
    "prompts_per_step": 8,
    "rollouts_per_prompt": 8,
    "max_new_tokens": 32,
    "temperature": 0.7,
    "steps": 8,
    "learning_rate": 2e-4,
    "micro_batch_size": 16,
    "kl_every": 0,  # the KL(policy || EMA) monitor costs ~20 s a step on the CPU and is not a study result
    "save_every": 0,  # one checkpoint, at the end
}


class StudyError(ValueError):
    """The study's options or its results file are inconsistent; the message says what to do."""


@dataclass(frozen=True)
class Arm:
    kind: str  # "base" (no training), "trainer" (popo_lite's trainer) or "trl" (TRL's GRPOTrainer)
    about: str
    overrides: dict = field(default_factory=dict)  # config keys on top of the study's
    recipe: str | None = None  # a configs/ablations/*.yaml applied on top of the study's config
    rate_of: str = "popo"  # confirm and ablations: the method whose chosen rate an ablation runs at


ARMS: dict[str, Arm] = {
    "base": Arm("base", "the base model, no training"),
    "grpo": Arm("trainer", "GRPO (popo_lite)", {"algo": "grpo"}),
    "popo": Arm("trainer", "POPO, defaults", {"algo": "popo"}),
    "psr": Arm(
        "trainer", "plain positive-only (PSR/RAFT-style)", recipe="configs/ablations/positive-only.yaml"
    ),
    "no-similarity": Arm("trainer", "POPO, alpha 0", recipe="configs/ablations/no-similarity.yaml"),
    "no-ema": Arm("trainer", "POPO, tau 0", recipe="configs/ablations/no-ema.yaml"),
    "no-entropy": Arm("trainer", "POPO, beta_entropy 0", recipe="configs/ablations/no-entropy.yaml"),
    "weights-uniform": Arm(
        "trainer", "POPO, uniform weights", recipe="configs/ablations/weights-uniform.yaml"
    ),
    "weights-sequence": Arm(
        "trainer", "POPO, sequence weights", recipe="configs/ablations/weights-sequence.yaml"
    ),
    # the step's positive tokens normalise the NLL instead of each micro-batch's
    "nll-step": Arm(
        "trainer", "POPO, NLL over the step's positive tokens", recipe="configs/ablations/nll-step.yaml"
    ),
    # PSR's objective at POPO's rate: PSR - all-off is the rate's share of PSR - POPO, all-off - POPO
    # the terms' share
    "all-off": Arm(
        "trainer", "POPO, every addition off (PSR's objective)", recipe="configs/ablations/positive-only.yaml"
    ),
    # POPO's objective at PSR's rate: PSR - psr-rate is the terms' share at PSR's rate, psr-rate - POPO
    # the rate's; with all-off, both objectives at both rates
    "psr-rate": Arm("trainer", "POPO at PSR's chosen rate", {"algo": "popo"}, rate_of="psr"),
    "trl-grpo": Arm("trl", "TRL's GRPOTrainer", {"algo": "grpo"}),
}
ABLATIONS = (
    "no-similarity",
    "no-ema",
    "no-entropy",
    "weights-uniform",
    "weights-sequence",
    "nll-step",
    "all-off",
    "psr-rate",
)
GROUPS = {
    "main": ("base", "grpo", "popo", "psr"),
    "ablations": ABLATIONS,
    "all": tuple(ARMS),
}
# Config fields a run sets itself; the rest is the study's and identical across arms.
# Fields a cell's numbers do not depend on: decode_unfinished_rows samples the same tokens, and
# split_by_length gives the same values to float rounding (the sweep's first cells ran without both).
RUN_FIELDS = (
    "seed",
    "run_name",
    "output_dir",
    "algo",
    "log_rollouts",
    "report_to",
    "save_every",
    "decode_unfinished_rows",
    "split_by_length",
)
# What the base measurement depends on (its signature): no training field.
BASE_FIELDS = (
    "model",
    "gguf_file",
    "qlora",
    "dtype",
    "device",
    "trust_remote_code",
    "eval_benchmarks",
    "eval_limit",
    "problem_field",
    "answer_field",
    "prompt_template",
    "max_prompt_tokens",
    "max_new_tokens",
    "eval_max_new_tokens",
    "temperature",
    "top_p",
    "generation_batch_size",  # the probe's samples
)
SWEEP_RATES = (5e-5, 1e-4, 2e-4, 4e-4, 8e-4)


@dataclass(frozen=True)
class Mode:
    """One kind of invocation of bench/study.py and its defaults (every one can be overridden)."""

    about: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    part: str  # the held-out problems evaluated: "first" (the first N), "validation" or "reported"
    samples: int  # n for pass@k; 0 = greedy pass@1 only
    results: str  # bench/results/<results>.json
    steps: int | None = None  # None: the --config file's, or CPU_DEFAULTS
    eval_every: int | None = None
    half_life_tau: bool = False  # POPO's tau from the run's length (half_life_tau), not the config's
    probe_every: int = 1
    # pass@k of the EMA adapter too: as dear as the policy's (pass@64 of 101 problems: 6,464 samples)
    ema_passk: bool = False


MODES = {
    "study": Mode(
        "the 8-step study: every arm at one learning rate",
        ("main",),
        (0, 1, 2),
        "first",
        16,
        "study",
        ema_passk=True,
    ),
    "sweep": Mode(
        "learning-rate sweep per method, scored on the validation part only",
        ("grpo", "popo", "psr"),
        (0, 1),
        "validation",
        0,
        "sweep",
        steps=24,
        eval_every=8,
        half_life_tau=True,
        probe_every=8,
    ),
    "confirm": Mode(
        "each method at its own chosen rate, on the reported part",
        ("grpo", "popo", "psr"),
        (0, 1, 2, 3, 4),
        "reported",
        64,
        "confirm",
        steps=32,
        eval_every=8,
        half_life_tau=True,
        probe_every=8,
    ),
    "ablations": Mode(
        "POPO's ablations at POPO's chosen rate, beside confirm's POPO seeds",
        ("popo", *ABLATIONS),  # the reference: confirm's POPO cells, run here only if confirm has not
        (0, 1, 2),
        "reported",
        64,
        "confirm",  # the same file as confirm: one base, and POPO's seeds 0-2 are the reference
        steps=32,
        eval_every=8,
        half_life_tau=True,
        probe_every=8,
    ),
}


def half_life_tau(steps: int) -> float:
    """tau whose EMA half-life is half the run: tau ** (steps / 2) = 0.5. After the
    run the EMA's start weighs tau ** steps = 0.25, so the EMA adapter has moved."""
    return 0.5 ** (2 / steps)


def ema_moved(tau: float, steps: int) -> bool:
    """Has the EMA adapter moved enough to be worth measuring: its half-life within the run
    (tau ** steps <= 0.5)? tau 0.995 over 8 steps weighs the start 0.96: the EMA is still the base."""
    return 0 < tau < 1 and tau**steps <= 0.5


def pair_key(problem: Problem) -> tuple | str:
    """Problems that are the same sum in either order (a + b, b + a) share a key; else the text."""
    numbers = re.findall(r"\d+", problem.problem)
    return (
        tuple(sorted(int(n) for n in numbers))
        if re.fullmatch(r"What is \d+ \+ \d+\?", problem.problem)
        else problem.problem
    )


def split_heldout(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """(validation, reported): the held-out problems split in two by unordered pair, in their order.

    The sweep picks rates on validation; confirm and ablations report on reported only. Keys are taken
    in order of first appearance; the first keys go to reported until it holds half the problems (so
    both orders of one sum are on one side), the rest to validation. On two_digit_sums' 200 held-out
    sums (already a seeded shuffle, popo_lite/data/problems.py) that is 100 reported, 100 validation.
    """
    keys = list(dict.fromkeys(pair_key(p) for p in problems))
    reported_keys, count = set(), 0
    sizes = {key: sum(pair_key(p) == key for p in problems) for key in keys}
    for key in keys:
        if count >= len(problems) / 2:
            break
        reported_keys.add(key)
        count += sizes[key]
    reported = [p for p in problems if pair_key(p) in reported_keys]
    validation = [p for p in problems if pair_key(p) not in reported_keys]
    return validation, reported


def rate_name(learning_rate: float) -> str:
    return f"{learning_rate:.0e}".replace("e-0", "e-")


@dataclass
class Study:
    values: dict  # the common config (every field), before an arm's overrides
    heldout: list[Problem]  # the problems this mode evaluates (validation, reported or the first N)
    samples: int  # n for pass@k; 0 = none
    probe_prompts: int
    probe_samples: int
    probe_negatives: int
    eval_batch_size: int
    runs_dir: Path
    results: Path  # prefix: .json, .md, -*.png
    mode: str = "study"
    part: str = "first"
    half_life: bool = False  # tau = half_life_tau(steps) for POPO arms with an EMA
    probe_every: int = 1
    ema_passk: bool = True  # the EMA adapter's pass@k beside its greedy pass@1

    @property
    def eval_every(self) -> int:
        return self.values["eval_every"]

    @property
    def steps(self) -> int:
        return self.values["steps"]

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for k in (2**i for i in range(12)) if k <= self.samples)

    def arm_values(self, arm: str, learning_rate: float | None = None) -> dict:
        """The config keys the cell sets on top of the study's: the arm's, its tau, its rate."""
        values = arm_values(arm)
        if ARMS[arm].kind == "base":
            return values
        if self.half_life and values.get("algo") == "popo" and values.get("tau", self.values["tau"]) != 0:
            values["tau"] = half_life_tau(self.steps)
        if learning_rate is not None:
            values["learning_rate"] = learning_rate
        return values

    def config(self, arm: str, seed: int, learning_rate: float | None = None) -> Config:
        values = {**self.values, **self.arm_values(arm, learning_rate), "seed": seed}
        name = (
            f"{arm}-seed{seed}" if learning_rate is None else f"{arm}-lr{rate_name(learning_rate)}-seed{seed}"
        )
        values.update(
            run_name=name,
            output_dir=str(self.runs_dir),
            eval_every=0,  # the study evaluates itself, on its own held-out set and cadence
            log_rollouts=True,  # the gradient-carrying rows are read from rollouts.jsonl
            report_to=[],
        )
        return Config(**values)

    def signature(self, arm: str, learning_rate: float | None = None) -> dict:
        """What a cell's numbers depend on besides its seed; a stored cell with another signature is stale."""
        common = {k: v for k, v in self.values.items() if k not in RUN_FIELDS}
        if ARMS[arm].kind == "base":
            common = {k: common[k] for k in BASE_FIELDS}
        else:
            common.update(self.arm_values(arm, learning_rate))
        study = {
            "heldout_problems": len(self.heldout),
            "samples": self.samples,
            "probe": [self.probe_prompts, self.probe_samples, self.probe_negatives, PROBE_SEED],
        }
        if self.mode != "study":  # the study's signature stays as its committed runs hold it
            study.update(heldout_part=self.part, probe_every=self.probe_every, ema_passk=self.ema_passk)
        return json.loads(json.dumps({**common, **study}))  # as stored: tuples become lists

    def greedy_settings(self) -> EvalSettings:
        return EvalSettings(
            max_new_tokens=self.values["eval_max_new_tokens"] or self.values["max_new_tokens"],
            prompt_template=self.values["prompt_template"],
            batch_size=self.eval_batch_size,
            max_prompt_tokens=self.values["max_prompt_tokens"],
        )

    def sampled_settings(self) -> EvalSettings:
        return EvalSettings(
            n=self.samples,
            temperature=self.values["temperature"],
            top_p=self.values["top_p"],
            max_new_tokens=self.values["eval_max_new_tokens"] or self.values["max_new_tokens"],
            prompt_template=self.values["prompt_template"],
            batch_size=self.eval_batch_size,
            ks=self.ks,
            max_prompt_tokens=self.values["max_prompt_tokens"],
            seed=0,  # the same samples' seeds for every arm: common random numbers
        )


def arm_values(arm: str) -> dict:
    """The config keys an arm sets on top of the study's: its overrides, then its recipe file's keys."""
    spec = ARMS[arm]
    values = {"algo": "popo"} if spec.kind == "trainer" else {}
    values.update(spec.overrides)
    if spec.recipe is not None:
        loaded = yaml.safe_load((ROOT / spec.recipe).read_text()) or {}
        unknown = [key for key in loaded if key not in FIELD_NAMES]
        if unknown:
            raise StudyError(f"{spec.recipe}: unknown config keys {unknown}")
        values.update(loaded)
    return values


def expand_arms(names: list[str]) -> list[str]:
    arms: list[str] = []
    for name in names:
        for arm in GROUPS.get(name, (name,)):
            if arm not in ARMS:
                raise StudyError(f"unknown arm {arm!r}: use {', '.join(ARMS)} or {', '.join(GROUPS)}")
            if arm not in arms:
                arms.append(arm)
    return arms
