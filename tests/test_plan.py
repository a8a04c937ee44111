"""The memory planner: hand-computed sizes, consistency of the plan, and whole steps measured on the CPU.

The measurements use `popo_lite.planning.memory.PeakMemory` (live tensor storage, counted per op) on small
Qwen2-shaped models built here: one where the vocabulary (log-prob chunks) dominates, one where the MLP
(a recomputed decoder layer) does. The planner's formulas are the GPU's accounting; these checks hold
them to within 15% of what the same code really allocates.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from popo_lite.config import Config, ConfigError, load_config
from popo_lite.core.rollouts import Rollouts
from popo_lite.core.siamese import POLICY, Predictor, ema_reset
from popo_lite.core.updates import grpo_update, popo_update
from popo_lite.engine.choose import load_policy
from popo_lite.engine.rollouts import generate_rollouts
from popo_lite.plan import main
from popo_lite.planning.estimate import (
    GIB,
    PHASE_PARTS,
    SHAPES,
    ModelShape,
    estimate,
    lora_params,
    lora_targets,
    shape_from_config,
    weight_bytes,
)
from popo_lite.planning.memory import PeakMemory, quant_state_tensors, tensors_of

ROOT = Path(__file__).resolve().parents[1]
QWEN_7B, QWEN_1_5B = SHAPES["qwen/qwen2.5-math-7b"], SHAPES["qwen/qwen2.5-math-1.5b"]
TOLERANCE = 0.15


def _recipe(**overrides) -> Config:
    return load_config(ROOT / "configs" / "qwen2.5-math-7b-qlora.yaml", overrides)


# ---- the tracker itself ----


def test_tracker_counts_known_allocations_to_the_byte_views_once_and_frees():
    with PeakMemory() as memory:
        a = torch.empty(1000)  # 4,000 bytes
        b = torch.ones(250, dtype=torch.float64)  # 2,000 bytes
        views = (a[:10], a.view(10, 100))  # same storage: counted once
        del a, views
        c = torch.zeros(100, dtype=torch.int8)  # 100 bytes, after a's 4,000 were freed
    assert memory.peak == 6000
    assert memory.current == 2100
    assert b.nbytes + c.nbytes == 2100


def test_tracker_sees_the_backward_pass_and_watched_tensors():
    weight = torch.randn(512, 512, requires_grad=True)
    inputs = torch.randn(64, 512)
    with PeakMemory(watch=[weight, inputs]) as memory:
        before = memory.current
        loss = (inputs @ weight).relu().sum()
        loss.backward()  # autograd runs CPU backward on this thread: its allocations are seen
    assert before == weight.nbytes + inputs.nbytes
    assert memory.current - before == weight.grad.nbytes + loss.nbytes
    assert memory.peak >= before + weight.grad.nbytes + 64 * 512 * 4


# ---- hand-computed sizes ----


def test_lora_parameter_counts_match_measured_7b_and_1_5b_by_hand():
    # r=16 on q, k, v, o, gate, up, down; per layer r * (in + out) summed, times 28 layers.
    # 7B: 16*(2*(3584+3584) + 2*(3584+512) + 3*(3584+18944)) = 1,441,792 per layer
    assert lora_params(QWEN_7B, 16, lora_targets("all-linear")) == 1_441_792 * 28 == 40_370_176  # 40.4 M
    # 1.5B: 16*(2*(1536+1536) + 2*(1536+256) + 3*(1536+8960)) = 659,456 per layer
    assert lora_params(QWEN_1_5B, 16, lora_targets("all-linear")) == 659_456 * 28 == 18_464_768  # 18.5 M


def test_nf4_weights_match_measured_qwen_shapes():
    # docs/measurements.md section 1.2: 7B after NF4 = 5.3 GiB (embeddings and lm_head bf16, both
    # adapters +0.2).
    assert weight_bytes(QWEN_7B, qlora=True, dtype_bytes=2) / GIB == pytest.approx(5.3, rel=0.05)
    # Its 1.5B row (1.5 GiB) equals the shape with lm_head held apart from the embedding matrix (a
    # random-weight model built without tying); loaded from the Hub, 1.5B ties them: 1.06 GiB.
    assert weight_bytes(replace(QWEN_1_5B, tied=False), True, 2) / GIB == pytest.approx(1.5, rel=0.05)
    assert weight_bytes(QWEN_1_5B, True, 2) / GIB == pytest.approx(1.06, abs=0.01)
    # Without qlora every parameter is dtype bytes: Qwen2.5-7B has 7.62 B parameters.
    assert weight_bytes(QWEN_7B, qlora=False, dtype_bytes=2) == 2 * 7_615_616_512


def test_lora_counts_and_base_weights_equal_real_models(tiny_config):
    for targets in ("all-linear", ["q_proj", "v_proj"], r".*\.mlp\.(up|down)_proj"):
        for qlora in (False, True):
            config = tiny_config(lora_target_modules=targets, lora_rank=4, qlora=qlora, dtype="float32")
            model, _, _ = load_policy(config)
            shape = shape_from_config(model.config)
            trainable = sum(
                p.numel() for n, p in model.named_parameters() if f".{POLICY}." in n and p.requires_grad
            )
            assert trainable == lora_params(shape, 4, lora_targets(targets)) > 0
            frozen = [p for name, p in model.get_base_model().named_parameters() if "lora_" not in name]
            assert _bytes(frozen + [t for p in frozen for t in quant_state_tensors(p)]) == weight_bytes(
                shape, qlora, 4
            ), (targets, qlora)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


# ---- consistency of the plan ----


def test_resident_parts_and_phases_of_a_small_shape_equal_hand_counts():
    # hidden 8, MLP 16, 2 layers, 2 heads of 4 (one KV head), vocab 32, lm_head untied, no biases; fp32, r = 2
    shape = ModelShape(8, 16, 2, heads=2, kv_heads=1, vocab=32, tied=False, qkv_bias=False)
    sizes = dict(model="hand-shape", dtype="float32", qlora=False, lora_rank=2, predictor_dim=4)
    plan = estimate(Config(**sizes, lora_target_modules="all-linear"), shape)
    # Linears per layer (in x out): q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8 = 576 weights;
    # 2 x 576 + 5 RMSNorms x 8 + embeddings and lm_head 2 x 32 x 8 = 1,704 fp32 parameters.
    # LoRA r * (in + out): 2 x (16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 per layer, 512 per adapter.
    # Predictor Linear(8, 4) + LayerNorm(4) + Linear(4, 8): 36 + 8 + 40 = 84. Trainable: 512 + 84 = 596.
    hand = {"weights": 1704 * 4, "adapters": 2 * 512 * 4, "predictor": 84 * 4, "optimizer_state": 2 * 596 * 4}
    assert {key: plan.breakdown[key] for key in hand} == hand
    assert plan.breakdown["gradients"] == 596 * 4
    resident = 6816 + 4096 + 336 + 4768
    assert plan.phases["update"] == resident + 2384 + plan.breakdown["activations"] + plan.breakdown["logits"]
    assert plan.phases["generation"] == (
        resident + plan.breakdown["kv_cache"] + plan.breakdown["generation_activations"]
    )
    assert plan.phases["scoring"] == resident + plan.breakdown["scoring_activations"]
    assert set(plan.moments) == set(plan.phases)
    assert plan.fits(plan.peak_bytes / GIB + 1.0) and not plan.fits(plan.peak_bytes / GIB + 0.99)
    # Without the similarity term the predictor is resident but gets no gradient and no AdamW moments.
    unused = estimate(Config(**sizes, alpha=0.0), shape).breakdown
    assert (unused["predictor"], unused["gradients"], unused["optimizer_state"]) == (336, 2048, 4096)
    grpo = estimate(Config(**sizes, algo="grpo"), shape)
    assert grpo.breakdown["predictor"] == 0 and "scoring" not in grpo.phases  # no no-grad pass in GRPO


@pytest.mark.parametrize(
    "field", ["micro_batch_size", "max_new_tokens", "max_prompt_tokens", "generation_batch_size"]
)
def test_larger_sizes_never_lower_the_prediction(field):
    for qlora in (True, False):
        previous = None
        for value in (1, 2, 4, 8, 16, 64, 100, 128, 129, 512, 2048):
            plan = estimate(_recipe(qlora=qlora, **{field: value}))
            if previous is not None:
                for phase, peak in plan.phases.items():
                    assert peak >= previous.phases[phase], (field, value, phase)
            previous = plan


def test_qlora_and_checkpointing_lower_what_they_should():
    nf4, bf16 = estimate(_recipe()), estimate(_recipe(qlora=False))
    assert nf4.breakdown["weights"] < bf16.breakdown["weights"] / 2.5
    assert nf4.breakdown["adapters"] == bf16.breakdown["adapters"]
    stored = estimate(_recipe(gradient_checkpointing=False))
    assert stored.phases["update"] > nf4.phases["update"] + 10 * GIB  # every layer's saved tensors
    assert stored.phases["generation"] == nf4.phases["generation"]  # generation never checkpoints


def test_cli_prints_a_table_and_json_and_says_whether_it_fits(capsys):
    recipe = str(ROOT / "configs" / "qwen2.5-math-7b-qlora.yaml")
    assert main(["--config", recipe]) == 0
    table = capsys.readouterr().out
    assert "fits a 24 GiB card" in table and "kv_cache" in table and "update" in table
    assert main(["--config", recipe, "--gpu_gib", "8", "--micro_batch_size", "2", "--json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["fits"] is False and printed["peak_bytes"] == max(printed["phases"].values())
    assert printed["peak_bytes"] == estimate(_recipe(micro_batch_size=2)).peak_bytes
    assert main(["--config", recipe, "--lora_target_modules", "q_proj,lm_head"]) == 2
    assert "lm_head" in capsys.readouterr().err
    assert main(["--config", recipe, "--model_loader", "unsloth"]) == 2  # its prefill_chunk_size: 128
    assert "prefill_chunk_size: null" in capsys.readouterr().err
    main(["--config", recipe, "--model_loader", "unsloth", "--prefill_chunk_size", "none"])
    assert "Unsloth's own kernels and generation are not modelled" in capsys.readouterr().out


# ---- predicted vs measured on the CPU ----

SMALL = {  # (vocab, hidden, intermediate, layers): logits-dominated and MLP-dominated
    "vocab": (2048, 128, 344, 2),
    "mlp": (256, 128, 1024, 2),
}


def _word_model(folder: Path, vocab: int, hidden: int, intermediate: int, layers: int) -> Path:
    """A random Qwen2-shaped model whose tokenizer has one word per id (digits are single tokens)."""
    words = ["<pad>", "<eos>", "<unk>", *"0123456789"] + [f"<w{i}>" for i in range(vocab - 13)]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    shape = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers
    )
    config = Qwen2Config(
        **shape,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan-models")
    return {name: _word_model(root / name, *sizes) for name, sizes in SMALL.items()}


def _small_config(folder: Path, **overrides) -> Config:
    values = dict(model=str(folder), dtype="float32", device="cpu", prompts_per_step=2, rollouts_per_prompt=4)
    values |= dict(gradient_checkpointing=True)  # the GPU recipes' setting; auto would pick off here
    values |= dict(
        max_prompt_tokens=32, max_new_tokens=128, micro_batch_size=4, predictor_dim=256, lora_rank=16
    )
    return Config(**values | overrides)


def _full_length_rollouts(config: Config, vocab: int) -> tuple[Rollouts, torch.Tensor]:
    """Rollouts at the planner's worst case: full-length prompts and completions, all positive."""
    count, prompt, new = config.rollouts_per_step, config.max_prompt_tokens, config.max_new_tokens
    ids = torch.randint(3, vocab, (count, prompt + new), generator=torch.Generator().manual_seed(0))
    prompt_mask = torch.ones(count, prompt, dtype=torch.long)
    prompt_mask[:: config.micro_batch_size, :3] = 0  # a padded row per micro-batch: SDPA's masked path
    completion_mask = torch.ones(count, new, dtype=torch.long)
    rollouts = Rollouts(ids[:, :prompt], prompt_mask, ids[:, prompt:], completion_mask, [""] * count, 4, 0.0)
    return rollouts, torch.ones(config.prompts_per_step, config.rollouts_per_prompt)


@pytest.mark.parametrize(
    ("model", "overrides", "moment"),
    [
        ("vocab", {}, "backward through a log-prob chunk"),
        ("vocab", {"qlora": True}, "backward through a log-prob chunk"),
        ("mlp", {}, "backward through one decoder layer"),
        ("mlp", {"algo": "grpo", "gradient_checkpointing": False}, "no-grad EMA/reference forward"),
        ("mlp", {"gradient_checkpointing": False}, "no-grad EMA/reference forward"),
        (
            "mlp",
            {"algo": "grpo", "gradient_checkpointing": False, "shared_prompts": False},
            "no-grad EMA/reference forward",
        ),
    ],
    ids=[
        "popo-vocab",
        "popo-vocab-qlora",
        "popo-mlp",
        "grpo-mlp-shared-prompts",
        "popo-mlp-shared-prompts",
        "grpo-mlp-per-rollout-prompts",
    ],
)
def test_predicted_update_peak_is_within_15_percent_of_measured(small_models, model, overrides, moment):
    config = _small_config(small_models[model], **overrides)
    plan = estimate(config, AutoConfig.from_pretrained(small_models[model]))
    policy, _, _ = load_policy(config)
    ema_reset(policy)
    popo = config.algo == "popo"
    predictor = Predictor(policy.config.hidden_size, config.predictor_dim) if popo else None
    trainable = [p for p in policy.parameters() if p.requires_grad] + (
        list(predictor.parameters()) if popo else []
    )
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    rollouts, rewards = _full_length_rollouts(config, SMALL[model][0])

    def step() -> (
        None
    ):  # what trainer.gradients + optimizer_step do, with the weights pass and every micro-batch
        if popo:
            popo_update(policy, predictor, rollouts, rewards, config, torch.Generator().manual_seed(0))
        else:
            grpo_update(policy, rollouts, rewards, config)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from here on, as in every step after the first
    with PeakMemory(
        watch=tensors_of(policy, predictor, optimizer) if popo else tensors_of(policy, optimizer)
    ) as memory:
        resident = memory.current
        step()
    measured = memory.peak
    predicted = plan.phases["update"]
    print(
        f"{model} {overrides}: update measured {measured:,} predicted {predicted:,}", plan.moments["update"]
    )
    assert resident == pytest.approx(sum(plan.breakdown[k] for k in PHASE_PARTS["resident"]), rel=0.01)
    assert measured - resident > 0.5 * measured  # the activations, not the weights, decide this check
    assert abs(predicted - measured) / measured < TOLERANCE
    assert plan.moments["update"] == moment
    assert plan.peak_bytes == predicted  # the update, not scoring, is the worst phase of these steps


@pytest.mark.parametrize(
    ("prompt", "new", "prompts", "part", "chunk", "shared"),
    [
        (64, 8, 4, "generation_activations", None, False),
        (64, 8, 4, "generation_activations", 16, False),
        (8, 64, 8, "kv_cache", None, False),
        (64, 8, 4, "kv_cache", None, True),
        (64, 8, 4, "kv_cache", 16, True),
    ],
    ids=["prefill", "prefill-chunked", "decode", "prefill-shared", "prefill-shared-chunked"],
)
def test_predicted_generation_peak_is_within_15_percent_of_measured(
    small_models, prompt, new, prompts, part, chunk, shared
):
    sizes = dict(
        max_prompt_tokens=prompt, max_new_tokens=new, prompts_per_step=prompts, prefill_chunk_size=chunk
    )
    config = _small_config(small_models["vocab"], shared_prompts=shared, **sizes)
    plan = estimate(config, AutoConfig.from_pretrained(small_models["vocab"]))
    policy, tokenizer, _ = load_policy(config)
    texts = ["1" * (prompt - 3 * (i % 2)) for i in range(prompts)]  # digits: one token each; padded pairs
    with PeakMemory(watch=tensors_of(policy)) as memory:
        rollouts = generate_rollouts(
            policy,
            tokenizer,
            texts,
            config.rollouts_per_prompt,
            new,
            1.0,
            1.0,
            prompt,
            prefill_chunk_size=chunk,
            shared_prompts=shared,
        )
    assert rollouts.prompt_ids.shape[1] == prompt and rollouts.completion_ids.shape[1] == new
    parts = ("weights", "adapters", "kv_cache", "generation_activations")  # no predictor or AdamW here
    predicted = sum(plan.breakdown[key] for key in parts)
    print(
        f"generation {prompt}+{new} shared {shared}: measured {memory.peak:,} predicted {predicted:,}",
        plan.moments["generation"],
    )
    assert plan.breakdown[part] > TOLERANCE * memory.peak  # without this part the check would fail
    assert abs(predicted - memory.peak) / memory.peak < TOLERANCE
    if not shared:  # a shared prefill runs G times fewer rows: its peak is near the decoding one
        assert plan.moments["generation"].startswith("prefill" if prompt > new else "last decoding step")


def test_data_parallel_processes_share_the_generation_not_the_update():
    config = _recipe()  # 8 prompts x 8 rollouts
    one, two = estimate(config), estimate(config, processes=2)
    assert two.breakdown["kv_cache"] == one.breakdown["kv_cache"] // 2  # 32 rollouts per process
    assert two.phases["update"] == one.phases["update"]
    assert two.phases["generation"] < one.phases["generation"]
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        estimate(config, processes=3)
