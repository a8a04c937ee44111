"""The `trl-grpo` arm: TRL's GRPOTrainer on the study's budget, started from the trainer arm's LoRA and
measured by bench/study_runs.py's code through a callback. bench/step_cost.py times the same trainer
from these functions.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path

import torch

from bench.study_arms import Study
from bench.study_runs import (
    curves_from_base,
    final_evaluations,
    free_memory,
    fresh_run_dir,
    measure_step,
    new_result,
    print_step,
)
from popo_lite.config import Config
from popo_lite.core.rewards import score
from popo_lite.data.problems import Problem, format_prompt, training_problems
from popo_lite.engine.choose import resolve_checkpointing
from popo_lite.engine.model import load_base, lora_config
from popo_lite.training.session import seed_everything


def trl_policy(config: Config):
    """The base with one LoRA adapter ("default", TRL's), initialised exactly as the trainer's "policy"
    adapter for the same seed (same loader, same random draws; tested): (model, tokenizer, device)."""
    from peft import get_peft_model

    seed_everything(config.seed)  # as session.prepare does before it loads the model
    config = resolve_checkpointing(config)  # auto: the planner's choice, as load_policy makes it
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
    # as trl_policy set the model up: it resolved `auto` once (and printed the planner's line)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
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
        gradient_checkpointing=checkpointing,
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


def train_trl(study: Study, arm: str, seed: int, base: dict, learning_rate: float | None = None) -> dict:
    """The same budget with TRL's GRPOTrainer, measured by the same code through a callback."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    config = study.config(arm, seed, learning_rate)
    run_dir = study.runs_dir / config.run_name
    fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.yaml")
    result = new_result(study, arm, seed, config, learning_rate)
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
            entry.update(measure_step(study, result, trainer.model, tokenizer, base["probe"], config, step))
            result["steps"].append(entry)
            print_step(arm, seed, entry, result)

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
    curves_from_base(result, base)
    trainer.train()
    logged = {log["step"]: log for log in trainer.state.log_history if "loss" in log}
    names = {"loss": "loss", "kl": "kl", "grad_norm": "grad_norm", "learning_rate": "lr"}
    names |= {"frac_reward_zero_std": "frac_reward_zero_std", "completions/mean_length": "completion_length"}
    for entry in result["steps"]:
        log = logged.get(entry["step"], {})
        entry.update({ours: log[theirs] for theirs, ours in names.items() if log.get(theirs) is not None})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in result["steps"]))
    final_evaluations(study, result, trainer.model, tokenizer, config)
    result["wall_seconds"] = time.perf_counter() - started
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    del trainer, model
    free_memory()
    return result
