"""A training run's state between steps: `prepare` builds it (data, run directory, model, optimizer,
resume from the last checkpoint). The step itself is `trainer.step`; what a step writes, `run_files.py`.

`--resume` is a promise: it continues from the newest checkpoint that loads and fits the
config's shapes, or stops with one line saying which checkpoints it found and why each was refused,
before anything is written. It never starts a run with history over from step 0; `--restart` does,
after moving the old history into `<run>/restarted-<time>/`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from popo_lite.config import Config, ConfigError
from popo_lite.core.policy_forward import PolicyForward
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import EMA, POLICY, Predictor, ema_reset
from popo_lite.core.updates import splits_by_length
from popo_lite.data.problems import Problem, format_prompt, training_problems
from popo_lite.engine.choose import load_policy, rollout_engine
from popo_lite.evaluation.benchmarks import load_benchmarks
from popo_lite.training.checkpoint import CheckpointMismatch, apply_checkpoint, latest_checkpoint, read_latest
from popo_lite.training.distributed import Replicas
from popo_lite.training.distributed import start as start_replicas
from popo_lite.training.failures import TrainingError
from popo_lite.training.job_slot import WriterLock, hold_run_directory
from popo_lite.training.reporting import Reporter, check_reporters
from popo_lite.training.run_files import restart_aside, run_directory, truncate_jsonl
from popo_lite.training.run_paths import file_path, make_folder, save_config
from popo_lite.training.runs import read_jsonl


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


def lr_lambda(config: Config) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step `step` (0-based), as Hugging Face's schedulers give it
    (the reference's): linear warm-up over ceil(warmup_ratio x steps) steps from 0, then constant or
    cosine to 0 (docs/algorithm.md section 7)."""
    warmup = math.ceil(config.warmup_ratio * config.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if config.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, config.steps - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return factor


SHUFFLE_SEED_OFFSET = 1_000_003  # the shuffle stream's seed is the run's seed plus this


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Session:
    """Everything a run holds between steps."""

    config: Config
    run_dir: Path
    problems: list[Problem]
    model: object
    tokenizer: object
    device: torch.device
    predictor: Predictor | None  # POPO's online predictor h_phi; None for GRPO
    policy_parameters: list[torch.nn.Parameter]  # the trained adapter: what gradient clipping covers
    optimizer: torch.optim.Optimizer  # over the policy adapter and the predictor
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    generator: torch.Generator  # CPU: the similarity noise only (checkpointed)
    shuffle_generator: torch.Generator  # CPU: the micro-batch shuffles only (checkpointed)
    eval_problems: dict[str, list[Problem]]
    generate: Callable[..., Rollouts]  # generate_rollouts' positional arguments (engine/choose.py)
    reporter: Reporter | None  # TensorBoard / W&B, main process only
    step: int = 0
    replicas: Replicas | None = None  # set under `accelerate launch` with several processes
    writer: WriterLock | None = None  # the main process's hold on run_dir, released when training ends

    @property
    def adapters(self) -> tuple[str, ...]:
        return (POLICY, EMA) if self.config.algo == "popo" else (POLICY,)

    @property
    def is_main(self) -> bool:
        """The process that writes files (the only one, unless launched data-parallel)."""
        return self.replicas is None or self.replicas.is_main

    def last_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir / "checkpoints", self.config.steps)


def _load_data(config: Config) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Training problems and evaluation benchmarks, before the model: a bad name fails in seconds."""
    problems = training_problems(config)
    if len(problems) < config.prompts_per_step:
        raise ConfigError(
            f"dataset {config.dataset!r} has {len(problems)} problems, fewer than "
            f"prompts_per_step={config.prompts_per_step}"
        )
    eval_problems = {}
    if config.eval_every:  # local files use the training set's field names
        eval_problems = load_benchmarks(
            config.eval_benchmarks,
            limit=config.eval_limit,
            problem_field=config.problem_field,
            answer_field=config.answer_field,
        )
    return problems, eval_problems


def _hold(run_dir: Path, resume: bool) -> WriterLock:
    """The main process's writer lock on `run_dir`: one writer per run directory, whatever the device."""
    try:
        return hold_run_directory(run_dir, resume)
    except OSError as error:  # a read-only or otherwise unusable output_dir
        reason = error.strerror or error
        raise ConfigError(f"output_dir: cannot write the run directory {run_dir} ({reason})") from None


def prepare(config: Config, resume: bool = False, restart: bool = False) -> Session:
    """Check the data, create the run directory, load the model, restore the last checkpoint on resume
    (`restart`: start a run folder's run over from step 0, its old history moved aside).

    The main process holds the run directory's writer lock from here until `run` ends (released here
    when preparing fails; a run folder this call created and left empty is removed again)."""
    check_reporters(config.report_to)  # a missing tensorboard/wandb fails before the long load
    replicas = start_replicas(config)  # None on one process
    problems, eval_problems = _load_data(config)
    created: list[Path] = []
    writer: list[WriterLock] = []

    def claim() -> Path:
        run_dir = run_directory(config, resume, restart)
        if not run_dir.exists():
            created.append(run_dir)
        writer.append(_hold(run_dir, resume or restart))
        return run_dir

    if replicas is None:
        run_dir = claim()
    else:  # one name for all processes (a default name carries the main process's clock)
        run_dir = replicas.main_first(claim)
    try:
        session = _prepare_in(config, resume, restart, run_dir, problems, eval_problems, replicas)
    except BaseException:
        for lock in writer:
            lock.release()
        for folder in created:
            try:
                folder.rmdir()  # only if still empty: a failed start leaves no folder behind
            except OSError:
                pass
        raise
    session.writer = writer[0] if writer else None
    return session


def _resume_point(config: Config, run_dir: Path, adapters: tuple[str, ...]) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, read and checked before the model loads or anything is written:
    None for a run with no history yet; a TrainingError, one line, when its history has no checkpoint
    that loads and fits the config (nothing is changed then)."""
    logged = max((int(r.get("step", 0)) for r in read_jsonl(run_dir / "metrics.jsonl")), default=0)
    if logged > config.steps:  # its checkpoints past `steps` would be skipped and its logs cut to them
        raise TrainingError(
            f"--resume: run {run_dir.name!r} already logged {logged} steps, more than steps={config.steps}; "
            f"nothing was changed: give --steps {logged} or more"
        )
    try:
        path, saved, refused = read_latest(run_dir, config, adapters)
    except CheckpointMismatch as error:
        raise TrainingError(
            f"--resume: {error}; nothing was changed (config.yaml included): resume with the checkpoint's "
            "values, or --restart (or another --run_name) to train with the new ones"
        ) from None
    if path is not None:
        return path, saved
    metrics = file_path(run_dir, "metrics.jsonl")
    if refused or (metrics is not None and metrics.stat().st_size > 0):
        found = "; ".join(refused) if refused else "none (no checkpoints/ entry)"
        raise TrainingError(
            f"--resume: run {run_dir.name!r} has a history but no checkpoint that loads. Found: {found}. "
            "Nothing was changed: --restart (train(config, restart=True)) starts it over from step 0, "
            "the old history moved aside"
        )
    return None


def _prepare_in(
    config: Config,
    resume: bool,
    restart: bool,
    run_dir: Path,
    problems: list[Problem],
    eval_problems: dict[str, list[Problem]],
    replicas: Replicas | None,
) -> Session:
    is_main = replicas is None or replicas.is_main
    adapters = (POLICY, EMA) if config.algo == "popo" else (POLICY,)
    resumed = _resume_point(config, run_dir, adapters) if resume and not restart else None
    seed_everything(config.seed)
    model, tokenizer, device = load_policy(
        replace(config, device=str(replicas.device)) if replicas else config,
        check_tokenizer=lambda tok: format_prompt(problems[0].problem, config.prompt_template, tok),
    )
    if is_main:  # only once the model has loaded and the checkpoint was checked
        if restart:
            restart_aside(run_dir)
        make_folder(run_dir, "checkpoints")
        save_config(run_dir, config)
    predictor = None
    if config.algo == "popo":
        # Its initialisation draws from a fork of the global generator, so every arm of one seed (GRPO
        # builds no predictor) samples the same rollouts: common random numbers across methods.
        with torch.random.fork_rng(devices=[]):
            predictor = Predictor(model.get_base_model().config.hidden_size, config.predictor_dim)
        predictor = predictor.to(device)
    if replicas is not None:  # DDP broadcasts the main process's policy and predictor here
        split = splits_by_length(config, device)
        replicas.wrap(PolicyForward(model, predictor if config.alpha > 0 else None, split))
    ema_reset(model)
    policy_parameters = [p for p in model.parameters() if p.requires_grad]
    trainable = policy_parameters + (list(predictor.parameters()) if predictor is not None else [])
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    session = Session(
        config=config,
        run_dir=run_dir,
        problems=problems,
        model=model,
        tokenizer=tokenizer,
        device=device,
        predictor=predictor,
        policy_parameters=policy_parameters,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config)),
        sampler=PromptSampler(len(problems), config.seed),
        generator=torch.Generator().manual_seed(config.seed),
        # its own stream: an arm that draws less noise (alpha 0, fewer rows) shuffles as the others do
        shuffle_generator=torch.Generator().manual_seed(config.seed + SHUFFLE_SEED_OFFSET),
        eval_problems=eval_problems,
        generate=rollout_engine(config, run_dir, replicas.rank if replicas else 0),
        reporter=None,
        replicas=replicas,
    )
    if resumed is not None:
        state = apply_checkpoint(resumed[1], model, predictor, optimizer, session.scheduler)
        session.step = state["step"]
        session.sampler.load_state_dict(state["sampler"])
        session.generator.set_state(state["noise_generator"])
        if "shuffle_generator" in state:  # checkpoints from before the separate shuffle stream lack it
            session.shuffle_generator.set_state(state["shuffle_generator"])
    if is_main:
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            truncate_jsonl(run_dir, name, session.step)
        session.reporter = Reporter(config, run_dir, first_step=session.step)
    return session
