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
`weights-uniform`, `weights-sequence` (configs/ablations/*.yaml), and `trl-grpo`: TRL's own
GRPOTrainer on the same task, model, LoRA, prompts and budget (num_generations = rollouts_per_prompt,
prompts_per_step prompts per optimizer step, max_completion_length = max_new_tokens, the same
temperature, learning rate, steps, KL beta = grpo_beta, clip epsilon, loss_type "grpo" = popo_lite's
sequence normalisation, reward = popo_lite.core.rewards.score, the same initial LoRA adapter; TRL draws
the prompts with its own sampler, so in another order), evaluated by the same code.
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
The results file and everything rendered from it live in bench/study_results.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.study_results import (  # noqa: E402
    add_run,
    base_verdict,
    command_line,
    device_name,
    find_run,
    load_results,
    with_suffix,
    write_report,
)
from popo_lite.config import FIELD_NAMES, Config, ConfigError, add_config_options, load_config  # noqa: E402
from popo_lite.core.logprobs import completion_stats  # noqa: E402
from popo_lite.core.rewards import score  # noqa: E402
from popo_lite.core.siamese import ema_forward  # noqa: E402
from popo_lite.data.problems import Problem, format_prompt, training_problems  # noqa: E402
from popo_lite.engine.model import load_base, lora_config  # noqa: E402
from popo_lite.engine.rollouts import generate_rollouts  # noqa: E402
from popo_lite.evaluation.benchmarks import EvalSettings, evaluate_problems, load_benchmarks  # noqa: E402
from popo_lite.training.session import seed_everything  # noqa: E402
from popo_lite.training.trainer import prepare, run  # noqa: E402

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


@dataclass(frozen=True)
class Arm:
    kind: str  # "base" (no training), "trainer" (popo_lite's trainer) or "trl" (TRL's GRPOTrainer)
    about: str
    overrides: dict = field(default_factory=dict)  # config keys on top of the study's
    recipe: str | None = None  # a configs/ablations/*.yaml applied on top of the study's config


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
    "trl-grpo": Arm("trl", "TRL's GRPOTrainer", {"algo": "grpo"}),
}
GROUPS = {
    "main": ("base", "grpo", "popo", "psr"),
    "ablations": ("no-similarity", "no-ema", "no-entropy", "weights-uniform", "weights-sequence"),
    "all": tuple(ARMS),
}
# Config fields a run sets itself; the rest is the study's and identical across arms.
RUN_FIELDS = ("seed", "run_name", "output_dir", "algo", "log_rollouts", "report_to", "save_every")
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


class StudyError(ValueError):
    """The study's options or its results file are inconsistent; the message says what to do."""


# ---- the study's settings -------------------------------------------------------------------------


@dataclass
class Study:
    values: dict  # the common config (every field), before an arm's overrides
    heldout: list[Problem]
    samples: int  # n for pass@k
    probe_prompts: int
    probe_samples: int
    probe_negatives: int
    eval_batch_size: int
    runs_dir: Path
    results: Path  # prefix: .json, .md, -*.png

    @property
    def eval_every(self) -> int:
        return self.values["eval_every"]

    @property
    def steps(self) -> int:
        return self.values["steps"]

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for k in (2**i for i in range(12)) if k <= self.samples)

    def config(self, arm: str, seed: int) -> Config:
        values = {**self.values, **arm_values(arm), "seed": seed}
        values.update(
            run_name=f"{arm}-seed{seed}",
            output_dir=str(self.runs_dir),
            eval_every=0,  # the study evaluates itself, on its own held-out set and cadence
            log_rollouts=True,  # the gradient-carrying rows are read from rollouts.jsonl
            report_to=[],
        )
        return Config(**values)

    def signature(self, arm: str) -> dict:
        """What a run's numbers depend on besides its seed; a stored run with another signature is stale."""
        common = {k: v for k, v in self.values.items() if k not in RUN_FIELDS}
        if ARMS[arm].kind == "base":
            common = {k: common[k] for k in BASE_FIELDS}
        else:
            common.update(arm_values(arm))
        study = {
            "heldout_problems": len(self.heldout),
            "samples": self.samples,
            "probe": [self.probe_prompts, self.probe_samples, self.probe_negatives, PROBE_SEED],
        }
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


# ---- measurements -------------------------------------------------------------------------------


def greedy_eval(model, tokenizer, study: Study) -> dict:
    result = evaluate_problems(model, tokenizer, study.heldout, study.greedy_settings(), name="heldout")
    return {
        "pass@1": result["score"],
        "correct": result["correct"],
        "problems": result["problems"],
        "cut_rate": result["cut_rate"],
        "mean_tokens": result["mean_tokens"],
    }


def sampled_eval(model, tokenizer, study: Study) -> dict:
    """pass@k for k = 1, 2, 4, ..., n from n samples per held-out problem at the training temperature."""
    result = evaluate_problems(model, tokenizer, study.heldout, study.sampled_settings(), name="heldout")
    return {
        "samples": study.samples,
        **{f"pass@{k}": result[f"pass@{k}"] for k in study.ks},
        "num_correct": [record["num_correct"] for record in result["records"]],
        "cut_rate": result["cut_rate"],
        "mean_tokens": result["mean_tokens"],
    }


def _cuda_devices(model) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


def build_probe(model, tokenizer, study: Study, config: Config) -> dict:
    """Completions sampled once from the base on the first held-out prompts, kept as token ids."""
    problems = study.heldout[: study.probe_prompts]
    prompts = [format_prompt(p.problem, config.prompt_template, tokenizer) for p in problems]
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        torch.manual_seed(PROBE_SEED)
        rollouts = generate_rollouts(
            model,
            tokenizer,
            prompts,
            study.probe_samples,
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            config.max_prompt_tokens,
            config.generation_batch_size,
        )
    rows, negatives = [], 0
    for i, text in enumerate(rollouts.texts):
        problem = problems[i // study.probe_samples]
        value, _ = score(text, problem.answer)
        length = int(rollouts.completion_mask[i].sum())
        negative = value == 0 and negatives < study.probe_negatives and length > 0
        negatives += negative
        rows.append(
            {
                "problem": problem.id,
                "reward": value,
                "negative": negative,
                "prompt_ids": rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()].tolist(),
                "completion_ids": rollouts.completion_ids[i, :length].tolist(),
                "completion": text,
            }
        )
    return {"rows": rows, "negatives": negatives, "positives": sum(row["reward"] > 0 for row in rows)}


def _probe_batch(
    rows: list[dict], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """input_ids, attention_mask, prompt width, completion mask: prompts left-, completions right-padded."""
    width = max(len(row["prompt_ids"]) for row in rows)
    length = max(len(row["completion_ids"]) for row in rows)
    ids = torch.full((len(rows), width + length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width + length), dtype=torch.long)
    for i, row in enumerate(rows):
        prompt, completion = row["prompt_ids"], row["completion_ids"]
        ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        ids[i, width : width + len(completion)] = torch.tensor(completion)
        mask[i, width - len(prompt) : width + len(completion)] = 1
    return ids.to(device), mask.to(device), width, mask[:, width:].to(device)


@torch.no_grad()
def probe_scores(model, probe: dict, pad_id: int, config: Config) -> dict:
    """Under the model's active adapter, along the probe's fixed completions: the mean token entropy of
    the next-token distribution (all rows), the mean token log-prob of the wrong rows and of the right ones
    (each a mean over rows of the row's mean over its tokens), at the training temperature."""
    rows = [row for row in probe["rows"] if row["completion_ids"]]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    entropy_sum, tokens, negative, positive = 0.0, 0.0, [], []
    try:
        for first in range(0, len(rows), config.micro_batch_size):
            chunk = rows[first : first + config.micro_batch_size]
            input_ids, attention_mask, width, completion_mask = _probe_batch(chunk, pad_id, device)
            stats = completion_stats(
                model,
                input_ids,
                attention_mask,
                width,
                completion_mask,
                config.temperature,
                with_entropy=True,
            )
            mask = completion_mask.float()
            entropy_sum += float((stats.entropy.float() * mask).sum())
            tokens += float(mask.sum())
            means = ((stats.logprobs.float() * mask).sum(1) / mask.sum(1)).tolist()
            for row, mean in zip(chunk, means, strict=True):
                if row["negative"]:
                    negative.append(mean)
                elif row["reward"] > 0:
                    positive.append(mean)
    finally:
        model.train(was_training)
    return {
        "entropy": entropy_sum / max(tokens, 1.0),
        "negative_logprob": statistics.mean(negative) if negative else None,
        "positive_logprob": statistics.mean(positive) if positive else None,
    }


def _new_result(study: Study, arm: str, seed: int | None, config: Config) -> dict:
    return {
        "arm": arm,
        "seed": seed,
        "about": ARMS[arm].about,
        "signature": study.signature(arm),
        "config": config.to_dict(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_name(),
    }


def _curves_from_base(result: dict, base: dict) -> None:
    """Step 0 of every curve is the base's measurement: the untrained policy (LoRA B = 0) is the base."""
    result["eval_steps"] = [0]
    result["heldout_pass1"] = [base["greedy"]["pass@1"]]
    result["probe_steps"] = [0]
    for key in ("entropy", "negative_logprob", "positive_logprob"):
        result[key] = [base[key][0]]
    result["steps"] = []


def _record_probe(result: dict, step: int, scores: dict) -> None:
    result["probe_steps"].append(step)
    for key, value in scores.items():
        result[key].append(value)


def measure_base(study: Study) -> dict:
    """The base model (no adapter): greedy pass@1, pass@k, the probe and its scores."""
    config = study.config("base", 0)
    result = _new_result(study, "base", None, config)
    started = time.perf_counter()
    seed_everything(0)
    model, tokenizer, _ = load_base(config)
    timings = {"seconds_load": time.perf_counter() - started}
    clock = time.perf_counter()
    greedy = greedy_eval(model, tokenizer, study)
    timings["seconds_greedy"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result["passk"] = sampled_eval(model, tokenizer, study)
    timings["seconds_passk"] = time.perf_counter() - clock
    clock = time.perf_counter()
    probe = build_probe(model, tokenizer, study, config)
    scores = probe_scores(model, probe, tokenizer.pad_token_id, config)
    timings["seconds_probe"] = time.perf_counter() - clock
    result.update(greedy=greedy, eval_steps=[0], heldout_pass1=[greedy["pass@1"]], probe=probe)
    result["probe_steps"] = [0]
    result.update({key: [value] for key, value in scores.items()})
    result.update(timings, wall_seconds=time.perf_counter() - started)
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    del model
    _free()
    return result


class RolloutTail:
    """The rows of rollouts.jsonl appended since the last read (the run writes them as each step ends)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path) as handle:
            handle.seek(self.offset)
            lines = handle.readlines()
            self.offset = handle.tell()
        return [json.loads(line) for line in lines if line.strip()]


def _step_entry(record: dict, rows: list[dict]) -> dict:
    entry = {
        key: value
        for key, value in record.items()
        if isinstance(value, (int, float, str)) and key not in ("run_dir", "checkpoint")
    }
    rows = [row for row in rows if row["step"] == record["step"]]
    entry["rollouts"] = len(rows)
    entry["positives"] = sum(row["reward"] > 0 for row in rows)
    entry["gradient_sequences"] = sum(row["weight"] != 0 for row in rows)  # POPO weight / GRPO advantage
    return entry


def _due(study: Study, step: int) -> bool:
    return step == study.steps or (study.eval_every > 0 and step % study.eval_every == 0)


def _measure_step(
    study: Study, result: dict, model, tokenizer, probe: dict, config: Config, step: int
) -> dict:
    """After optimizer step `step`: the probe, and the greedy evaluation when due; returns their seconds."""
    clock = time.perf_counter()
    _record_probe(result, step, probe_scores(model, probe, tokenizer.pad_token_id, config))
    seconds = {"seconds_probe": time.perf_counter() - clock}
    if _due(study, step):
        clock = time.perf_counter()
        greedy = greedy_eval(model, tokenizer, study)
        result["eval_steps"].append(step)
        result["heldout_pass1"].append(greedy["pass@1"])
        result["greedy"] = greedy
        seconds["seconds_eval"] = time.perf_counter() - clock
    return seconds


def _print_step(arm: str, seed: int, entry: dict, result: dict) -> None:
    pass1 = (
        f", held-out pass@1 {result['heldout_pass1'][-1]:.3f}"
        if result["eval_steps"][-1] == entry["step"]
        else ""
    )
    negative = result["negative_logprob"][-1]
    print(
        f"  {arm} seed {seed} step {entry['step']}: reward {entry['reward_mean']:.3f}, "
        f"{entry['gradient_sequences']} sequences with gradient, entropy {result['entropy'][-1]:.3f}, "
        f"negative log-prob {negative if negative is None else round(negative, 4)}{pass1}, "
        f"{entry.get('seconds_step', 0.0):.0f} s",
        flush=True,
    )


def _final_evaluations(study: Study, result: dict, model, tokenizer, config: Config) -> None:
    clock = time.perf_counter()
    result["passk"] = sampled_eval(model, tokenizer, study)
    result["seconds_passk"] = time.perf_counter() - clock
    if config.algo != "popo" or ARMS[result["arm"]].kind != "trainer":
        return
    if config.tau == 0:  # xi <- 0 * xi + 1 * theta after every step: the EMA adapter is the policy
        result["ema"] = {"same_as_policy": True}
        return
    clock = time.perf_counter()
    with torch.no_grad(), ema_forward(model):
        result["ema"] = {
            "greedy": greedy_eval(model, tokenizer, study),
            "passk": sampled_eval(model, tokenizer, study),
        }
    result["seconds_ema_eval"] = time.perf_counter() - clock


def train_arm(study: Study, arm: str, seed: int, base: dict) -> dict:
    """One run of popo_lite's trainer, measured after every step."""
    config = study.config(arm, seed)
    _fresh_run_dir(study.runs_dir / config.run_name)
    result = _new_result(study, arm, seed, config)
    started = time.perf_counter()
    session = prepare(config)
    result["seconds_load"] = time.perf_counter() - started
    result["run_dir"] = str(session.run_dir)
    _curves_from_base(result, base)
    tail = RolloutTail(session.run_dir / "rollouts.jsonl")
    for record in run(session):
        entry = _step_entry(record, tail.read())
        entry.update(
            _measure_step(
                study, result, session.model, session.tokenizer, base["probe"], config, entry["step"]
            )
        )
        result["steps"].append(entry)
        _print_step(arm, seed, entry, result)
    _final_evaluations(study, result, session.model, session.tokenizer, config)
    result["wall_seconds"] = time.perf_counter() - started
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    del session
    _free()
    return result


def trl_policy(config: Config):
    """The base with one LoRA adapter ("default", TRL's), initialised exactly as the trainer's "policy"
    adapter for the same seed (same loader, same random draws; tested): (model, tokenizer, device)."""
    from peft import get_peft_model

    seed_everything(config.seed)  # as session.prepare does before it loads the model
    base_model, tokenizer, device = load_base(config)
    if config.gradient_checkpointing:  # as engine/model.attach_adapters
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base_model.enable_input_require_grads()
    model = get_peft_model(base_model, lora_config(config))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # fp32 adapters, as popo_lite's (engine/model.py)
    return model, tokenizer, device


def trl_dataset(problems: list[Problem], config: Config, tokenizer):
    """The training problems as TRL's prompt dataset, with the gold answer and question for the reward."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": format_prompt(p.problem, config.prompt_template, tokenizer),
                "answer": p.answer,
                "question": p.problem,
            }
            for p in problems
        ]
    )


def trl_arguments(config: Config, run_dir: Path, seed: int, model, device: torch.device):
    """TRL's GRPOConfig for popo_lite's GRPO step: the same rollouts, loss, KL, learning rate and schedule."""
    from trl import GRPOConfig

    rows = config.rollouts_per_step
    per_device = (
        config.micro_batch_size if rows % config.micro_batch_size == 0 else config.rollouts_per_prompt
    )
    dtype = next(p for n, p in model.named_parameters() if "lora_" not in n and p.is_floating_point()).dtype
    warmup = math.ceil(config.warmup_ratio * config.steps)
    schedule = (
        "cosine" if config.lr_schedule == "cosine" else ("constant_with_warmup" if warmup else "constant")
    )
    return GRPOConfig(
        output_dir=str(run_dir),
        max_steps=config.steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type=schedule,
        warmup_steps=warmup,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=rows // per_device,
        generation_batch_size=rows,  # one generation batch per optimizer step: on-policy
        num_generations=config.rollouts_per_prompt,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        beta=config.grpo_beta,
        epsilon=config.grpo_clip_eps,
        loss_type="grpo" if config.grpo_normalization == "sequence" else "dapo",
        scale_rewards="group",
        # TRL's default multiplies k3 by the ratio: 1 in value, but it adds beta * k3 * grad(logp) to the
        # gradient; off, TRL's loss has popo_lite's GRPO gradient (tests/test_reference.py checks both).
        use_bias_correction_kl=False,
        num_iterations=1,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def trl_reward(rewards: list[tuple[float, int]]):
    """The trainer's reward as a TRL reward function; appends (mean, positives) of each call to `rewards`."""

    def correct(completions, answer, question, **kwargs):  # the question too, as the trainer's reward
        values = [
            score(text, gold, question=asked)[0]
            for text, gold, asked in zip(completions, answer, question, strict=True)
        ]
        rewards.append((sum(values) / len(values), sum(value > 0 for value in values)))
        return values

    return correct


def train_trl(study: Study, arm: str, seed: int, base: dict) -> dict:
    """The same budget with TRL's GRPOTrainer, measured by the same code through a callback."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    config = study.config(arm, seed)
    run_dir = study.runs_dir / config.run_name
    _fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.yaml")
    result = _new_result(study, arm, seed, config)
    started = time.perf_counter()
    model, tokenizer, device = trl_policy(config)
    dataset = trl_dataset(training_problems(config), config, tokenizer)
    rows = config.rollouts_per_step
    args = trl_arguments(config, run_dir, seed, model, device)
    rewards: list[tuple[float, int]] = []  # (mean, positives) per call = per step
    correct = trl_reward(rewards)

    class Timed(GRPOTrainer):
        """Times generation + scoring and counts the rows with a nonzero advantage."""

        study_seconds = 0.0
        study_rows = 0

        def _generate_and_score_completions(self, inputs):
            clock = time.perf_counter()
            batch = super()._generate_and_score_completions(inputs)
            self.study_seconds += time.perf_counter() - clock
            self.study_rows += int((batch["advantages"] != 0).sum())
            return batch

    class Measure(TrainerCallback):
        def __init__(self) -> None:
            self.trainer, self.started = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.trainer.study_seconds, self.trainer.study_rows = 0.0, 0

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.started
            trainer, step = self.trainer, state.global_step
            mean, positives = rewards[-1]
            entry = {
                "step": step,
                "algo": "grpo",
                "reward_mean": mean,
                "rollouts": rows,
                "positives": positives,
                "gradient_sequences": trainer.study_rows,
                "seconds_step": seconds,
                "seconds_generate": trainer.study_seconds,  # generation, reward and reference log-probs
                "seconds_update": seconds - trainer.study_seconds,
            }
            entry.update(_measure_step(study, result, trainer.model, tokenizer, base["probe"], config, step))
            result["steps"].append(entry)
            _print_step(arm, seed, entry, result)

    measure = Measure()
    trainer = Timed(
        model=model,
        reward_funcs=correct,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[measure],
    )
    measure.trainer = trainer
    trainer.remove_callback(PrinterCallback)  # the study prints its own line per step
    result["seconds_load"] = time.perf_counter() - started
    result["run_dir"] = str(run_dir)
    _curves_from_base(result, base)
    trainer.train()
    logged = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    names = {"loss": "loss", "kl": "kl", "grad_norm": "grad_norm", "learning_rate": "lr"}
    names |= {"frac_reward_zero_std": "frac_reward_zero_std", "completions/mean_length": "completion_length"}
    for entry in result["steps"]:
        log = logged.get(entry["step"], {})
        entry.update({ours: log[theirs] for theirs, ours in names.items() if log.get(theirs) is not None})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in result["steps"]))
    _final_evaluations(study, result, trainer.model, tokenizer, config)
    result["wall_seconds"] = time.perf_counter() - started
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    del trainer, model
    _free()
    return result


def _fresh_run_dir(run_dir: Path) -> None:
    """A run directory left by a run that did not finish (it is not in the JSON): start it again."""
    if run_dir.exists():
        print(f"  removing {run_dir}: left by a run that did not finish", flush=True)
        shutil.rmtree(run_dir)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the results file ---------------------------------------------------------------------------


def check_signatures(results: dict, study: Study, path: Path) -> None:
    """Refuse to mix runs measured with other settings into this study."""
    for stored in results["runs"]:
        if stored["arm"] not in ARMS:
            continue
        expected = study.signature(stored["arm"])
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

BUDGET = {  # study options that are config fields: None = from --config, or the CPU default
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
    study.add_argument("--arms", nargs="+", default=["main"], help=f"arms, or groups {list(GROUPS)}")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument("--config", help="a recipe to start from instead of the CPU defaults")
    study.add_argument(
        "--task", help="training set and held-out set: a bundled synthetic name or a local file"
    )
    study.add_argument("--heldout_benchmark", help="held-out set (default: the task's test split)")
    from_file = "default: the --config file's, else"
    study.add_argument(
        "--heldout", type=int, help=f"held-out problems ({from_file} {CPU_DEFAULTS['eval_limit']})"
    )
    for name, (kind, help_text) in BUDGET.items():
        study.add_argument(f"--{name}", type=kind, help=f"{help_text} ({from_file} {CPU_DEFAULTS[name]})")
    options = [
        ("--samples", 16, "samples per held-out problem for pass@k"),
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
    study.add_argument("--report", action="store_true", help="only render the Markdown and figures")
    study.add_argument("--results", default=str(ROOT / "bench" / "results" / "study"), help="output prefix")
    study.add_argument("--runs_dir", default=str(ROOT / "bench" / "runs" / "study"), help="runs' folders")
    for name in ("seed", "run_name", "output_dir", "algo"):
        study.add_argument(f"--{name}", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
    return described


def build_study(args: argparse.Namespace) -> Study:
    for name in ("seed", "run_name", "output_dir", "algo"):
        if hasattr(args, name):
            raise StudyError(f"--{name} is set by the study for each run (use --seeds / --arms / --runs_dir)")
    base = load_config(args.config, None if args.config else CPU_DEFAULTS)
    values = base.to_dict()
    if args.task:
        values.update(dataset=args.task, eval_benchmarks=[args.task])
    config_options = {k: v for k, v in vars(args).items() if k in FIELD_NAMES and k not in BUDGET}
    values.update(config_options)
    if args.heldout_benchmark:
        values["eval_benchmarks"] = [args.heldout_benchmark]
    if args.heldout is not None:
        values["eval_limit"] = args.heldout
    values.update({k: getattr(args, k) for k in BUDGET if getattr(args, k) is not None})
    Config(**values)  # a bad value stops here, naming the field
    if not values["eval_benchmarks"]:
        raise StudyError("no held-out set: give --heldout_benchmark or eval_benchmarks in the --config file")
    name = values["eval_benchmarks"][0]
    heldout = load_benchmarks(
        [name],
        limit=values["eval_limit"],
        problem_field=values["problem_field"],
        answer_field=values["answer_field"],
    )[name]
    if args.samples < 1:
        raise StudyError("--samples must be >= 1")
    return Study(
        values=values,
        heldout=heldout,
        samples=args.samples,
        probe_prompts=args.probe_prompts,
        probe_samples=args.probe_samples,
        probe_negatives=args.probe_negatives,
        eval_batch_size=args.eval_batch_size,
        runs_dir=Path(args.runs_dir),
        results=Path(args.results),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        study = build_study(args)
        arms = expand_arms(args.arms)
    except (StudyError, ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = with_suffix(study.results, ".json")
    results = load_results(path)
    try:
        check_signatures(results, study, path)
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.measure_base:
        arms = ["base"]
    if not args.report:
        todo = [("base", None)] if find_run(results, "base", None) is None else []
        todo += [
            (arm, seed)
            for seed in args.seeds
            for arm in arms
            if arm != "base" and find_run(results, arm, seed) is None
        ]
        skipped = (len(arms) - ("base" in arms)) * len(args.seeds) + 1 - len(todo)
        print(f"study: {len(todo)} runs to do, {skipped} already in {path}", flush=True)
        for number, (arm, seed) in enumerate(todo, 1):
            print(f"[{number}/{len(todo)}] {arm}" + ("" if seed is None else f" seed {seed}"), flush=True)
            base = find_run(results, "base", None)
            if arm == "base":
                outcome = measure_base(study)
            elif ARMS[arm].kind == "trl":
                outcome = train_trl(study, arm, seed, base)
            else:
                outcome = train_arm(study, arm, seed, base)
            add_run(path, results, outcome, list(ARMS))
            write_report(study.results, results, arms, args.seeds, list(ARMS))
    if args.measure_base:
        print(base_verdict(find_run(results, "base", None)))
    text = write_report(study.results, results, arms, args.seeds, list(ARMS))
    if not args.measure_base:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
