"""What a training step costs on this CPU, phase by phase, against the compute floor of its work.

    python bench/step_cost.py                                   # study + default configs, POPO + GRPO
    python bench/step_cost.py --configs study --algos popo --steps 2 --threads 2
    python bench/step_cost.py --paths today --trl_steps 0       # today's code path only, no TRL

For each config (`study`: bench/study.py's CPU_DEFAULTS; `default`: configs/default.yaml) and algo,
each code path of PATHS gets its own session (session.prepare) and the paths take their steps in
turn, today, one-forward, new, today, ..., seeded alike before every step, so machine drift hits both and
both see the same prompts and samples. --warmup steps per path run first, untimed.

Per step it reads the phases' seconds from the trainer's record (`seconds_<phase>`; a key the code
does not write shows as '-'), captures the step's rollouts (token counts from prompt_mask and
completion_mask, positives from rollouts.jsonl) and counts each phase's matmul FLOPs from the model's
shapes (bench/step_flops.py: the floor of a prompt-sharing design). This CPU's dense fp32 GEMM rate is
measured in the same run at the same torch thread count (square and model-shaped products, best of
--repeats, at the start, before each (config, algo) and at the end; the floors use the best rate of
all); floor = FLOPs / rate, and the optimizer's floor is a bare
AdamW step (with gradient clipping) over tensors of the trainable parameters' shapes.

TRL's GRPOTrainer runs --trl_steps steps of the same work (bench/study.py's TRL arm: same model, LoRA,
rollouts, lr, KL beta) on each config, as the peer. Writes bench/results/step_cost-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from machine import cpu_name  # noqa: E402
from step_cost_report import markdown, summarise  # noqa: E402
from step_flops import Batch, step_flops  # noqa: E402
from study_results import command_line  # noqa: E402

from popo_lite.config import FIELD_NAMES, Config, ConfigError, load_config  # noqa: E402
from popo_lite.planning.estimate import ModelShape, lora_targets, shape_from_config  # noqa: E402
from popo_lite.training.session import prepare, seed_everything  # noqa: E402
from popo_lite.training.trainer import step  # noqa: E402

CONFIGS = ("study", "default")
ALGOS = ("popo", "grpo")
# The code paths paired in one run: config overrides on top of each config. Add a variant as a row.
# today: one prompt forward per rollout, checkpointed, every row decoded to the end, one forward per
# micro-batch; one-forward: the defaults but one forward per micro-batch; new: the defaults.
TODAY = {
    "shared_prompts": False,
    "gradient_checkpointing": True,
    "decode_unfinished_rows": False,
    "split_by_length": False,
}
NEW = {  # the defaults
    "shared_prompts": True,
    "gradient_checkpointing": "auto",
    "decode_unfinished_rows": "auto",
    "split_by_length": "auto",
}
PATHS: dict[str, dict] = {
    "today": TODAY,
    "all-rows": {**TODAY, "shared_prompts": True, "gradient_checkpointing": "auto"},
    "one-forward": {**NEW, "split_by_length": False},
    "new": NEW,
}
DEFAULT_PATHS = ("today", "one-forward", "new")
# Set by the bench on every run: no evaluation, no checkpoint before the end, rollouts logged (positives).
RUN_VALUES = {"eval_every": 0, "save_every": 0, "report_to": [], "log_rollouts": True}


def config_values(name: str, changes: dict | None = None) -> dict:
    """A config's fields before the bench's settings: the study's CPU defaults or configs/default.yaml,
    with --set's changes (a smaller budget for a quick check)."""
    if name == "study":
        from study import CPU_DEFAULTS

        return load_config(None, {**CPU_DEFAULTS, **(changes or {})}).to_dict()
    return load_config(ROOT / "configs" / "default.yaml", changes or {}).to_dict()


def path_config(values: dict, overrides: dict, notes: list[str], label: str) -> Config | None:
    """`values` with a path's overrides; a field this code does not have is skipped with a note, and a
    value it rejects leaves the path out (None). Notes are printed and appended to `notes`."""
    known = {key: value for key, value in overrides.items() if key in FIELD_NAMES}
    said = [f"this code has no config field {key!r}; skipped" for key in sorted(set(overrides) - set(known))]
    try:
        config = Config(**{**values, **known})
    except ConfigError as error:
        said.append(f"left out ({error})")
        config = None
    for note in said:
        print(f"[{label}] note: {note}", flush=True)
        notes.append(f"{label}: {note}")
    return config


def gemm_rates(shape: ModelShape, rows: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of fp32 matmuls at this torch thread count, best of `repeats` each: a square one, the
    model's MLP projection and its LM head over `rows` tokens."""
    shapes = {
        "square 2048": (2048, 2048, 2048),
        f"mlp {rows}x{shape.hidden}x{shape.intermediate}": (rows, shape.hidden, shape.intermediate),
        f"head {rows // 4}x{shape.hidden}x{shape.vocab}": (rows // 4, shape.hidden, shape.vocab),
    }
    rates = {}
    for name, (m, k, n) in shapes.items():
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - started)
        rates[name] = 2 * m * k * n / best / 1e9
    return rates


def optimizer_floor(session, repeats: int) -> float:
    """Seconds of clip_grad_norm_ + AdamW.step over bare tensors shaped as the session's trainable ones."""
    shapes = [p.shape for group in session.optimizer.param_groups for p in group["params"]]
    params = [torch.nn.Parameter(torch.randn(s) * 0.01) for s in shapes]
    for param in params:
        param.grad = torch.randn_like(param) * 0.01
    config = session.config
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    best = float("inf")
    for _ in range(repeats + 1):  # the first allocates AdamW's moments
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        best = min(best, time.perf_counter() - started)
    return best


def capture_rollouts(session) -> list:
    """Wrap session.generate so each step's Rollouts are kept (the last one is the step's)."""
    seen, inner = [], session.generate

    def generate(*args, **kwargs):
        seen.append(inner(*args, **kwargs))
        return seen[-1]

    session.generate = generate
    return seen


def step_batch(rollouts, session, record: dict) -> Batch:
    """The step's real token counts; prompts per group (a (B*G, P) or a shared (B, P) prompt_mask)."""
    group = rollouts.group_size
    prompts = rollouts.prompt_mask.sum(1).tolist()
    completions = rollouts.completion_mask.sum(1).tolist()
    if len(prompts) == len(completions):
        prompts = prompts[::group]
    lines = (session.run_dir / "rollouts.jsonl").read_text().splitlines()
    rewards = [row["reward"] for row in map(json.loads, lines) if row["step"] == record["step"]]
    positive = [reward > session.config.reward_threshold for reward in rewards]
    return Batch(tuple(map(int, prompts)), tuple(map(int, completions)), tuple(positive))


def flop_settings(config: Config, record: dict) -> dict:
    names = ("algo", "alpha", "beta_entropy", "entropy_over", "grpo_beta", "micro_batch_size")
    return {name: getattr(config, name) for name in names} | {"kl": "seconds_kl" in record}


def measured_step(session, seen: list, shape: ModelShape, seed: int) -> dict:
    """One step of `session` seeded with `seed`: its record's seconds, token counts and FLOPs."""
    seed_everything(seed)
    started = time.perf_counter()
    record = step(session)
    wall = time.perf_counter() - started
    config, batch = session.config, step_batch(seen[-1], session, record)
    rank, targets = config.lora_rank, lora_targets(config.lora_target_modules)
    settings = flop_settings(config, record)
    return {
        "step": record["step"],
        "seconds": {
            key.removeprefix("seconds_"): value for key, value in record.items() if key.startswith("seconds_")
        }
        | {"wall": wall},
        "prompt_tokens": list(batch.prompt_tokens),
        "completion_tokens": list(batch.completion_tokens),
        "positives": sum(batch.positive),
        "flops": step_flops(shape, rank, targets, batch, settings, shared=True),
        "flops_one_prompt_per_rollout": step_flops(shape, rank, targets, batch, settings, shared=False),
        "reward_mean": record.get("reward_mean"),
    }


def _free() -> None:
    gc.collect()


def run_paths(name: str, algo: str, args: argparse.Namespace, runs_dir: Path, notes: list[str]) -> list[dict]:
    """The paths of one (config, algo), each in its own session, stepping in turn."""
    values = {**config_values(name, args.changes), **RUN_VALUES, "algo": algo, "output_dir": str(runs_dir)}
    values["steps"] = max(values["steps"], args.warmup + args.steps)
    sessions = {}
    for path in args.paths:
        label = f"{name}/{algo}/{path}"
        config = path_config({**values, "run_name": label.replace("/", "-")}, PATHS[path], notes, label)
        if config is None:
            continue
        print(f"[{label}] loading", flush=True)
        session = prepare(config)
        sessions[path] = (session, capture_rollouts(session), optimizer_floor(session, args.repeats))
    if not sessions:
        return []
    shape = shape_from_config(next(iter(sessions.values()))[0].model.get_base_model().config)
    runs = {path: {"config": name, "algo": algo, "path": path, "steps": []} for path in sessions}
    for number in range(args.warmup + args.steps):
        for path, (session, seen, _) in sessions.items():
            entry = measured_step(session, seen, shape, args.seed * 1_000_003 + number)
            label = f"{name}/{algo}/{path}"
            if number < args.warmup:
                print(f"[{label}] warm-up step {number + 1}: {entry['seconds']['step']:.1f} s", flush=True)
                continue
            runs[path]["steps"].append(entry)
            parts = ", ".join(
                f"{key} {value:.1f}" for key, value in entry["seconds"].items() if key not in ("step", "wall")
            )
            print(
                f"[{label}] step {number - args.warmup + 1}/{args.steps}: {entry['seconds']['step']:.1f} s "
                f"({parts}); {entry['positives']} positives",
                flush=True,
            )
    first = next(iter(runs.values()))
    for run in list(runs.values())[1:]:
        for number, (mine, theirs) in enumerate(zip(run["steps"], first["steps"], strict=True)):
            if (
                mine["completion_tokens"] != theirs["completion_tokens"]
                or mine["positives"] != theirs["positives"]
            ):
                notes.append(
                    f"{name}/{algo}/{run['path']}: timed step {number + 1} sampled other completions than "
                    f"{first['path']} (seeded alike): its FLOPs differ"
                )
                print(f"[{name}/{algo}/{run['path']}] note: {notes[-1].split(': ', 1)[1]}", flush=True)
    for path, (session, _, floor) in sessions.items():
        config = session.config
        runs[path].update(
            optimizer_floor_seconds=floor,
            overrides={key: value for key, value in PATHS[path].items() if key in FIELD_NAMES},
            settings={key: getattr(config, key) for key in ("gradient_checkpointing", "micro_batch_size")},
        )
        if session.reporter is not None:
            session.reporter.close()
        if session.writer is not None:
            session.writer.release()
    del sessions
    _free()
    return list(runs.values())


def trl_steps(name: str, args: argparse.Namespace, runs_dir: Path) -> dict:
    """Seconds per optimizer step of TRL's GRPOTrainer on the same work (bench/study.py's TRL arm), from
    one step's end to the next (the first from the start of training)."""
    from study import trl_arguments, trl_dataset, trl_policy, trl_reward
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from popo_lite.data.problems import training_problems

    values = {**config_values(name, args.changes), **RUN_VALUES, "algo": "grpo", "output_dir": str(runs_dir)}
    values["steps"] = args.warmup + args.trl_steps
    # TRL's own default (TrainingArguments) and its faster setting here: the step fits without it
    checkpointing = False
    config = Config(**{**values, "gradient_checkpointing": checkpointing})
    print(f"[{name}/trl] loading", flush=True)
    model, tokenizer, device = trl_policy(config)
    rewards: list[tuple[float, int]] = []
    steps: list[float] = []

    class Clock(TrainerCallback):
        last = 0.0

        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            steps.append(now - self.last)
            self.last = now
            done = len(steps)
            which = (
                f"warm-up step {done}"
                if done <= args.warmup
                else f"step {done - args.warmup}/{args.trl_steps}"
            )
            print(f"[{name}/trl] {which}: {steps[-1]:.1f} s", flush=True)

    seed_everything(args.seed)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward(rewards),
        args=trl_arguments(config, runs_dir / f"{name}-trl", args.seed, model, device),
        train_dataset=trl_dataset(training_problems(config), config, tokenizer),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    del trainer, model
    _free()
    return {
        "config": name,
        "gradient_checkpointing": checkpointing,
        "seconds_step": steps[args.warmup :],
        "positives": [count for _, count in rewards[args.warmup :]],
    }


def versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    names = {"torch": torch, "transformers": transformers, "peft": peft, "trl": trl}
    return {"python": platform.python_version()} | {
        name: module.__version__ for name, module in names.items()
    }


def measure(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    first = Config(**{**config_values(args.configs[0], args.changes)})
    from popo_lite.planning.estimate import model_shape

    shape = model_shape(first)
    gemm_rows = first.micro_batch_size * 80  # a micro-batch of ~50 prompt + ~30 completion tokens
    results = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "paths": {path: PATHS[path] for path in args.paths},
        "warmup": args.warmup,
        "changes": args.changes,
        "gemm": {"before": gemm_rates(shape, gemm_rows, args.repeats)},
        "runs": [],
        "trl": [],
        "notes": [],
    }
    print(
        f"GEMM GFLOP/s: {json.dumps({k: round(v, 1) for k, v in results['gemm']['before'].items()})}",
        flush=True,
    )
    runs_dir = Path(tempfile.mkdtemp(prefix="step_cost-"))
    try:
        for name in args.configs:
            for algo in args.algos:  # the rate again before each pair: drift, and a quieter moment
                results["gemm"][f"{name}/{algo}"] = gemm_rates(shape, gemm_rows, args.repeats)
                results["runs"] += run_paths(name, algo, args, runs_dir, results["notes"])
            if args.trl_steps:
                results["trl"].append(trl_steps(name, args, runs_dir))
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    results["gemm"]["after"] = gemm_rates(shape, gemm_rows, args.repeats)
    results["gemm"]["gflops"] = max(max(rates.values()) for rates in results["gemm"].values())
    results["summary"] = summarise(results)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(DEFAULT_PATHS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per (config, algo, path)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per path and for TRL")
    parser.add_argument(
        "--trl_steps", type=int, default=2, help="timed TRL GRPOTrainer steps per config (0: none)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per GEMM and optimizer floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config changes on every config (YAML values)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    args.changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        args.changes[key] = yaml.safe_load(value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_cost-cpu.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (args.out / "step_cost-cpu.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'step_cost-cpu.md'} and .json")
    return results


if __name__ == "__main__":
    main()
