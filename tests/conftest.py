"""Tiny fakes built inside the tests: a 2-layer Llama and a digit-level tokenizer, saved to a folder.

The tokenizer knows only digits and a few specials (every other character is <unk>), so a random
model's one- or two-token completions are digit strings that are right about 1 time in 12: enough
real reward signal for end-to-end runs, with no download.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from popo_lite.config import Config

SPECIALS = ["<pad>", "<eos>", "<unk>"]
ROOT = Path(__file__).resolve().parents[1]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*SPECIALS, *"0123456789"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model_folder(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def live_policy(config: Config):
    """The tiny model's policy with a non-zero LoRA B, so the adapter takes part in every forward."""
    from popo_lite.engine.choose import load_policy

    torch.manual_seed(0)  # LoRA A's initialisation: the same whatever ran before
    model, tokenizer, _ = load_policy(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.policy" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


def siamese_policy(config: Config):
    """`live_policy` with an EMA adapter moved away from it (so the two branches differ) and a
    predictor: (model, tokenizer, predictor)."""
    from popo_lite.core.siamese import Predictor, ema_reset, ema_update

    model, tokenizer = live_policy(config)
    ema_reset(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A.policy" in name:
                param.add_(0.1)
    ema_update(model, 0.5)
    torch.manual_seed(1)
    predictor = Predictor(model.get_base_model().config.hidden_size, config.predictor_dim)
    return model, tokenizer, predictor


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def digit_problems(tmp_path_factory) -> Path:
    """A local jsonl of one-digit sums, in a custom field layout (exercises problem/answer_field)."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [
        {"q": f"What is {a} + {b}?", "gold": str(a + b)} for a in range(5) for b in range(5) if a + b < 10
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def tiny_config(tiny_model_dir, digit_problems, tmp_path):
    """A factory of CPU-fast configs on the tiny model; keyword arguments override fields."""

    def make(**overrides) -> Config:
        values = dict(
            model=str(tiny_model_dir),
            dataset=str(digit_problems),
            problem_field="q",
            answer_field="gold",
            prompt_template="plain",
            prompts_per_step=4,
            rollouts_per_prompt=4,
            max_new_tokens=2,
            temperature=1.0,
            steps=2,
            learning_rate=1e-2,
            micro_batch_size=8,
            predictor_dim=16,
            kl_every=1,
            lora_rank=4,
            lora_alpha=8,
            output_dir=str(tmp_path / "runs"),
            run_name="test",
            seed=0,
            gradient_checkpointing=True,
            eval_every=0,
        )
        values.update(overrides)
        return Config(**values)

    return make


ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}  # added to os.environ for CLI subprocesses


@pytest.fixture
def tiny_cli_args(tiny_model_dir, digit_problems) -> list[str]:
    """`python -m popo_lite.train` options selecting the tiny model and the digit sums."""
    return [
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(digit_problems),
        "--problem_field",
        "q",
        "--answer_field",
        "gold",
        "--prompt_template",
        "plain",
        "--max_new_tokens",
        "2",
        "--eval_every",
        "0",
    ]


def kill_panel_jobs(runs: Path) -> None:
    """SIGKILL every job a panel started in `runs` (its lock files name their process groups)."""
    for lock in runs.glob(".active-*.json"):
        pid = json.loads(lock.read_text() or "{}").get("pid")
        if pid:
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def panel_process(runs: Path, log: Path, *options: str) -> Iterator[tuple[str, int]]:
    """`python app.py --runs-dir RUNS OPTIONS...` on a free localhost port: (url, port) once it answers
    HTTP; stopped on exit, with every job it started."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs), *options]
    with open(log, "wb") as output:
        app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if app.poll() is not None or time.monotonic() > deadline:
                app.kill()
                pytest.fail(f"the panel did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    try:
        yield url, port
    finally:
        app.terminate()
        app.wait(timeout=30)
        kill_panel_jobs(runs)
