"""One POPO and one GRPO step at Qwen2.5 shapes with random NF4 weights: memory per phase and speed.

    python bench/gpu_step.py                  # 7B shape, sizes of configs/qwen2.5-math-7b-qlora.yaml
    python bench/gpu_step.py --shape 1.5b     # sizes of configs/qwen2.5-math-1.5b-qlora.yaml
    python bench/gpu_step.py --shape tiny     # CPU scale: what runs without CUDA (the default there)

Answers "does a 7B QLoRA POPO step fit a 16 GiB card, and what does each phase cost?" without a download.
How it differs from a real training step:
1. Random weights of the real Qwen2.5 sizes, built on the GPU in bf16, then every decoder nn.Linear is
   swapped for a bitsandbytes NF4 `Linear4bit` with double quantisation (the build measured in
   docs/measurements.md section 1.1).
   Embeddings and lm_head stay bf16, as `from_pretrained(..., load_in_4bit=True)` leaves them.
2. A word-level tokenizer over the model's vocabulary stands in for Qwen's; prompts are random tokens.
3. EOS is suppressed (generation_config.suppress_tokens): every completion is max_new_tokens long.
4. Rewards are Bernoulli(--positive-rate), fixed by the seed: a random model solves nothing.
5. Decode speed is timed at --timed-tokens new tokens, eager, static and paged (continuous batching)
   at the same batch, each after a warm-up of the same shapes (every completion runs to the end, so
   paged's gain from dropping finished rows does not show here); the rollouts that POPO and GRPO train
   on have the full shape prompts x rollouts x max_new_tokens and come from --full-cache (static:
   compiled on first use).
6. GRPO's step runs after POPO's on the same rollouts, with its own AdamW (POPO's is freed first); the
   adapter has moved by one step, which changes no cost.
Writes bench/results/gpu_step-<device>.{md,json} and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_lite.config import Config, load_config  # noqa: E402
from popo_lite.core.rollouts import Rollouts  # noqa: E402
from popo_lite.core.siamese import Predictor, ema_reset, ema_update  # noqa: E402
from popo_lite.core.updates import grpo_update, popo_update  # noqa: E402
from popo_lite.engine.model import (  # noqa: E402
    attach_adapters,
    keep_nf4_layers_trainable,
    resolve_device,
    resolve_dtype,
)
from popo_lite.engine.rollouts import generate_rollouts  # noqa: E402

GIB = 2**30
PAD, EOS = 0, 1  # ids of the stand-in tokenizer's specials; ids from 3 up are words

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SHAPE_FIELDS += ("num_key_value_heads", "vocab_size", "tie_word_embeddings")
SHAPES: dict[str, dict] = {  # from the Hugging Face configs of Qwen2.5-Math-7B, -Math-1.5B and Qwen2.5-0.5B
    name: dict(zip(SHAPE_FIELDS, sizes, strict=True))
    for name, sizes in {
        "7b": (3584, 18944, 28, 28, 4, 152064, False),
        "1.5b": (1536, 8960, 28, 12, 2, 151936, True),
        "0.5b": (896, 4864, 24, 14, 2, 151936, True),
        "tiny": (64, 128, 2, 4, 2, 512, False),
    }.items()
}
RECIPES = {  # the training config whose sizes each shape runs at (tiny: CPU-scale overrides only)
    "7b": ROOT / "configs" / "qwen2.5-math-7b-qlora.yaml",
    "1.5b": ROOT / "configs" / "qwen2.5-math-1.5b-qlora.yaml",
    "0.5b": ROOT / "configs" / "qwen2.5-math-1.5b-qlora.yaml",
    "tiny": None,
}
TINY_SIZES = {"prompts_per_step": 8, "rollouts_per_prompt": 8, "max_new_tokens": 64, "micro_batch_size": 8}
TINY_SIZES |= {"lora_rank": 4, "lora_alpha": 8, "predictor_dim": 16}


def word_tokenizer(vocab_size: int):
    """A tokenizer whose every id is a word ("w3" .. "w<vocab-1>"), so any sampled id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.padding_side = "left"  # as popo_lite.engine.model.load_tokenizer
    tokenizer.truncation_side = "left"
    return tokenizer


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[str]:
    """Prompts of 3/4 to all of `length` tokens (different lengths: left padding, as in training)."""
    rng = random.Random(seed)
    lengths = [rng.randint(max(1, 3 * length // 4), length) for _ in range(count)]
    return [" ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(n)) for n in lengths]


def swap_linears_for_nf4(module: nn.Module, compute_dtype: torch.dtype) -> None:
    """Replace every nn.Linear below `module` by a bnb NF4 Linear4bit (double quant), in place.

    A Params4bit quantises when moved to a device (`Params4bit.to` -> `_quantize`), on CUDA and CPU alike.
    """
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            swap_linears_for_nf4(child, compute_dtype)
            continue
        nf4 = bnb.nn.Linear4bit(
            child.in_features,
            child.out_features,
            bias=child.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantisation
            quant_type="nf4",
            device="meta",  # no throw-away full-size weight
        )
        weight = bnb.nn.Params4bit(
            child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=nf4
        )
        nf4.weight = weight.to(child.weight.device)
        nf4.bias = child.bias
        setattr(module, name, nf4)


def build_base(shape: str, device: torch.device, dtype: torch.dtype, max_positions: int):
    """A random-weight Qwen2 of `shape` in NF4 on `device`, flagged as from_pretrained flags a 4-bit model."""
    from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    model_config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=max_positions,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    with device:  # random init straight on the device: no CPU copy of 7B
        base = Qwen2ForCausalLM._from_config(model_config, dtype=dtype)
    swap_linears_for_nf4(base.model.layers, dtype)
    keep_nf4_layers_trainable(base)  # as popo_lite's loader does (AVX512-BF16 CPUs repack NF4 otherwise)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    base.is_loaded_in_4bit = True  # peft then wraps Linear4bit with its bnb LoRA layer, as for --qlora
    base.hf_quantizer = Bnb4BitHfQuantizer(bnb_config)  # what generate's compile check sees under --qlora
    base.generation_config.eos_token_id, base.generation_config.pad_token_id = EOS, PAD
    base.requires_grad_(False)
    return base, model_config


class Phases:
    """Seconds and peak memory of named phases: CUDA peak allocated, reset per phase; on CPU peak RSS.

    A phase that sets row["tokens"] also gets tokens_per_s over its seconds.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.rows: list[dict] = []

    @contextmanager
    def phase(self, key: str, label: str, shape: str) -> Iterator[dict]:
        row = {"key": key, "phase": label, "shape": shape}
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            row["held_gib"] = torch.cuda.memory_allocated() / GIB
        started = time.perf_counter()
        yield row
        if self.cuda:
            torch.cuda.synchronize()
            row.setdefault("peak_gib", torch.cuda.max_memory_allocated() / GIB)
        row["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        row["seconds"] = time.perf_counter() - started
        if "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
        self.rows.append(row)


def sample(model, tokenizer, prompts, config: Config, new_tokens: int, cache: str, seed: int) -> Rollouts:
    torch.manual_seed(seed)
    return generate_rollouts(
        model,
        tokenizer,
        prompts,
        config.rollouts_per_prompt,
        new_tokens,
        config.temperature,
        config.top_p,
        config.max_prompt_tokens,
        config.generation_batch_size,
        cache=cache,
        prefill_chunk_size=config.prefill_chunk_size,
    )


def timed_decode(phases: Phases, key: str, label: str, cache: str, sampling: tuple, tokens: int) -> None:
    """tokens/s of one generate_rollouts call, after a warm-up call of the same shapes."""
    model, tokenizer, prompts, config, seed = sampling
    batch = len(prompts) * config.rollouts_per_prompt
    sample(model, tokenizer, prompts, config, tokens, cache, seed)  # warm-up: same shapes
    with phases.phase(key, label, f"{batch} x {tokens} new") as row:
        row["tokens"] = sample(model, tokenizer, prompts, config, tokens, cache, seed).num_completion_tokens


def train_step(
    model,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    config: Config,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.Tensor],
    predictor: Predictor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """One optimizer step as the trainer takes it (`trainer.gradients` + `optimizer_step`, no NaN skip)."""
    if predictor is not None:
        popo_update(model, predictor, rollouts, rewards, config, generator)
    else:
        grpo_update(model, rollouts, rewards, config)
    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if predictor is not None:
        ema_update(model, config.tau)


def planned_peak(config: Config, model_config) -> dict | str | None:
    """popo_lite.plan's prediction, when that module exists (it is optional here)."""
    try:
        from popo_lite.planning.estimate import estimate
    except ImportError:
        return None
    try:
        plan = estimate(config, model_config)
    except Exception as error:  # an optional estimate must not cost the measurement
        return f"popo_lite.planning.estimate failed: {error!r}"
    return {"peak_gib": plan.peak_bytes / GIB, "phases_gib": {k: v / GIB for k, v in plan.phases.items()}}


def sizes_config(args: argparse.Namespace) -> Config:
    overrides: dict = {"qlora": True, "device": "auto", "seed": args.seed}
    if RECIPES[args.shape] is None:
        overrides |= TINY_SIZES
    for field, value in (
        ("prompts_per_step", args.prompts),
        ("rollouts_per_prompt", args.rollouts),
        ("max_new_tokens", args.new_tokens),
        ("micro_batch_size", args.micro_batch_size),
    ):
        if value is not None:
            overrides[field] = value
    return load_config(RECIPES[args.shape], overrides)


def measure_rollouts(
    phases: Phases, sampling: tuple, args: argparse.Namespace, notes: list[str]
) -> tuple[Rollouts, str]:
    """Eager, static and paged decode speed at one batch; the full-shape rollouts to train on and their
    cache."""
    model, tokenizer, prompts, config, seed = sampling
    cuda = next(model.parameters()).device.type == "cuda"
    timed = min(args.timed_tokens, config.max_new_tokens)
    timed_decode(phases, "rollout_eager", "rollout, eager (HF dynamic cache)", "dynamic", sampling, timed)
    full_shape = f"{config.rollouts_per_step} x {config.max_new_tokens} new"
    cache = args.full_cache
    compiles = cache == "static" and cuda  # its time is the compile's: no tokens/s for this row
    try:
        label = f"rollout, {cache} cache" + (" (first call: compiles)" if compiles else "")
        with phases.phase("rollout_full", label, full_shape) as row:
            rollouts = sample(model, tokenizer, prompts, config, config.max_new_tokens, cache, seed)
            if not compiles:
                row["tokens"] = rollouts.num_completion_tokens
    except Exception as error:  # a failed compile must not cost the memory measurement
        notes.append(f"static cache failed at the full shape, dynamic used instead: {error!r}"[:500])
        cache = "dynamic"
        with phases.phase("rollout_full", "rollout, dynamic cache", full_shape) as row:
            rollouts = sample(model, tokenizer, prompts, config, config.max_new_tokens, cache, seed)
            row["tokens"] = rollouts.num_completion_tokens
    if cache == args.full_cache:  # else static has failed already
        label = f"rollout, static cache ({'compiled' if cuda else 'uncompiled on CPU'})"
        try:
            timed_decode(phases, "rollout_static", label, "static", sampling, timed)
        except Exception as error:
            notes.append(f"static cache failed: {error!r}"[:500])
    label = "rollout, paged (continuous batching" + (", CUDA graphs)" if cuda else ")")
    try:
        timed_decode(phases, "rollout_paged", label, "paged", sampling, timed)
    except Exception as error:
        notes.append(f"paged cache failed: {error!r}"[:500])
    lengths = rollouts.completion_mask.sum(1)
    if int(lengths.min()) != config.max_new_tokens:
        notes.append(f"completions not all {config.max_new_tokens} tokens long: {lengths.tolist()}")
    return rollouts, cache


def measure_steps(
    phases: Phases, model, rollouts: Rollouts, config: Config, args: argparse.Namespace
) -> None:
    """One POPO and one GRPO step on the same rollouts, rewards Bernoulli(--positive-rate) by the seed."""
    device = rollouts.completion_ids.device
    generator = torch.Generator().manual_seed(args.seed)
    shape = (config.prompts_per_step, config.rollouts_per_prompt)
    rewards = (torch.rand(shape, generator=generator) < args.positive_rate).float()  # (B, G)
    if not rewards.any():
        rewards[0, 0] = 1.0  # POPO trains on positives only: at least one, so its step does work
    tokens = int(rollouts.attention_mask.sum())  # as the trainer counts train_tokens_per_s
    label = (
        f"{rollouts.input_ids.shape[0]} x {rollouts.input_ids.shape[1]} tokens, {int(rewards.sum())} positive"
    )
    policy_params = [p for p in model.parameters() if p.requires_grad]

    hidden_size = model.get_base_model().config.hidden_size
    popo_variants = [("popo_step", "POPO step (update, clip, AdamW, EMA)", config)]
    if args.popo_variants:  # what the reference's entropy over all completions costs, and packing saves
        positives_only = dataclasses.replace(config, entropy_over="positives")
        popo_variants += [
            ("popo_step_entropy_positives", "POPO step, entropy over positives only", positives_only),
            (
                "popo_step_packed",
                "POPO step, packed positives (weights from the loss forward)",
                dataclasses.replace(positives_only, pack_positives=True),
            ),
        ]
    for key, title, variant in popo_variants:
        predictor = Predictor(hidden_size, config.predictor_dim).to(device)
        trainable = policy_params + list(predictor.parameters())
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        with phases.phase(key, title, label) as row:
            train_step(model, rollouts, rewards, variant, optimizer, trainable, predictor, generator)
            row["tokens"] = tokens
        del predictor, optimizer, trainable  # GRPO holds no predictor and its own AdamW state
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(policy_params, lr=config.learning_rate, weight_decay=config.weight_decay)
    with phases.phase("grpo_step", "GRPO step (update, clip, AdamW)", label) as row:
        train_step(model, rollouts, rewards, config, optimizer, policy_params)
        row["tokens"] = tokens


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    config = sizes_config(args)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if device.type != "cuda" and args.shape != "tiny":
        raise SystemExit(f"--shape {args.shape} needs a CUDA GPU; on a CPU run --shape tiny")
    prompt_tokens = args.prompt_tokens or (8 if args.shape == "tiny" else 128)
    vocab_size = SHAPES[args.shape]["vocab_size"]
    timed_tokens = min(args.timed_tokens, config.max_new_tokens)
    notes: list[str] = []
    if timed_tokens < config.max_new_tokens:
        notes.append(
            f"shortened: decode speed timed at {timed_tokens} new tokens, not {config.max_new_tokens} (time "
            f"budget); the rollouts trained on have all {config.max_new_tokens}"
        )
    if device.type != "cuda":
        notes.append(
            "CPU run: no GPU figures here; peak memory is n/a on CPU (the RSS shown is the process's "
            "peak so far, it cannot be reset per phase). The GPU figures are still to be measured."
        )
        notes.append(
            "static cache on CPU runs uncompiled (transformers compiles only on an accelerator); CPU "
            "timings of a tiny model on a shared machine are overhead and noise, not a ranking"
        )

    phases = Phases(device)
    tokenizer = word_tokenizer(vocab_size)
    with phases.phase("build", "weights NF4 + 2 adapters (resident after build)", args.shape) as row:
        base, model_config = build_base(args.shape, device, dtype, prompt_tokens + config.max_new_tokens + 64)
        base.generation_config.suppress_tokens = [EOS]  # no completion ends early: the worst case
        model = attach_adapters(base, config)
        ema_reset(model)
        if device.type == "cuda":  # resident, not peak: the bf16 build transient is no training cost
            torch.cuda.synchronize()
            row["peak_gib"] = torch.cuda.memory_allocated() / GIB
    prompts = random_prompts(config.prompts_per_step, prompt_tokens, vocab_size, args.seed)
    sampling = (model, tokenizer, prompts, config, args.seed)
    rollouts, full_cache = measure_rollouts(phases, sampling, args, notes)
    measure_steps(phases, model, rollouts, config, args)

    by_key = {row["key"]: row for row in phases.rows}
    static, paged = by_key.get("rollout_static"), by_key.get("rollout_paged")
    return {
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "shape": args.shape,
        "sizes": {
            "prompts": config.prompts_per_step,
            "rollouts": config.rollouts_per_prompt,
            "max_new_tokens": config.max_new_tokens,
            "timed_tokens": timed_tokens,
            "prompt_tokens": prompt_tokens,
            "micro_batch_size": config.micro_batch_size,
            "lora_rank": config.lora_rank,
            "predictor_dim": config.predictor_dim,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "target_gib": args.target_gib,
        "full_cache": full_cache,
        "phases": phases.rows,
        "popo_over_grpo_train_tokens_per_s": by_key["popo_step"]["tokens_per_s"]
        / by_key["grpo_step"]["tokens_per_s"],
        "static_over_eager_decode": (
            static["tokens_per_s"] / by_key["rollout_eager"]["tokens_per_s"] if static else None
        ),
        "paged_over_eager_decode": (
            paged["tokens_per_s"] / by_key["rollout_eager"]["tokens_per_s"] if paged else None
        ),
        # the plan at the prompts' real longest length: its worst case is then this run's shapes
        "plan": planned_peak(dataclasses.replace(config, max_prompt_tokens=prompt_tokens), model_config),
        "notes": notes,
        "seconds_total": time.perf_counter() - started,
    }


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft": peft.__version__,
    }


def table(results: dict) -> str:
    cuda = results["device"] != "cpu"
    target = results["target_gib"]
    memory_header = f"peak GPU GiB (target {target:g})" if cuda else "peak memory (CPU: n/a; process RSS GiB)"
    lines = [
        f"| phase | shape | seconds | {memory_header} | tokens/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results["phases"]:
        if cuda:
            verdict = "fits" if row["peak_gib"] <= target else "OVER"
            memory = f"{row['peak_gib']:.2f} {verdict} (held before: {row['held_gib']:.2f})"
        else:
            memory = f"n/a (RSS {row['rss_gib']:.2f})"
        speed = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else ""
        lines.append(f"| {row['phase']} | {row['shape']} | {row['seconds']:.1f} | {memory} | {speed} |")
    ratio = results["popo_over_grpo_train_tokens_per_s"]
    lines.append(f"| POPO / GRPO training tokens/s | same rollouts | | | {ratio:.2f}x |")
    for cache in ("static", "paged"):
        speedup = results.get(f"{cache}_over_eager_decode")
        if speedup is not None:
            lines.append(f"| {cache} / eager decode tokens/s | same batch | | | {speedup:.2f}x |")
    plan = results["plan"]
    if isinstance(plan, dict):
        measured = max(row.get("peak_gib", 0.0) for row in results["phases"])
        shown = f"{measured:.2f} measured" if cuda else "n/a on CPU"
        lines.append(f"| predicted peak (popo_lite.plan) | | | {plan['peak_gib']:.2f} vs {shown} | |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    versions_line = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    sizes = ", ".join(f"{key} {value}" for key, value in results["sizes"].items())
    parts = [
        f"# gpu_step: Qwen2.5 {results['shape']} shape, random NF4 weights, on {results['device']}",
        "",
        f"{results['date']}; {versions_line}; {results['seconds_total']:.0f} s in all.",
        f"Sizes: {sizes}. Training rollouts from the {results['full_cache']} cache.",
        "",
        table(results),
        "",
    ]
    if isinstance(results["plan"], dict):
        parts.append(f"popo_lite.plan phases (GiB): {json.dumps(results['plan']['phases_gib'])}")
    elif isinstance(results["plan"], str):
        parts.append(results["plan"])
    parts += [f"- {note}" for note in results["notes"]]
    return "\n".join(parts) + "\n"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_shape = "7b" if torch.cuda.is_available() else "tiny"
    parser.add_argument("--shape", choices=sorted(SHAPES), default=default_shape)
    parser.add_argument("--prompts", type=int, help="prompts per step (default: the shape's config)")
    parser.add_argument("--rollouts", type=int, help="rollouts per prompt (default: the shape's config)")
    parser.add_argument("--new-tokens", type=int, help="max_new_tokens (default: the shape's config)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the shape's config")
    parser.add_argument("--timed-tokens", type=int, default=128, help="new tokens of the timed decodes")
    parser.add_argument("--prompt-tokens", type=int, help="longest prompt (default 128; tiny 8)")
    parser.add_argument(
        "--full-cache",
        choices=("static", "dynamic"),
        default="static",
        help="cache that samples the full-shape rollouts trained on (static: compiled on CUDA, falls back "
        "to dynamic if that fails)",
    )
    parser.add_argument("--positive-rate", type=float, default=0.3)
    parser.add_argument(
        "--popo-variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time POPO with entropy over positives only, and with packed positives",
    )
    parser.add_argument("--target-gib", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_step-{device_slug(results['device'])}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {stem}.md and .json")
    return results


if __name__ == "__main__":
    main()
