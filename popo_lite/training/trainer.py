"""`train(config)`: the one training loop; the CLI, the web panel and notebooks are shells over it.

Each step reads like the algorithm (POPO_SPEC.md section 1):
    rollout -> score -> weights + loss (updates.py) -> optimizer step -> EMA update -> log
and yields one record (a flat dict of numbers) that is also appended to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from popo_lite.config import Config, ConfigError
from popo_lite.core.policy_forward import PolicyForward
from popo_lite.core.rewards import score
from popo_lite.core.siamese import EMA, POLICY, Predictor, ema_reset, ema_update
from popo_lite.core.updates import NonFiniteLoss, grpo_update, kl_policy_ema, popo_update
from popo_lite.data.problems import Problem, format_prompt, load_problems
from popo_lite.engine.choose import load_policy, rollout_engine
from popo_lite.engine.rollouts import Rollouts
from popo_lite.evaluation.benchmarks import load_benchmarks
from popo_lite.training.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from popo_lite.training.distributed import Replicas
from popo_lite.training.distributed import start as start_replicas
from popo_lite.training.failures import TrainingError, out_of_memory_advice
from popo_lite.training.records import evaluate_during_training, peak_memory_gib, step_statistics
from popo_lite.training.reporting import Reporter, check_reporters
from popo_lite.training.run_files import run_directory, truncate_jsonl, write_rollouts


class PromptSampler:
    """Endless epochs of shuffled problem indices; its position is part of every checkpoint."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.offset = size, seed, 0, 0

    def _order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < count:
            piece = self._order()[self.offset : self.offset + count - len(chosen)]
            chosen += piece
            self.offset += len(piece)
            if self.offset >= self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return chosen

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def lr_lambda(config: Config):
    warmup = int(config.warmup_ratio * config.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, config.steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def score_rollouts(rollouts: Rollouts, batch: list[Problem]) -> tuple[torch.Tensor, list[str | None]]:
    """Binary rewards (B, G) from math-verify, and each completion's extracted answer."""
    group = rollouts.group_size
    scored = [score(text, batch[i // group].answer) for i, text in enumerate(rollouts.texts)]
    rewards = torch.tensor([reward for reward, _ in scored], dtype=torch.float32).view(len(batch), group)
    return rewards, [extracted for _, extracted in scored]


@dataclass
class Session:
    """Everything a run holds between steps; `prepare` builds it, `run` advances it."""

    config: Config
    run_dir: Path
    problems: list[Problem]
    model: object
    tokenizer: object
    device: torch.device
    predictor: Predictor | None
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    noise_generator: torch.Generator
    eval_problems: dict[str, list[Problem]]
    step: int = 0
    replicas: Replicas | None = None  # set under `accelerate launch` with several processes
    generate: Callable[..., Rollouts] | None = None  # generate_rollouts' positional arguments

    @property
    def adapters(self) -> tuple[str, ...]:
        return (POLICY, EMA) if self.predictor is not None else (POLICY,)

    @property
    def is_main(self) -> bool:
        """The process that writes files (the only one, unless launched data-parallel)."""
        return self.replicas is None or self.replicas.is_main


def prepare(config: Config, resume: bool = False) -> Session:
    """Check the data, create the run directory, load the model, restore the last checkpoint on resume."""
    check_reporters(config.report_to)  # a missing tensorboard/wandb fails before the long load
    replicas = start_replicas(config)  # None on one process
    problems = load_problems(
        config.dataset,
        problem_field=config.problem_field,
        answer_field=config.answer_field,
        split=config.dataset_split,
        levels=tuple(config.levels) if config.levels else None,
    )  # before the model: a bad dataset fails in seconds, not after a long load
    if len(problems) < config.prompts_per_step:
        raise ConfigError(
            f"dataset {config.dataset!r} has {len(problems)} problems, fewer than "
            f"prompts_per_step={config.prompts_per_step}"
        )
    eval_problems = {}
    if config.eval_every:  # loaded up front: a benchmark typo fails before the model loads
        eval_problems = load_benchmarks(  # local files use the training set's field names
            config.eval_benchmarks,
            limit=config.eval_limit,
            problem_field=config.problem_field,
            answer_field=config.answer_field,
        )
    if replicas is None:
        run_dir = run_directory(config, resume)
    else:  # one name for all processes (a default name carries the main process's clock)
        run_dir = replicas.main_first(lambda: run_directory(config, resume))
    seed_everything(config.seed)
    model, tokenizer, device = load_policy(
        replace(config, device=str(replicas.device)) if replicas else config,
        check_tokenizer=lambda tok: format_prompt(problems[0].problem, config.prompt_template, tok),
    )
    if replicas is None or replicas.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # only once the model has loaded
        config.save(run_dir / "config.yaml")
    predictor = None
    if config.algo == "popo":
        predictor = Predictor(model.get_base_model().config.hidden_size, config.predictor_dim).to(device)
    if replicas is not None:  # DDP broadcasts the main process's policy and predictor here
        replicas.wrap(PolicyForward(model, predictor if config.alpha > 0 else None))
    ema_reset(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable += list(predictor.parameters()) if predictor is not None else []
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    session = Session(
        config=config,
        run_dir=run_dir,
        problems=problems,
        model=model,
        tokenizer=tokenizer,
        device=device,
        predictor=predictor,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)),
        sampler=PromptSampler(len(problems), config.seed),
        noise_generator=torch.Generator().manual_seed(config.seed),
        eval_problems=eval_problems,
        replicas=replicas,
        generate=rollout_engine(config, run_dir, replicas.rank if replicas else 0),
    )
    if resume and (last := latest_checkpoint(run_dir / "checkpoints")) is not None:
        state = load_checkpoint(last, model, predictor, optimizer, session.scheduler, session.adapters)
        session.step = state["step"]
        session.sampler.load_state_dict(state["sampler"])
        session.noise_generator.set_state(state["noise_generator"])
    if session.is_main:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            truncate_jsonl(run_dir / name, session.step)
    return session


def train(config: Config, resume: bool = False) -> Iterator[dict]:
    """Train the LoRA policy with POPO or GRPO; yield one record per optimizer step."""
    yield from run(prepare(config, resume))


def update_policy(
    session: Session, rollouts: Rollouts, rewards: torch.Tensor
) -> tuple[dict, torch.Tensor, dict[int, list[float]]]:
    """Gradients, clipping and one optimizer step.

    Returns (metrics, per-rollout weights or advantages, token log-probs of the rows the update scored).

    A NaN or infinite loss or gradient skips the step: nothing reaches the adapter, the EMA or a checkpoint.
    """
    config = session.config
    try:
        if session.predictor is not None:
            metrics, weights, token_logprobs = popo_update(
                session.model,
                session.predictor,
                rollouts,
                rewards,
                config,
                session.noise_generator,
                session.replicas,
            )
        else:
            metrics, weights, token_logprobs = grpo_update(
                session.model, rollouts, rewards, config, session.replicas
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(session.trainable, config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLoss(f"gradient norm is {float(grad_norm)}")
        session.optimizer.step()
        metrics["grad_norm"] = float(grad_norm)
    except NonFiniteLoss as error:
        metrics, weights = {"skipped": 1.0, "warning": f"step skipped: {error}"}, torch.zeros(rewards.numel())
        token_logprobs = {}
    finally:
        session.optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    if session.predictor is not None and "skipped" not in metrics:
        ema_update(session.model, config.tau)
    return metrics, weights, token_logprobs


def save(session: Session) -> Path:
    """Checkpoint the session; a failed write (disk full) removes itself and leaves the last one valid."""
    extra = {"sampler": session.sampler.state_dict(), "noise_generator": session.noise_generator.get_state()}
    folder = session.run_dir / "checkpoints"
    try:
        return save_checkpoint(
            folder,
            session.step,
            session.model,
            session.predictor,
            session.optimizer,
            session.scheduler,
            extra,
            session.adapters,
        )
    except OSError as error:
        shutil.rmtree(folder / f"{checkpoint_name(session.step)}.partial", ignore_errors=True)
        raise TrainingError(
            f"could not write the step {session.step} checkpoint ({error}); the last complete checkpoint "
            f"({latest_checkpoint(folder)}) is intact: free disk space and --resume"
        ) from None


def run(session: Session) -> Iterator[dict]:
    """Advance `session` to `config.steps`, one optimizer step (and one yielded record) at a time."""
    config, model, tokenizer, run_dir = session.config, session.model, session.tokenizer, session.run_dir
    replicas = session.replicas
    reporter = Reporter(config, run_dir, first_step=session.step) if session.is_main else None
    while session.step < config.steps:
        started = time.perf_counter()
        last_checkpoint = latest_checkpoint(run_dir / "checkpoints")
        chosen = session.sampler.take(config.prompts_per_step)
        if replicas is not None:  # whole groups per process; each samples with its own seed
            chosen = replicas.shard(chosen)
            torch.manual_seed(replicas.step_seed(config.seed, session.step))
        batch = [session.problems[i] for i in chosen]
        prompts = [format_prompt(p.problem, config.prompt_template, tokenizer) for p in batch]
        with out_of_memory_advice(config, "generation", last_checkpoint):
            rollouts = session.generate(
                model,
                tokenizer,
                prompts,
                config.rollouts_per_prompt,
                config.max_new_tokens,
                config.temperature,
                config.top_p,
                config.max_prompt_tokens,
            )
        reward_started = time.perf_counter()
        rewards, extracted = score_rollouts(rollouts, batch)
        record = {"step": session.step + 1, "algo": config.algo}
        kl = {}
        if session.predictor is not None and config.kl_every and (session.step + 1) % config.kl_every == 0:
            # Before the update: k3 is unbiased only on samples from the policy it measures.
            kl["kl_policy_ema"] = kl_policy_ema(model, rollouts, config)
        update_started = time.perf_counter()
        with out_of_memory_advice(config, "update", last_checkpoint):
            metrics, weights, token_logprobs = update_policy(session, rollouts, rewards)
        session.step += 1
        update_seconds = time.perf_counter() - update_started
        metrics, lengths = {**kl, **metrics}, rollouts.completion_mask.sum(1)
        all_rewards, all_weights = rewards, weights
        if replicas is not None:  # the step's statistics over every process's groups
            metrics = replicas.mean_metrics(metrics)
            all_rewards, all_weights, lengths = replicas.gather(rewards, weights, lengths)
        popo = session.predictor is not None
        record.update(step_statistics(all_rewards, all_weights, lengths, config, popo))
        record.update(metrics)
        memory, memory_kind = peak_memory_gib(session.device)
        record.update(
            {
                "lr": session.scheduler.get_last_lr()[0],
                "generation_tokens_per_s": rollouts.num_completion_tokens / max(rollouts.seconds, 1e-9),
                "train_tokens_per_s": int(rollouts.attention_mask.sum()) / max(update_seconds, 1e-9),
                "seconds_generate": rollouts.seconds,
                "seconds_reward": update_started - reward_started,
                "seconds_update": update_seconds,
                "seconds_step": time.perf_counter() - started,
                f"peak_memory_gib_{memory_kind}": memory,
            }
        )
        if session.is_main:  # files are the main process's; it logs its own share of the rollouts
            if config.log_rollouts:
                write_rollouts(
                    run_dir / "rollouts.jsonl",
                    session.step,
                    tokenizer,
                    batch,
                    prompts,
                    rollouts,
                    rewards,
                    weights,
                    extracted,
                    token_logprobs,
                )
            if config.eval_every and (session.step % config.eval_every == 0 or session.step == config.steps):
                record.update(evaluate_during_training(session))
            with open(run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            reporter.log(record)
            if session.step == config.steps or (config.save_every and session.step % config.save_every == 0):
                record["checkpoint"] = str(save(session))  # after the logs: its step is fully logged
        record["run_dir"] = str(run_dir)
        yield record
    if reporter is not None:
        reporter.close()
    if replicas is not None:
        replicas.wait()  # no process leaves while the main one still writes the last checkpoint
