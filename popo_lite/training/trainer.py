"""`train(config)`: the one training loop; the CLI, the web panel and notebooks are shells over it.

`step(session)` is one optimizer step of POPO or GRPO, one named call per phase (docs/algorithm.md
section 1):

    generate -> reward -> gradients (weights, loss, backward) -> optimizer step -> EMA update
    -> record -> write

Set-up and resume live in `session.py`, the record in `records.py`, the files in `run_files.py`, the
objective in `core/`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from popo_lite.config import Config
from popo_lite.core.rewards import score
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import EMA, ema_update
from popo_lite.core.updates import (
    NonFiniteLoss,
    Update,
    grpo_update,
    kl_policy_ema,
    popo_update,
    splits_by_length,
)
from popo_lite.data.problems import Problem, format_prompt
from popo_lite.training.failures import TrainingError, out_of_memory_advice
from popo_lite.training.records import PhaseTimer, StepResult, evaluate_during_training, step_record
from popo_lite.training.run_files import write_step
from popo_lite.training.session import Session, prepare


def train(config: Config, resume: bool = False, restart: bool = False) -> Iterator[dict]:
    """Train the LoRA policy with POPO or GRPO; yield one record per optimizer step (`resume`: from the
    run's last checkpoint; `restart`: the run started over, its old history moved aside)."""
    yield from run(prepare(config, resume, restart))


def run(session: Session) -> Iterator[dict]:
    """Advance `session` to `config.steps`, one optimizer step (and one yielded record) at a time.

    With `eval_every`, a fresh run first evaluates the untrained policy (`eval/step-000000.json`), so the
    summary can say held-out accuracy before -> after.
    """
    if session.step == 0 and session.config.eval_every and session.is_main:
        evaluate_during_training(session)
    try:
        while session.step < session.config.steps:
            yield step(session)
    finally:
        if session.reporter is not None:
            session.reporter.close()
        if session.writer is not None:  # the run directory's writer lock (session.prepare)
            session.writer.release()
    if session.replicas is not None:
        session.replicas.wait()  # no process leaves while the main one still writes the last checkpoint


def step(session: Session) -> dict:
    """One optimizer step; returns its record (also written to the run directory)."""
    config, timer = session.config, PhaseTimer()
    batch, prompts = next_prompts(session)
    last_checkpoint = session.last_checkpoint()  # named by the out-of-memory advice
    with timer.phase("generate"), out_of_memory_advice(config, "generation", last_checkpoint):
        rollouts = generate(session, prompts)
    with timer.phase("reward"):
        rewards, answers = reward(rollouts, batch)
    monitors = {}
    if config.algo == "popo" and config.kl_every and (session.step + 1) % config.kl_every == 0:
        with timer.phase("kl"):  # before the update: k3 is unbiased only on the measured policy's samples
            monitors["kl_policy_ema"] = kl_policy_ema(
                session.model,
                rollouts,
                config.micro_batch_size,
                config.temperature,
                config.shared_prompts,
                splits_by_length(config, session.device),
            )
    with timer.phase("update"), out_of_memory_advice(config, "update", last_checkpoint):
        update, skipped = gradients(session, rollouts, rewards, timer)
        with timer.phase("optimizer"):
            grad_norm, skipped = optimizer_step(session, skipped)
            if skipped is None and config.algo == "popo":
                ema_update(session.model, config.tau)
    session.step += 1
    result = StepResult(
        batch, prompts, rollouts, rewards, answers, update, grad_norm, skipped, timer, monitors
    )
    record = step_record(session, result)
    write_step(session, result, record)
    record["run_dir"] = str(session.run_dir)
    return record


def next_prompts(session: Session) -> tuple[list[Problem], list[str]]:
    """This step's problems (this process's share under `accelerate launch`) and their prompts."""
    config, replicas = session.config, session.replicas
    chosen = session.sampler.take(config.prompts_per_step)
    if replicas is not None:  # whole groups per process; each samples with its own seed
        chosen = replicas.shard(chosen)
        torch.manual_seed(replicas.step_seed(config.seed, session.step))
    batch = [session.problems[i] for i in chosen]
    return batch, [format_prompt(p.problem, config.prompt_template, session.tokenizer) for p in batch]


def generate(session: Session, prompts: list[str]) -> Rollouts:
    """G completions per prompt from the current policy (the engine `engine/choose.py` picked)."""
    config = session.config
    return session.generate(
        session.model,
        session.tokenizer,
        prompts,
        config.rollouts_per_prompt,
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        config.max_prompt_tokens,
    )


def reward(rollouts: Rollouts, batch: list[Problem]) -> tuple[torch.Tensor, list[str | None]]:
    """Binary rewards (B, G) from math-verify, and each completion's extracted answer."""
    group = rollouts.group_size
    problems = [batch[i // group] for i in range(len(rollouts.texts))]
    scored = [
        score(text, p.answer, question=p.problem) for text, p in zip(rollouts.texts, problems, strict=True)
    ]
    rewards = torch.tensor([value for value, _ in scored], dtype=torch.float32).view(len(batch), group)
    return rewards, [extracted for _, extracted in scored]


def gradients(
    session: Session, rollouts: Rollouts, rewards: torch.Tensor, timer: PhaseTimer | None = None
) -> tuple[Update, str | None]:
    """Weights (POPO) or advantages (GRPO), the loss and its backward, accumulated over micro-batches;
    `timer` gets the update's own phases (weights, loss, similarity or reference).

    Returns the update and, when a micro-batch's loss was NaN or infinite, why the step is skipped
    (its gradients are then dropped: nothing reaches the adapter, the EMA or a checkpoint).
    """
    config = session.config
    try:
        if config.algo == "popo":
            update = popo_update(
                session.model,
                session.predictor,
                rollouts,
                rewards,
                config,
                session.generator,
                session.replicas,
                timer,
                session.shuffle_generator,
            )
        else:
            update = grpo_update(
                session.model, rollouts, rewards, config, session.replicas, session.shuffle_generator, timer
            )
    except NonFiniteLoss as error:
        session.optimizer.zero_grad(set_to_none=True)
        return Update({}, torch.zeros(rewards.numel()), {}), str(error)
    return update, None


def optimizer_step(session: Session, skipped: str | None) -> tuple[float | None, str | None]:
    """Clip the policy adapter's gradient, take the AdamW step and advance the schedule.

    Returns (gradient norm, why the step was skipped or None): a step already `skipped` by its loss, or
    with a non-finite gradient norm, does not reach the parameters; the schedule advances either way.
    Clipping covers the policy adapter only, as the reference's Trainer clips the model's parameters;
    the predictor is not clipped (docs/algorithm.md section 7).
    """
    grad_norm = None
    if skipped is None:
        norm = torch.nn.utils.clip_grad_norm_(session.policy_parameters, session.config.max_grad_norm)
        grad_norm = float(norm)
        if torch.isfinite(norm):
            session.optimizer.step()
            check_finite_parameters(session)
        else:
            skipped = f"gradient norm is {grad_norm}"
    session.optimizer.zero_grad(set_to_none=True)
    session.scheduler.step()
    return grad_norm, skipped


def check_finite_parameters(session: Session) -> None:
    """Stop the run when the step just taken left a trained parameter NaN or infinite.

    A finite loss and gradient norm can still give non-finite weights (a huge learning rate, a
    non-finite clipping bound): checked here, before the EMA update, the record and any checkpoint, so
    nothing of the step is written. Covers the policy adapter and the predictor (what the optimizer
    steps) and the EMA adapter (a mix of past policies).
    """
    trained = [p for group in session.optimizer.param_groups for p in group["params"]]
    trained += [p for name, p in session.model.named_parameters() if f".{EMA}." in name]
    if trained and bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()):
        return
    last = session.last_checkpoint()
    kept = f"the last complete checkpoint ({last}) is intact" if last else "no checkpoint was written yet"
    raise TrainingError(
        f"step {session.step + 1}: the update made trained parameters non-finite (NaN or inf); nothing of "
        f"this step is saved and {kept}: lower learning_rate or max_grad_norm and --resume"
    )
