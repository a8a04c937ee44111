"""POPO inside TRL: `POPOTrainer`, a `trl.GRPOTrainer` (trl 1.16.0) that trains with popo_lite's objective.

A TRL (or Unsloth) GRPO script switches by changing `GRPOConfig` -> `POPOConfig` and `GRPOTrainer` ->
`POPOTrainer`, and passing a LoRA `peft_config` (or a `PeftModel`). The math is not copied: weights come from
`objectives.popo_weights`, the loss from `objectives.popo_loss`, the EMA law from `siamese.ema_update`, the
forwards from `logprobs.completion_stats`. Override points, in step order:

- `_calculate_rewards` keeps the raw per-function rewards; `_generate_and_score_completions` turns their
  weighted sum into group weights (no gradient, eval mode, positive rows only) BEFORE TRL shuffles and splits
  the generation batch, and adds `popo_weights` / `popo_positive` to the batch it buffers.
- `compute_loss` runs the policy forward, the EMA forward (`ema_forward`, no gradient), the predictor and
  noise, and returns `popo_loss / gradient_accumulation_steps` (TRL's `loss_is_scaled_for_ga` contract).
- `create_optimizer` adds the predictor as a param group (Trainer's clipping covers the model's parameters
  only, so the predictor is not clipped, as in the reference); `EMAUpdateCallback.on_step_end` applies
  `xi <- tau xi + (1 - tau) theta` once per optimizer step.
- `_save_checkpoint` / `_load_optimizer_and_scheduler` add `popo_state.pt` (predictor, EMA shadow, noise RNG).

How this differs from popo_lite's own trainer (`updates.popo_update`); docs/algorithm.md section 7 lists
how that trainer differs from the reference:

1. Micro-batch composition. TRL shuffles the generation batch (`per_device_train_batch_size *
   steps_per_generation` completions) its own way and cuts it into `per_device_train_batch_size`
   rows per micro-batch; ours shuffles with its own seeded permutation (`shuffle_micro_batches`) into
   `micro_batch_size` rows. Weights are per prompt group and computed before the shuffle in both, but the
   NLL (over the micro-batch's positive tokens), the similarity penalty (over its weights) and the entropy
   bonus (over its tokens) are each normalised per micro-batch, so a different split gives a different
   gradient. TRL divides each loss by `gradient_accumulation_steps`, ours by the number of micro-batches.
2. Empty micro-batches and steps. A micro-batch with no positive returns a leaf zero (no forward), so on a
   step with no positive at all no adapter gets a gradient and AdamW leaves it alone (no moment decay, no
   weight decay); ours gives the policy adapter zero gradients and steps, as the reference does.
3. Clipping: the same in both. Trainer clips the model's parameters (the adapter) and not the predictor,
   as the reference does.
4. Forwards. The weights and the loss use `completion_stats` (positions that skip left padding, as `generate`
   uses), not TRL's fused LM head or `old_per_token_logps`. Prompts stay padded to the generation batch's
   longest (ours trims per micro-batch): equal up to float rounding.
5. Rewards. Positives are `sum_k reward_weights[k] * r_k > popo_reward_threshold` over TRL's reward functions
   (a completion no function scored counts 0), and a positive with no completion token (TRL's
   `mask_truncated_completions`) is not one. TRL still computes and logs GRPO advantages; POPO ignores
   them, so the "advantage" column of TRL's completion logs is GRPO's, not a POPO weight.
6. Adapters. TRL's `peft_config` names the policy adapter "default"; the trainer adds "ema" (fp32) on the same
   base. With a 4-bit base TRL keeps the policy adapter in bf16 (ours: fp32). AdamW uses TRL's decay grouping.
7. Unsupported, rejected with a message: `num_iterations > 1` or generation batches reused across optimizer
   steps (POPO has no ratio to correct stale samples), `beta != 0` (the similarity penalty replaces the KL),
   TRL's entropy bonus / entropy mask / off-policy mask (use `popo_beta_entropy`), vLLM (its weight sync
   merges adapters and samples from another engine), more than one process (`completion_stats` bypasses the
   DDP wrapper), tools / environments, vision-language models. Ignored: `loss_type`, `epsilon*`,
   `scale_rewards`.
   Not ported: the KL(policy || EMA) monitor, benchmark evaluation, the rollout inspector log.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from popo_lite.core.logprobs import CompletionStats, completion_stats
from popo_lite.core.objectives import ENTROPY_OVER, WEIGHT_MODES, popo_loss, popo_weights
from popo_lite.core.siamese import EMA, Predictor, adapter_pairs, ema_forward, ema_reset, ema_update
from popo_lite.engine.model import keep_nf4_layers_trainable

logger = logging.getLogger(__name__)
STATE_FILE = "popo_state.pt"


class EMAUpdateCallback(TrainerCallback):
    """After each optimizer step: the momentum law on the EMA adapter, and the predictor's gradients cleared
    (Trainer's `model.zero_grad()` does not reach the predictor, which is not part of the model)."""

    def __init__(self, model: PeftModel, policy: str, predictor: Predictor, tau: float) -> None:
        self.model, self.policy, self.predictor, self.tau = model, policy, predictor, tau

    def on_step_end(self, args, state, control, **kwargs):
        ema_update(self.model, self.tau, self.policy)
        self.predictor.zero_grad(set_to_none=True)


@dataclass
class POPOConfig(GRPOConfig):
    """`GRPOConfig` plus POPO's fields (docs/algorithm.md section 1); defaults are the reference code's."""

    popo_alpha: float = field(
        default=0.1, metadata={"help": "Weight of the similarity penalty (docs/algorithm.md 1.5.2)."}
    )
    popo_beta_entropy: float = field(
        default=0.01, metadata={"help": "Weight of the entropy bonus; replaces TRL's `entropy_coef`."}
    )
    popo_tau: float = field(
        default=0.995,
        metadata={
            "help": "EMA momentum, once per optimizer step: xi <- tau xi + (1 - tau) theta (0.999 at 7B)."
        },
    )
    popo_noise_std: float = field(
        default=0.02, metadata={"help": "Std of the Gaussian noise on the EMA features, training only."}
    )
    popo_predictor_dim: int = field(
        default=1024, metadata={"help": "Hidden width d of the BYOL-style predictor (4096 in the 7B run)."}
    )
    popo_weight_mode: str = field(
        default="softmax",
        metadata={
            "help": f"Group weights over positives: one of {WEIGHT_MODES} (see objectives.popo_weights)."
        },
    )
    popo_weight_temperature: float = field(
        default=1.0, metadata={"help": "Temperature T_w of the softmax weights."}
    )
    popo_reward_threshold: float = field(
        default=0.0,
        metadata={"help": "A completion is positive when its (weighted, summed) reward exceeds this."},
    )
    popo_entropy_over: str = field(
        default="all",
        metadata={
            "help": f"Tokens the entropy bonus averages over: one of {ENTROPY_OVER} ('all' = reference)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (self.popo_weight_mode in WEIGHT_MODES, f"popo_weight_mode must be one of {WEIGHT_MODES}"),
            (self.popo_entropy_over in ENTROPY_OVER, f"popo_entropy_over must be one of {ENTROPY_OVER}"),
            (self.popo_weight_temperature > 0, "popo_weight_temperature must be > 0"),
            (0.0 <= self.popo_tau <= 1.0, "popo_tau must be in [0, 1]"),
            (
                self.popo_alpha >= 0 and self.popo_beta_entropy >= 0,
                "popo_alpha and popo_beta_entropy must be >= 0",
            ),
            (self.popo_noise_std >= 0, "popo_noise_std must be >= 0"),
            (self.popo_predictor_dim >= 1, "popo_predictor_dim must be >= 1"),
            (
                self.num_iterations == 1,
                "num_iterations must be 1: POPO has no ratio to correct reused samples",
            ),
            (
                self.gradient_accumulation_steps % self.steps_per_generation == 0,
                "steps_per_generation must divide gradient_accumulation_steps: a generation batch must be "
                "trained within one optimizer step (POPO is on-policy)",
            ),
            (self.beta == 0.0, "beta must be 0: POPO's similarity penalty replaces the KL term"),
            (
                self.entropy_coef == 0.0
                and not self.use_adaptive_entropy
                and self.top_entropy_quantile == 1.0,
                "entropy_coef, use_adaptive_entropy, top_entropy_quantile are GRPO's: use popo_beta_entropy",
            ),
            (self.off_policy_mask_threshold is None, "off_policy_mask_threshold is not supported with POPO"),
            (not self.use_vllm, "use_vllm is not supported with POPO"),
            (
                self.world_size == 1,
                "POPOTrainer runs in a single process (one GPU); for several GPUs use `accelerate launch -m "
                "popo_lite.train` (README: Several GPUs)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"POPOConfig: {message}")


class POPOTrainer(GRPOTrainer):
    """`GRPOTrainer` with POPO's objective: positive-only weighted NLL + bounded similarity to an EMA adapter
    + entropy bonus. Same arguments as `GRPOTrainer`; `args` must be a `POPOConfig`; the policy must be LoRA.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "popo", "popo_lite"]
    _name = "POPO"

    def __init__(self, model, reward_funcs=None, args: POPOConfig | None = None, *posargs, **kwargs) -> None:
        if not isinstance(args, POPOConfig):
            raise TypeError("POPOTrainer needs args=POPOConfig(...) (a GRPOConfig plus the popo_* fields)")
        if kwargs.get("peft_config") is None and not isinstance(model, PeftModel):
            raise ValueError(
                "POPOTrainer trains a LoRA adapter: pass peft_config=LoraConfig(...) or a PeftModel"
            )
        if kwargs.get("tools") or kwargs.get("environment_factory"):
            raise ValueError("POPOTrainer does not support tools or environments")
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        if self._is_vlm:
            raise ValueError("POPOTrainer does not support vision-language models")
        peft_model = self.accelerator.unwrap_model(self.model)
        policy = peft_model.active_adapter
        if not isinstance(peft_model.peft_config[policy], LoraConfig):
            raise ValueError(f"POPOTrainer needs a LoRA adapter; {policy!r} is not one")
        if EMA not in peft_model.peft_config:  # a model from engine.choose.load_policy has one
            peft_model.add_adapter(EMA, copy.deepcopy(peft_model.peft_config[policy]))
        for name, param in peft_model.named_parameters():
            if f".{EMA}." in name:
                # fp32 shadow: (1 - tau) * delta underflows in bf16 at tau = 0.999 (docs/algorithm.md 2.2).
                param.data = param.data.float()
        peft_model.set_adapter(policy)  # also makes the policy trainable and the EMA frozen again
        keep_nf4_layers_trainable(peft_model)  # a QLoRA model on an AVX512-BF16 CPU (see the function)
        self.peft_model, self.policy_adapter = peft_model, policy
        ema_reset(peft_model, policy)
        hidden_size = peft_model.get_base_model().config.get_text_config().hidden_size
        self.predictor = Predictor(hidden_size, args.popo_predictor_dim).to(self.accelerator.device)
        self.noise_generator = torch.Generator().manual_seed(args.seed)
        self._popo_rewards_per_func: torch.Tensor | None = None
        self.add_callback(EMAUpdateCallback(peft_model, policy, self.predictor, args.popo_tau))

    # ---- scoring: rewards -> group weights, before TRL shuffles the generation batch ----

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._popo_rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        return self._popo_rewards_per_func

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        reward_weights = self.reward_weights.to(self._popo_rewards_per_func.device)
        rewards = (
            (self._popo_rewards_per_func * reward_weights).nansum(dim=1).to(self.accelerator.device)
        )  # (B*G,)
        weights, positive = self._group_weights(batch, rewards, group_size)
        batch["popo_weights"], batch["popo_positive"] = weights, positive
        self._metrics[mode]["popo/frac_positive"].append(positive.float().mean().item())
        has_positive = positive.view(-1, group_size).any(dim=1)
        self._metrics[mode]["popo/frac_groups_with_positive"].append(has_positive.float().mean().item())
        return batch

    def _group_weights(
        self, batch: dict, rewards: torch.Tensor, group_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B*G,) weights and positive flags. Rows i*G .. i*G + G - 1 share a prompt (TRL's RepeatSampler)."""
        args = self.args
        tokens = batch["completion_mask"].sum(1)  # (B*G,)
        # A positive with no completion token (mask_truncated_completions) has nothing to train.
        positive = (rewards > args.popo_reward_threshold) & (tokens > 0)  # (B*G,)
        mean_logprobs = torch.zeros_like(rewards)
        sum_logprobs = torch.zeros_like(rewards)
        rows = positive.nonzero().flatten()
        if rows.numel() == 0:
            logger.warning("POPO: no positive completion in this generation batch; the step trains nothing")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()  # weights from the sampling policy: no dropout
        with torch.no_grad():
            for chunk in rows.split(args.per_device_train_batch_size):
                stats = self._score(model, _take(batch, chunk))
                sum_logprobs[chunk] = (stats.logprobs * batch["completion_mask"][chunk]).sum(1)
                mean_logprobs[chunk] = sum_logprobs[chunk] / tokens[chunk]
        model.train(was_training)
        scored = rewards.masked_fill(~positive, float("-inf"))  # the empty positives out, as non-positives
        weights = popo_weights(
            mean_logprobs.view(-1, group_size),
            sum_logprobs.view(-1, group_size),
            scored.view(-1, group_size),
            args.popo_weight_mode,
            args.popo_weight_temperature,
            args.popo_reward_threshold,
        ).flatten()
        return weights, positive

    def _score(self, model, batch: dict, **flags) -> CompletionStats:
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (n, P + T)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            return completion_stats(
                model,
                input_ids,
                attention_mask,
                batch["prompt_ids"].shape[1],
                batch["completion_mask"],
                self.temperature,
                **flags,
            )

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("POPOTrainer does not support returning outputs")
        args = self.args
        mode = "train" if self.model.training else "eval"
        device = inputs["completion_ids"].device
        positive = inputs["popo_positive"]  # (n,) bool
        rows = torch.arange(positive.numel(), device=device)
        if args.popo_entropy_over == "positives" or args.popo_beta_entropy == 0:
            rows = rows[positive]  # only positives reach the loss then: skip the others' forward
        if not positive.any():
            # The reference's loss is exactly zero here, entropy skipped too (docs/algorithm.md 1.9); like our
            # trainer, no forward: a leaf zero lets Trainer's backward run and leaves all gradients untouched.
            return torch.zeros((), device=device, requires_grad=True)
        batch, positive = _take(inputs, rows), positive[rows]
        peft_model = self.accelerator.unwrap_model(model)
        stats = self._score(
            peft_model, batch, with_entropy=args.popo_beta_entropy > 0, with_features=args.popo_alpha > 0
        )
        predicted = target = noise = None
        if args.popo_alpha > 0:
            target = torch.zeros_like(stats.features)  # (n, H); rows with weight 0 need no target
            with torch.no_grad(), ema_forward(peft_model):
                target[positive] = self._score(
                    peft_model, _take(batch, positive), with_features=True
                ).features
            with torch.autocast(device.type, enabled=False):  # fp32 predictor (docs/algorithm.md 1.5.2)
                predicted = self.predictor(stats.features)
            if mode == "train":  # noise in training only
                noise = (
                    torch.randn(target.shape, generator=self.noise_generator).to(device) * args.popo_noise_std
                )
        with torch.autocast(device.type, enabled=False):
            loss, metrics = popo_loss(
                stats.logprobs,
                stats.entropy,
                batch["completion_mask"],
                inputs["popo_weights"][rows],
                positive,
                predicted,
                target,
                noise,
                alpha=args.popo_alpha,
                beta_entropy=args.popo_beta_entropy,
                entropy_over=args.popo_entropy_over,
            )
        for key, value in metrics.items():
            self._metrics[mode][f"popo/{key}"].append(float(value))
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1)

    # ---- optimizer, clipping, checkpoints: the predictor lives outside the model ----

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in known for p in self.predictor.parameters()):
            group = {"params": list(self.predictor.parameters()), "weight_decay": self.args.weight_decay}
            optimizer.add_param_group(group)
        return optimizer

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        state = {
            "predictor": self.predictor.state_dict(),
            "ema": [ema.detach().cpu() for _, ema in self.adapter_pairs()],
            "noise_generator": self.noise_generator.get_state(),
        }
        torch.save(state, os.path.join(folder, STATE_FILE))

    def adapter_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(policy tensor, EMA tensor) pairs of the trained adapter."""
        return adapter_pairs(self.peft_model, self.policy_adapter)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.predictor.load_state_dict(state["predictor"])
        with torch.no_grad():
            for (_, ema), saved in zip(self.adapter_pairs(), state["ema"], strict=True):
                ema.copy_(saved)
        self.noise_generator.set_state(state["noise_generator"])


def _take(batch: dict, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt/completion tensors of some rows."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    return {key: batch[key][index] for key in keys}
