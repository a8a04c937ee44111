"""One cell of the study, run and measured: the base measurement, a run of popo_lite's trainer, and
the measurements every run shares (held-out greedy pass@1, pass@k, the probe, the EMA adapter); TRL's
GRPOTrainer arm is in bench/study_trl.py. Each returns the cell's result dict, which
bench/study_results.py stores.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch

from bench.machine import device_name
from bench.study_arms import ARMS, PROBE_SEED, Study, ema_moved
from bench.study_results import command_line
from popo_lite.config import Config
from popo_lite.core.logprobs import completion_stats
from popo_lite.core.rewards import score
from popo_lite.core.siamese import ema_forward
from popo_lite.data.problems import format_prompt
from popo_lite.engine.model import load_base
from popo_lite.engine.rollouts import generate_rollouts
from popo_lite.evaluation.benchmarks import evaluate_problems
from popo_lite.training.session import seed_everything
from popo_lite.training.trainer import prepare, run


def greedy_eval(model, tokenizer, study: Study) -> dict:
    result = evaluate_problems(model, tokenizer, study.heldout, study.greedy_settings(), name="heldout")
    return {
        "pass@1": result["score"],
        "correct": result["correct"],
        "problems": result["problems"],
        "cut_rate": result["cut_rate"],
        "mean_tokens": result["mean_tokens"],
    }


def sampled_eval(model, tokenizer, study: Study) -> dict | None:
    """pass@k for k = 1, 2, 4, ..., n from n samples per held-out problem at the training temperature;
    None when the study samples none (the sweep: greedy pass@1 only)."""
    if study.samples == 0:
        return None
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


def new_result(
    study: Study, arm: str, seed: int | None, config: Config, learning_rate: float | None = None
) -> dict:
    cell = {} if learning_rate is None else {"learning_rate": learning_rate}  # the study's runs: no key
    return {
        "arm": arm,
        "seed": seed,
        **cell,
        "about": ARMS[arm].about,
        "mode": study.mode,
        "signature": study.signature(arm, learning_rate),
        "config": config.to_dict(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": command_line(),
        "device": device_name(),
    }


def curves_from_base(result: dict, base: dict) -> None:
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
    result = new_result(study, "base", None, config)
    started = time.perf_counter()
    seed_everything(0)
    model, tokenizer, _ = load_base(config)
    timings = {"seconds_load": time.perf_counter() - started}
    clock = time.perf_counter()
    greedy = greedy_eval(model, tokenizer, study)
    timings["seconds_greedy"] = time.perf_counter() - clock
    clock = time.perf_counter()
    passk = sampled_eval(model, tokenizer, study)
    if passk is not None:
        result["passk"] = passk
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
    free_memory()
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


def measure_step(
    study: Study, result: dict, model, tokenizer, probe: dict, config: Config, step: int
) -> dict:
    """After optimizer step `step`: the probe, and the greedy evaluation when due; returns their seconds."""
    seconds = {}
    if step == study.steps or step % study.probe_every == 0:
        clock = time.perf_counter()
        _record_probe(result, step, probe_scores(model, probe, tokenizer.pad_token_id, config))
        seconds["seconds_probe"] = time.perf_counter() - clock
    if _due(study, step):
        clock = time.perf_counter()
        greedy = greedy_eval(model, tokenizer, study)
        result["eval_steps"].append(step)
        result["heldout_pass1"].append(greedy["pass@1"])
        result["greedy"] = greedy
        seconds["seconds_eval"] = time.perf_counter() - clock
    return seconds


def print_step(arm: str, seed: int, entry: dict, result: dict) -> None:
    probed = result["probe_steps"][-1] == entry["step"]
    pass1 = (
        f", held-out pass@1 {result['heldout_pass1'][-1]:.3f}"
        if result["eval_steps"][-1] == entry["step"]
        else ""
    )
    negative = result["negative_logprob"][-1]
    probe = (
        f", entropy {result['entropy'][-1]:.3f}, negative log-prob "
        f"{negative if negative is None else round(negative, 4)}"
        if probed
        else ""
    )
    rate = f" lr {result['learning_rate']:g}" if "learning_rate" in result else ""
    print(
        f"  {arm}{rate} seed {seed} step {entry['step']}: reward {entry['reward_mean']:.3f}, "
        f"{entry['gradient_sequences']} sequences with gradient{probe}{pass1}, "
        f"{entry.get('seconds_step', 0.0):.0f} s",
        flush=True,
    )


def final_evaluations(study: Study, result: dict, model, tokenizer, config: Config) -> None:
    clock = time.perf_counter()
    passk = sampled_eval(model, tokenizer, study)
    if passk is not None:
        result["passk"] = passk
        result["seconds_passk"] = time.perf_counter() - clock
    if config.algo != "popo" or ARMS[result["arm"]].kind != "trainer":
        return
    if config.tau == 0:  # xi <- 0 * xi + 1 * theta after every step: the EMA adapter is the policy
        result["ema"] = {"same_as_policy": True}
        return
    if study.half_life and not ema_moved(config.tau, config.steps):
        # the EMA is (nearly) the base: measuring it would report the base again
        result["ema"] = {"moved": False, "start_weight": config.tau**config.steps}
        return
    clock = time.perf_counter()
    with torch.no_grad(), ema_forward(model):
        result["ema"] = {"greedy": greedy_eval(model, tokenizer, study)}
        passk = sampled_eval(model, tokenizer, study) if study.ema_passk else None
        if passk is not None:
            result["ema"]["passk"] = passk
    if study.half_life:  # how much of the start is left in the EMA (the 8-step study's: 0.96)
        result["ema"]["start_weight"] = config.tau**config.steps
    result["seconds_ema_eval"] = time.perf_counter() - clock


def train_arm(study: Study, arm: str, seed: int, base: dict, learning_rate: float | None = None) -> dict:
    """One run of popo_lite's trainer, measured after every step."""
    config = study.config(arm, seed, learning_rate)
    fresh_run_dir(study.runs_dir / config.run_name)
    result = new_result(study, arm, seed, config, learning_rate)
    started = time.perf_counter()
    session = prepare(config)
    result["seconds_load"] = time.perf_counter() - started
    result["run_dir"] = str(session.run_dir)
    curves_from_base(result, base)
    tail = RolloutTail(session.run_dir / "rollouts.jsonl")
    for record in run(session):
        entry = _step_entry(record, tail.read())
        entry.update(
            measure_step(
                study, result, session.model, session.tokenizer, base["probe"], config, entry["step"]
            )
        )
        result["steps"].append(entry)
        print_step(arm, seed, entry, result)
    final_evaluations(study, result, session.model, session.tokenizer, config)
    result["wall_seconds"] = time.perf_counter() - started
    result["finished"] = datetime.now().isoformat(timespec="seconds")
    del session
    free_memory()
    return result


def fresh_run_dir(run_dir: Path) -> None:
    """A run directory left by a run that did not finish (it is not in the JSON): start it again."""
    if run_dir.exists():
        print(f"  removing {run_dir}: left by a run that did not finish", flush=True)
        shutil.rmtree(run_dir)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
