"""A config's peak GPU memory, predicted before launch (`python -m popo_lite.plan` prints it).

Tensor bytes, counted from the model's shapes and the config at the worst case of every length
(prompts of max_prompt_tokens, completions of max_new_tokens, every rollout positive):
1. Resident: the base (NF4 Linear weights + quantisation constants with qlora, embeddings, lm_head and
   norms in the compute dtype), the fp32 "policy" and "ema" LoRA adapters, the fp32 predictor and
   AdamW's two fp32 moments over the trainable parameters (policy adapter + predictor).
2. Generation: the KV cache (2 x layers x kv_heads x head_dim x tokens x batch x dtype) plus the worse
   of prefill (every prompt through one layer at once) and the last decoding step (cache at full length).
3. Update: fp32 gradients plus the worst moment of one micro-batch: backward through a chunk of 128
   completion positions (5 fp32 copies of micro_batch x 128 x vocab with the entropy bonus, 3 without),
   one decoder layer recomputed and backpropagated, or the no-grad EMA / reference forward, each over
   the stored activations (every layer's input with gradient checkpointing, every saved tensor without).
4. Scoring (no-grad weight and KL passes): one micro-batch forward with two fp32 copies of a chunk.
Each count names the tensors it stands for, traced op by op with `planning.memory.PeakMemory` on
CPU; tests/test_plan.py checks whole steps against that tracker. Not modelled: the CUDA context and allocator
slack (`fits` keeps RESERVE_GIB for them), kernels' private workspaces, attention projections in
no-grad forwards (the MLP's are larger), evaluation during training, data-parallel sharding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from popo_lite.config import Config, ConfigError, check_split
from popo_lite.training.failures import OOM_ADVICE

GIB = 2**30
FP32 = 4  # adapters, predictor, gradients, AdamW moments and log-prob chunks are fp32
CHUNK = 128  # completion positions per log-prob chunk (popo_lite.core.logprobs.completion_stats)
RESERVE_GIB = 1.0  # CUDA context, cuBLAS workspace, allocator fragmentation: outside tensor bytes
DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}  # auto on a GPU: bf16 or fp16
ATTENTION, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
PHASE_PARTS = {  # a phase's peak = the resident parts + its own parts, at its worst moment
    "resident": ("weights", "adapters", "predictor", "optimizer_state"),
    "generation": ("kv_cache", "generation_activations"),
    "update": ("gradients", "activations", "logits"),
    "scoring": ("scoring_activations",),
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama/Qwen2-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2's q/k/v projections have biases

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each decoder Linear."""
        q, kv = self.heads * self.head_width, self.kv_heads * self.head_width
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        return shapes | {"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


SHAPES = {  # from the models' config.json on the Hub (Instruct variants share them): works offline
    "qwen/qwen2.5-0.5b": ModelShape(896, 4864, 24, 14, 2, 151936, tied=True),
    "qwen/qwen2.5-1.5b": ModelShape(1536, 8960, 28, 12, 2, 151936, tied=True),
    "qwen/qwen2.5-7b": ModelShape(3584, 18944, 28, 28, 4, 152064, tied=False),
    "qwen/qwen2.5-math-1.5b": ModelShape(1536, 8960, 28, 12, 2, 151936, tied=True),
    "qwen/qwen2.5-math-7b": ModelShape(3584, 18944, 28, 28, 4, 152064, tied=False),
}


def shape_from_config(model_config) -> ModelShape:
    """A ModelShape from a transformers config (LlamaConfig, Qwen2Config, ...)."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = c.num_attention_heads
    return ModelShape(
        hidden=c.hidden_size,
        intermediate=c.intermediate_size,
        layers=c.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        vocab=c.vocab_size,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        qkv_bias=bool(getattr(c, "attention_bias", c.model_type == "qwen2")),
    )


def model_shape(config: Config) -> ModelShape:
    """The built-in shape of `config.model`, else its config.json (folder, GGUF, embedded, Hub cache)."""
    known = SHAPES.get(config.model.lower().removesuffix("-instruct"))
    if known is not None:
        return known
    from transformers import AutoConfig

    from popo_lite.engine.model import resolve_model_source

    try:
        source = resolve_model_source(config)
        model_config = AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code)
        return shape_from_config(model_config)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"model: cannot read the shapes of {config.model!r} ({error}); use a local folder or one of the "
            f"built-in shapes: {', '.join(SHAPES)}"
        ) from None


def lora_targets(targets: list[str] | str) -> tuple[str, ...]:
    """Decoder Linears that get LoRA: 'all-linear' (all but lm_head), a list of names, or peft's regex."""
    names = ATTENTION + MLP
    if targets == "all-linear":
        return names
    if isinstance(targets, str):
        path = {n: f"model.layers.0.{'self_attn' if n in ATTENTION else 'mlp'}.{n}" for n in names}
        return tuple(n for n in names if re.fullmatch(targets, path[n]))
    unknown = sorted(set(targets) - set(names))
    if unknown:
        raise ConfigError(f"lora_target_modules: the planner knows {', '.join(names)}, not {unknown}")
    return tuple(n for n in names if n in targets)


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of ONE adapter: A (r x in) and B (out x r) for each targeted Linear of each layer."""
    return shape.layers * sum(rank * (i + o) for name, (i, o) in shape.linears().items() if name in targets)


def predictor_params(hidden: int, width: int) -> int:
    """Linear(H, d) + LayerNorm(d) + Linear(d, H) with biases (popo_lite.core.siamese.Predictor)."""
    return 2 * hidden * width + 3 * width + hidden


def nf4_bytes(count: int) -> int:
    """A bitsandbytes NF4 weight, double-quantised: packed 4-bit values, a uint8 absmax per 64-block, an
    fp32 absmax per 256 of those, and the layer's own fp32 code tables (16 + 256) and offset."""
    blocks = math.ceil(count / 64)
    return math.ceil(count / 2) + blocks + FP32 * math.ceil(blocks / 256) + FP32 * (16 + 256 + 1)


def weight_bytes(shape: ModelShape, qlora: bool, dtype_bytes: int) -> int:
    """The frozen base: decoder Linears (NF4 with qlora), q/k/v biases, norms, embeddings and lm_head."""
    linears = [i * o for i, o in shape.linears().values()]
    dense = (2 * shape.layers + 1) * shape.hidden  # RMSNorm weights
    dense += shape.layers * (shape.heads + 2 * shape.kv_heads) * shape.head_width * shape.qkv_bias
    dense += shape.vocab * shape.hidden * (1 if shape.tied else 2)
    layer = sum(map(nf4_bytes, linears)) if qlora else sum(linears) * dtype_bytes
    return shape.layers * layer + dense * dtype_bytes


def _lora_inputs(b: int, count: int) -> int:
    """Bytes per feature of the inputs of `count` LoRA'd Linears fed the same tensor, kept for lora_A's
    gradient: peft casts the input to the fp32 adapter in each module (in fp32 all share the input)."""
    return 0 if count == 0 else FP32 * (count if b < FP32 else 1)


def layer_saved(shape: ModelShape, b: int, targets: tuple[str, ...], rank: int, checkpointed: bool):
    """Bytes per token one decoder layer keeps for backward: (attention half, MLP half).

    b: compute dtype bytes. The frozen base Linears keep nothing (no weight gradient); only LoRA does.
    """
    h, q, i = shape.hidden, shape.heads * shape.head_width, shape.intermediate
    upcast = FP32 if b < FP32 else 0  # RMSNorm keeps its input in fp32: a copy unless compute is fp32
    attention = (
        ((upcast if checkpointed else FP32) * h)  # input RMSNorm (checkpointing holds the input apart)
        + _lora_inputs(b, sum(n in targets for n in ("q_proj", "k_proj", "v_proj"))) * h
        + 4 * b * q  # rotated q, k and v repeated to every head (GQA under a padding mask), SDPA output
        + (upcast * q if "o_proj" in targets else 0)  # o_proj's fp32 input (in fp32: the SDPA output)
        + FP32 * h  # post-attention RMSNorm's input, in fp32
        + _lora_inputs(b, sum(n in targets for n in ("gate_proj", "up_proj"))) * h
        + FP32 * rank * len(targets)  # lora_A outputs, for lora_B's gradient
    )
    mlp = 3 * b * i + (FP32 * i if "down_proj" in targets else 0)  # gate, silu(gate), up; down's input
    return attention, mlp


def mlp_backward_peak(shape: ModelShape, b: int, targets: tuple[str, ...]) -> int:
    """Bytes per token of the MLP half at the worst moment of its backward (its saved tensors included):
    recomputing up_proj (base output + fp32 lora_B output and its scaled copy, with the pending gradients
    of the layer output), down_proj's LoRA backward (its fp32 input and input gradient), or summing
    down_proj's input gradients (base, LoRA, sum) next to gate, silu(gate) and up."""
    h, i, down = shape.hidden, shape.intermediate, "down_proj" in targets
    cast = b if b < FP32 else 0  # gradients cast back from fp32 to the compute dtype
    pending = b * h + ((FP32 + cast) * h if down else 0)
    up = b + 2 * FP32 if "up_proj" in targets else b
    recompute = pending + 2 * cast * h + 2 * b * i + up * i  # + the layer's residual and MLP input
    down_lora = b * h + 3 * b * i + 2 * FP32 * i if down else 0
    down_base = b * h + 3 * b * i + (3 if down else 1) * b * i
    return max(recompute, down_lora, down_base)


def forward_layer(shape: ModelShape, b: int, targets: tuple[str, ...]) -> int:
    """Bytes per token live in a no-grad forward through one layer: embeddings, layer input, residual and
    MLP input (4 x hidden), rope cos/sin, then in up_proj: silu(gate), its base output, its fp32 LoRA
    output and scaled copy, and the fp32 cast of its input (3 x intermediate without LoRA on up_proj)."""
    h, i = shape.hidden, shape.intermediate
    mlp = (2 * b + 2 * FP32) * i + (FP32 * h if b < FP32 else 0) if "up_proj" in targets else 3 * b * i
    return 4 * b * h + 2 * b * shape.head_width + mlp


def generation_bytes(
    shape, b, targets, batch, prompt, chunk, new, static, sampling_copies, dequantised, group=1
):
    """(moment, KV cache, other bytes) at the worse of prefill and the last decoding step.

    The prefill feeds `chunk` prompt positions per forward (Config.prefill_chunk_size; `prompt` when
    whole), attending to up to `prompt` cached ones. With shared prompts (`group` = G) it runs each
    distinct prompt once, batch / G rows, and its cache is then copied to the batch's rows.

    The last step caches prompt + new - 1 positions (the last sampled token is never fed back); a static
    cache holds prompt + new from the start. sampling_copies: fp32 (batch, vocab) tensors of sampling;
    dequantised: bytes of the NF4 weight bitsandbytes expands for one matmul (0 without qlora).
    """
    per_position = 2 * shape.layers * shape.kv_heads * shape.head_width * b * batch  # K and V, all layers
    last_cache = per_position * (prompt + new - (0 if static else 1))
    layer = forward_layer(shape, b, targets)
    rows = -(-batch // group)  # the prefill's rows
    masks = rows * chunk * prompt * (1 + b)  # boolean padding mask and SDPA's float copy
    cache = last_cache if static else per_position * prompt * (1 + rows / batch if group > 1 else 1)
    prefill = (int(cache), layer * rows * chunk + masks + dequantised)
    grown = 0 if static else last_cache // (2 * shape.layers)  # torch.cat of the dynamic cache: one layer's K
    last = (last_cache, grown + layer * batch + dequantised + batch * shape.vocab * FP32 * sampling_copies)
    if sum(prefill) >= sum(last):
        chunks = f" in chunks of {chunk}" if chunk < prompt else ""
        return f"prefill of {rows} x {prompt} prompt tokens{chunks}", *prefill
    return f"last decoding step, cache at {prompt + new} tokens x {batch}", *last


def update_bytes(
    shape, b, targets, rank, n, length, new, checkpointed, copies, no_grad_targets, dequantised, prompts=0
):
    """(moment, activations, logits) at the worst moment of one micro-batch of n x length tokens.

    copies: fp32 copies of a log-prob chunk in its backward: log-softmax output, exp(log-probs) and three
    gradients with the entropy bonus; log-softmax output and two gradients without. no_grad_targets: the
    LoRA'd Linears of the no-grad pass (EMA adapter: all; GRPO's reference: none), None without it.
    prompts: with shared prompts, the step's distinct prompts, run once with gradient and held for the
    whole step; a micro-batch then runs its n x new completion tokens, attending to n x length keys (the
    prompts' cached keys and values copied to its rows).
    """
    h, prompt = shape.hidden, length - new
    queries = n * new if prompts else n * length
    tokens = queries
    chunk = n * min(CHUNK, new) * shape.vocab * FP32  # (n, 128, V) fp32
    attention, mlp = layer_saved(shape, b, targets, rank, checkpointed)
    mask = queries * length * b  # SDPA's float copy of the padding mask, per layer
    common = 2 * shape.head_width * b * tokens + queries * length  # rope cos/sin, boolean mask
    whole_layer = (attention + mlp) * tokens + mask
    if prompts:  # the prompt forward's own graph, and each row's copy of its prompt's keys and values
        kv = 2 * shape.kv_heads * shape.head_width * b
        whole_layer += (attention + mlp) * prompts * prompt + prompts * prompt * prompt * b + kv * n * length
    stored = shape.layers * (b * h * tokens if checkpointed else whole_layer)
    below = shape.layers * b * h * tokens if checkpointed else (shape.layers - 1) * whole_layer
    head = (FP32 + 2 * b) * h * tokens  # final RMSNorm's fp32 input, its output, the output's gradient
    layer = attention * tokens + mask + mlp_backward_peak(shape, b, targets) * tokens + dequantised
    moments = {
        "backward through a log-prob chunk": (common + stored + head, copies * chunk),
        "backward through one decoder layer": (common + below + layer, 0),
    }
    if no_grad_targets is not None:  # the EMA or reference forward, with the policy forward's graph alive
        # without checkpointing the log-prob chunk keeps its log-softmax output (and exp, for entropy)
        kept = 0 if checkpointed else (2 if copies == 5 else 1) * chunk
        policy = common + stored + (FP32 + b) * h * tokens + kept
        forward = (policy + forward_layer(shape, b, no_grad_targets) * tokens + mask + dequantised, 0)
        moments["no-grad EMA/reference forward"] = max(forward, (policy + b * h * tokens, 2 * chunk), key=sum)
    name = max(moments, key=lambda key: sum(moments[key]))
    return name, *moments[name]


@dataclass
class MemoryPlan:
    """Predicted peak memory: `phases[p]` = sum of `breakdown[k]` over PHASE_PARTS["resident"] and
    PHASE_PARTS[p]; `peak_bytes` = max over phases; `moments[p]` names each phase's worst moment."""

    breakdown: dict[str, int]
    phases: dict[str, int]
    peak_bytes: int
    moments: dict[str, str]

    def fits(self, gib: float, reserve_gib: float = RESERVE_GIB) -> bool:
        """Whether a card of `gib` GiB holds the peak plus `reserve_gib` for the CUDA context."""
        return self.peak_bytes + reserve_gib * GIB <= gib * GIB


def checkpointing_choice(
    config: Config, memory_gib: float, model_config=None, processes: int = 1
) -> tuple[bool, str]:
    """`gradient_checkpointing: auto` made a decision: (checkpointing on?, the reason, one line).

    Off where the plan without it (activations kept, prompts shared) fits `memory_gib` with the reserve
    for the CUDA context: it then saves every forward's recomputation and computes the same numbers.
    """
    if config.gradient_checkpointing != "auto":
        return bool(config.gradient_checkpointing), "set in the config"
    from dataclasses import replace

    plan = estimate(replace(config, gradient_checkpointing=False), model_config, processes, memory_gib)
    peak = f"the planned peak without it, {plan.peak_bytes / GIB:.2f} GiB"
    if plan.fits(memory_gib):
        return False, f"off: {peak}, fits the {memory_gib:.1f} GiB of this device"
    return True, f"on: {peak}, does not fit the {memory_gib:.1f} GiB of this device"


def estimate(config: Config, model_config=None, processes: int = 1, gpu_gib: float = 24.0) -> MemoryPlan:
    """The memory plan of `config`; `model_config` (a transformers config or ModelShape) skips the lookup.

    processes: GPUs of an `accelerate launch` data-parallel run; each generates for its share of the
    step's prompts, and everything else is per process as on one GPU. gpu_gib: the card that
    `gradient_checkpointing: auto` is decided for (`checkpointing_choice`).
    """
    check_split(config.prompts_per_step, processes)
    if isinstance(model_config, ModelShape):
        shape = model_config
    else:
        shape = shape_from_config(model_config) if model_config is not None else model_shape(config)
    on_cpu = config.dtype == "auto" and config.device == "cpu"  # auto is fp32 on a CPU (model.resolve_dtype)
    b, popo = FP32 if on_cpu else DTYPE_BYTES[config.dtype], config.algo == "popo"
    targets = lora_targets(config.lora_target_modules)
    adapter = lora_params(shape, config.lora_rank, targets)
    predictor = predictor_params(shape.hidden, config.predictor_dim) if popo else 0
    trainable = adapter + (predictor if config.alpha > 0 else 0)  # an unused predictor gets no gradient
    rollouts = config.rollouts_per_step // processes
    prompt, new = config.max_prompt_tokens, config.max_new_tokens
    n, length = min(config.micro_batch_size, rollouts), prompt + new
    batch = min(config.generation_batch_size or rollouts, rollouts)
    # bitsandbytes expands an NF4 weight to the compute dtype for each matmul over many tokens (CUDA)
    dequantised = max(i * o for i, o in shape.linears().values()) * b if config.qlora else 0
    # paged (continuous batching) allocates its whole cache up front too, like static
    static = config.generation_cache in ("static", "paged")
    sampling = 2 if config.temperature == 1.0 else 3
    chunk = min(config.prefill_chunk_size or prompt, prompt)
    # shared prefill: the HF engine's dynamic cache (engine/rollouts.py)
    share = config.shared_prompts and not static and config.generation_backend == "hf"
    group = config.rollouts_per_prompt if share and config.model_loader == "hf" else 1
    generation, kv, generation_work = generation_bytes(
        shape, b, targets, batch, prompt, chunk, new, static, sampling, dequantised, group
    )
    copies = 5 if popo and config.beta_entropy > 0 else 3  # entropy: exp(log-probs) and its gradient
    no_grad = (targets if popo else ()) if (config.alpha if popo else config.grpo_beta) > 0 else None
    checkpointed = config.gradient_checkpointing
    if checkpointed == "auto":
        checkpointed = checkpointing_choice(config, gpu_gib, shape, processes)[0]
    # shared prompts in the update: one process, no LoRA dropout, no checkpointing (core/updates.py)
    shared = config.shared_prompts and processes == 1 and config.lora_dropout == 0 and not checkpointed
    prompts = -(-rollouts // config.rollouts_per_prompt) if shared else 0
    update, activations, logits = update_bytes(
        shape,
        b,
        targets,
        config.lora_rank,
        n,
        length,
        new,
        checkpointed,
        copies,
        no_grad,
        dequantised,
        prompts,
    )
    if trainable * FP32 > activations + logits:  # AdamW's foreach step: one fp32 temporary per parameter
        update, activations, logits = "optimizer step", trainable * FP32, 0
    tokens = n * length
    scoring = max(
        forward_layer(shape, b, targets) * tokens + tokens * length * (1 + b) + dequantised,
        b * shape.hidden * tokens + 2 * n * min(CHUNK, new) * shape.vocab * FP32,
    )
    breakdown = {
        "weights": weight_bytes(shape, config.qlora, b),
        "adapters": 2 * adapter * FP32,
        "predictor": predictor * FP32,
        "optimizer_state": 2 * trainable * FP32,
        "kv_cache": kv,
        "generation_activations": generation_work,
        "gradients": trainable * FP32,
        "activations": activations,
        "logits": logits,
        "scoring_activations": scoring if popo else 0,  # GRPO has no separate no-grad pass
    }
    resident = sum(breakdown[key] for key in PHASE_PARTS["resident"])
    phases = {
        p: resident + sum(breakdown[k] for k in parts) for p, parts in PHASE_PARTS.items() if p != "resident"
    }
    if not popo:
        del phases["scoring"]
    moments = {
        "generation": generation,
        "update": update,
        "scoring": f"no-grad forward of {n} x {length} tokens",
    }
    return MemoryPlan(breakdown, phases, max(phases.values()), {p: moments[p] for p in phases})


def _gib(count: int) -> str:
    return f"{count / GIB:6.2f}"


def render(plan: MemoryPlan, config: Config, gpu_gib: float) -> str:
    """The plan as a readable table and one verdict line."""
    base = "NF4" if config.qlora else config.dtype
    title = f"memory plan: {config.model} ({base} base, LoRA r={config.lora_rank}, {config.algo})"
    lines = [title + ", longest prompts and completions", f"  {'part':<24}{'GiB':>7}  phase"]
    for phase, parts in PHASE_PARTS.items():
        lines += [f"  {key:<24}{_gib(plan.breakdown[key])}  {phase}" for key in parts if plan.breakdown[key]]
    lines.append(f"  {'phase':<24}{'GiB':>7}  worst moment")
    lines += [f"  {phase:<24}{_gib(peak)}  {plan.moments[phase]}" for phase, peak in plan.phases.items()]
    if config.model_loader == "unsloth":
        lines.append(
            "  counted as the hf loader would run it: Unsloth's own kernels and generation are not modelled"
        )
    worst = max(plan.phases, key=plan.phases.get)
    verdict = f"peak {plan.peak_bytes / GIB:.2f} GiB ({worst}) + {RESERVE_GIB} GiB CUDA context and slack: "
    if plan.fits(gpu_gib):
        return "\n".join([*lines, verdict + f"fits a {gpu_gib:g} GiB card"])
    # the scoring pass runs inside the trainer's update phase, and shares its advice
    advice = OOM_ADVICE["update" if worst == "scoring" else worst].format(**config.to_dict())
    return "\n".join([*lines, verdict + f"does NOT fit a {gpu_gib:g} GiB card; {advice}"])
