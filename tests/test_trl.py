"""POPOTrainer, the TRL GRPOTrainer subclass: end-to-end on the tiny model, and its loss against popo_loss.

The expected values here are computed independently of `completion_stats`: a plain model forward with
`output_hidden_states=True`, log-softmax of the logits, and `hidden_states[-1]` pooled over completion tokens.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from popo_lite.core.objectives import popo_loss, popo_weights
from popo_lite.core.rewards import math_reward
from popo_lite.core.siamese import ema_forward
from popo_lite.trl import POPOConfig, POPOTrainer

GROUP = 4


def gold_reward(completions, gold, **kwargs):
    return math_reward(completions, gold)


def alternate_reward(completions, **kwargs):
    """Every other completion is positive: two positives in each group of four, whatever the model says."""
    return [float(i % 2 == 0) for i in range(len(completions))]


def make_trainer(model_dir, problems_path, output_dir, reward=gold_reward, callbacks=None, **overrides):
    rows = [json.loads(line) for line in problems_path.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": row["q"], "gold": row["gold"]} for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,  # two prompt groups per micro-batch
        gradient_accumulation_steps=2,
        num_generations=GROUP,
        max_completion_length=2,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
        popo_predictor_dim=16,
    )
    values.update(overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return POPOTrainer(
        model,
        reward,
        args=POPOConfig(**values),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


def _lora(trainer, adapter: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if f".{adapter}." in n}


class _RecordPolicy(TrainerCallback):
    """The policy adapter after each optimizer step (the EMA callback does not change it)."""

    def __init__(self) -> None:
        self.trainer = None
        self.thetas: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.thetas.append(_lora(self.trainer, "default"))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, digit_problems, tmp_path_factory):
    """Two POPO steps with math_reward on the digit sums, tau 0.5, a checkpoint at step 2."""
    recorder = _RecordPolicy()
    output_dir = tmp_path_factory.mktemp("popo-trl")
    trainer = make_trainer(
        tiny_model_dir,
        digit_problems,
        output_dir,
        callbacks=[recorder],
        popo_tau=0.5,
        save_strategy="steps",
        save_steps=2,
    )
    recorder.trainer = trainer
    policy_before, ema_before = _lora(trainer, "default"), _lora(trainer, "ema")
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    predictor_before = [p.detach().clone() for p in trainer.predictor.parameters()]
    trainer.train()
    return SimpleNamespace(
        trainer=trainer,
        thetas=recorder.thetas,
        policy_before=policy_before,
        ema_before=ema_before,
        base_before=base_before,
        predictor_before=predictor_before,
        checkpoint=output_dir / "checkpoint-2",
    )


def test_popo_trainer_two_steps_change_adapter_and_predictor_not_base(trained):
    trainer = trained.trainer
    assert trainer.state.global_step == 2 and len(trained.thetas) == 2
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    assert len(rewards) == 2 and all(
        r > 0 for r in rewards
    )  # positives existed, so POPO had something to train
    after = _lora(trainer, "default")
    assert any(not torch.equal(after[n], trained.policy_before[n]) for n in after)
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, trained.base_before[name]), name
    moved = [
        not torch.equal(p, q)
        for p, q in zip(trainer.predictor.parameters(), trained.predictor_before, strict=True)
    ]
    assert any(moved)  # the predictor is in the optimizer


def test_popo_trainer_ema_moves_by_the_momentum_law_once_per_step(trained):
    tau = trained.trainer.args.popo_tau
    # xi_0 = theta_0 (ema_reset at construction); xi_k = tau * xi_{k-1} + (1 - tau) * theta_k.
    expected = {n.replace(".default.", ".ema."): p.float() for n, p in trained.policy_before.items()}
    assert all(torch.equal(trained.ema_before[n], expected[n]) for n in expected)
    for theta in trained.thetas:
        expected = {
            n: tau * xi + (1 - tau) * theta[n.replace(".ema.", ".default.")].float()
            for n, xi in expected.items()
        }
    ema = _lora(trained.trainer, "ema")
    for name, value in expected.items():
        assert ema[name].dtype == torch.float32
        torch.testing.assert_close(ema[name], value, rtol=0, atol=1e-6)
        assert not dict(trained.trainer.model.named_parameters())[name].requires_grad


class _RecordAtStart(TrainerCallback):
    """Predictor, EMA and policy as training (re)starts: after a resume has loaded the checkpoint."""

    def __init__(self) -> None:
        self.trainer = None
        self.state: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {
            "predictor": [p.detach().clone() for p in self.trainer.predictor.parameters()],
            "ema": _lora(self.trainer, "ema"),
            "policy": _lora(self.trainer, "default"),
            "trainable": {n for n, p in self.trainer.model.named_parameters() if p.requires_grad},
        }


def test_popo_trainer_resume_restores_predictor_ema_and_policy(
    trained, tiny_model_dir, digit_problems, tmp_path
):
    assert (trained.checkpoint / "popo_state.pt").is_file()
    assert (trained.checkpoint / "ema" / "adapter_model.safetensors").is_file()  # exportable EMA adapter
    recorder = _RecordAtStart()
    resumed = make_trainer(tiny_model_dir, digit_problems, tmp_path, callbacks=[recorder], max_steps=3)
    recorder.trainer = resumed
    resumed.train(resume_from_checkpoint=str(trained.checkpoint))
    start = recorder.state
    for p, q in zip(start["predictor"], trained.trainer.predictor.parameters(), strict=True):
        assert torch.equal(p, q)
    for name, value in _lora(trained.trainer, "ema").items():
        assert torch.equal(start["ema"][name], value)
    for name, value in _lora(trained.trainer, "default").items():
        assert torch.equal(start["policy"][name], value)
    assert start["trainable"] == set(start["policy"])  # only the policy adapter trains after the reload


def _reference(model, batch: dict, temperature: float) -> SimpleNamespace:
    """Token log-probs, entropies and pooled final hidden states from one plain forward (no chunking)."""
    prompt_width = batch["prompt_ids"].shape[1]
    width = batch["completion_ids"].shape[1]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
    )
    logits = out.logits[:, prompt_width - 1 : prompt_width - 1 + width].float() / temperature  # (N, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    mask = batch["completion_mask"].float()  # (N, T)
    hidden = out.hidden_states[-1][:, prompt_width:].float()  # (N, T, H)
    return SimpleNamespace(
        logprobs=log_probs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1),
        entropy=-(log_probs.exp() * log_probs).sum(-1),
        features=(hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
    )


@pytest.fixture
def scored(tiny_model_dir, digit_problems, tmp_path):
    """A trainer whose policy and EMA adapters differ; one generation batch of 2 prompts x 4 completions."""
    trainer = make_trainer(
        tiny_model_dir,
        digit_problems,
        tmp_path,
        reward=alternate_reward,
        gradient_accumulation_steps=1,
        popo_alpha=0.5,
        popo_beta_entropy=0.1,
        popo_noise_std=0.05,
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA B starts at 0: make both adapters do something, and differ
        for policy, ema in trainer.adapter_pairs():
            policy.add_(0.3 * torch.randn(policy.shape, generator=generator))
            ema.add_(0.3 * torch.randn(ema.shape, generator=generator))
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(2) for _ in range(GROUP)]
    return trainer, trainer._generate_and_score_completions(rows)


def test_weights_are_popo_weights_of_sampling_policy_over_positives_per_group(scored):
    trainer, batch = scored
    positive = torch.tensor([i % 2 == 0 for i in range(2 * GROUP)])
    assert torch.equal(batch["popo_positive"], positive)
    trainer.model.eval()
    with torch.no_grad():
        reference = _reference(trainer.model, batch, trainer.temperature)
    mask = batch["completion_mask"].float()
    sums = (reference.logprobs * mask).sum(1)
    expected = popo_weights(
        (sums / mask.sum(1)).view(-1, GROUP), sums.view(-1, GROUP), positive.float().view(-1, GROUP)
    ).flatten()
    torch.testing.assert_close(batch["popo_weights"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batch["popo_weights"].view(-1, GROUP).sum(1), torch.ones(2))


def test_trainer_loss_equals_popo_loss_on_the_same_batch(scored):
    trainer, batch = scored
    args = trainer.args
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; compute_loss divides by it
    trainer.noise_generator.manual_seed(7)
    loss = trainer.compute_loss(trainer.model, batch)

    policy = _reference(trainer.model, batch, trainer.temperature)
    with torch.no_grad(), ema_forward(trainer.model):
        target = _reference(trainer.model, batch, trainer.temperature).features
    assert not torch.allclose(target, policy.features)  # the EMA branch is a different network here
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(7)) * args.popo_noise_std
    expected, _ = popo_loss(
        policy.logprobs,
        policy.entropy,
        batch["completion_mask"],
        batch["popo_weights"],
        batch["popo_positive"],
        trainer.predictor(policy.features),
        target,
        noise,
        alpha=args.popo_alpha,
        beta_entropy=args.popo_beta_entropy,
        entropy_over=args.popo_entropy_over,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in trainer.predictor.parameters())
    assert all(ema.grad is None for _, ema in trainer.adapter_pairs())


def test_micro_batch_without_positive_gives_zero_loss_and_no_gradient(scored):
    trainer, batch = scored
    batch = {**batch, "popo_positive": torch.zeros_like(batch["popo_positive"])}
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_iterations": 2}, "num_iterations"),
        ({"beta": 0.04}, "beta"),
        ({"entropy_coef": 0.01}, "popo_beta_entropy"),
        ({"steps_per_generation": 4}, "steps_per_generation"),
        ({"popo_weight_mode": "ratio"}, "popo_weight_mode"),
        ({"popo_tau": 1.5}, "popo_tau"),
    ],
)
def test_popo_config_rejects_settings_popo_cannot_honour(tmp_path, overrides, message):
    values = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", num_generations=4)
    values.update(per_device_train_batch_size=8, gradient_accumulation_steps=2, **overrides)
    with pytest.raises(ValueError, match=message):
        POPOConfig(**values)


def test_popo_lite_trl_module_imports_the_real_trl_package():
    import trl

    import popo_lite.trl

    assert popo_lite.trl.GRPOTrainer is trl.GRPOTrainer
    assert issubclass(popo_lite.trl.POPOTrainer, trl.GRPOTrainer)
    assert issubclass(popo_lite.trl.POPOConfig, trl.GRPOConfig)
