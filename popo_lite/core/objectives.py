"""POPO and GRPO objectives as pure functions of tensors, each returning ``(loss, metrics)``.

Shapes: B prompts x G rollouts per prompt; N sequences in a micro-batch; T completion length;
H hidden size. Metrics are detached Python floats, ready to log.

How POPO differs from GRPO (both train on the same rollouts and the same binary reward):

1. Which rollouts carry gradient. GRPO trains every rollout with a group-normalised advantage, pushing
   failures down explicitly. POPO trains only the positive set ``S+ = {y : r > threshold}``; failures
   get no NLL gradient at all (docs/algorithm.md sections 1.3, 1.5, 4).
2. How rollouts are weighted. GRPO: ``A = (r - mean) / (std + eps)``, unbounded and signed. POPO: bounded,
   self-normalised weights over ``S+``, ``w = softmax(mean token log-prob / T_w)``, computed without
   gradient; in [0, 1] and summing to 1 in each group with a positive (section 1.4).
3. No ratio, no clipping. GRPO uses ``rho = pi / pi_old`` clipped to ``[1 - eps, 1 + eps]``; POPO has
   neither: its weights come from the policy that sampled, and the loss is a weighted NLL (section 1.4).
4. The regulariser. GRPO adds ``beta * KL_k3(pi || pi_ref)`` to the frozen base. POPO replaces it with a
   bounded similarity penalty, ``-cos(h_phi(f_theta(y)), stopgrad(f_xi(y) + noise))`` against an EMA
   (siamese) branch, in ``[-alpha, alpha]`` (sections 1.5.2, 1.7); KL to the EMA is monitored only (1.8).
5. An entropy bonus over ALL completion tokens, negatives included: the only place negatives touch
   POPO's gradient in the reference code (section 1.5.3).
6. Degenerate groups. All-correct groups are trained by POPO (w ~ 1/G) and ignored by GRPO (A = 0);
   all-wrong groups give nothing to either (section 1.9).
7. The negative gradient is implicit: with ``sequence`` weights the NLL's gradient is ``-grad log Z+``,
   ``Z+ = sum_{S+} pi(y|x)``, so mass moves from every non-success, sampled or not (section 5.1).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHT_MODES = ("softmax", "sequence", "uniform")
ENTROPY_OVER = ("all", "positives")
GRPO_NORMALIZATIONS = ("sequence", "token")


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    # torch.where, not values * mask: padding may hold -inf log-probs, and 0 * inf is nan.
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def _connected_zero(*tensors: Tensor | None) -> Tensor:
    # A zero that still reaches every input's graph, so backward runs and gives zero grads
    # (docs/algorithm.md section 1.9: distributed ranks stay in step).
    return sum(0.0 * t.sum() for t in tensors if t is not None)


@torch.no_grad()
def popo_weights(
    mean_logprobs: Tensor,
    sum_logprobs: Tensor,
    rewards: Tensor,
    mode: str = "softmax",
    temperature: float = 1.0,
    reward_threshold: float = 0.0,
) -> Tensor:
    """Per-group weights over the positive set, without gradient (docs/algorithm.md section 1.4).

    Inputs are (B, G): mean and sum of each rollout's completion-token log-probs, and its reward.
    ``softmax``: softmax over positives of ``mean_logprobs / temperature`` (reference code, default).
    ``sequence``: softmax over positives of ``sum_logprobs / temperature``, i.e. ``pi(y|x) / Z+`` (5.1).
    ``uniform``: ``1 / |S+|``. Non-positives get 0; a group with no positive is all 0.
    Returns (B, G) float32 weights in [0, 1] summing to 1 over each group that has a positive.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight mode {mode!r}; expected one of {WEIGHT_MODES}")
    if temperature <= 0:
        raise ValueError(f"weight temperature must be > 0, got {temperature}")
    positive = rewards > reward_threshold  # (B, G) bool
    if mode == "uniform":
        count = positive.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
        return positive.float() / count
    scores = (mean_logprobs if mode == "softmax" else sum_logprobs).float() / temperature  # (B, G)
    scores = scores.masked_fill(~positive, float("-inf"))
    # softmax subtracts the group max before exp (log-sum-exp trick), so sum log-probs near -1000 stay
    # finite and, unlike exp(s - logsumexp(s)), lose no float32 digits to re-adding the max. A group with
    # no positive is a row of -inf whose nan torch.where discards.
    weights = torch.softmax(scores, dim=-1)  # (B, G)
    return torch.where(positive, weights, torch.zeros_like(weights))


def weighted_nll(
    token_logprobs: Tensor,
    completion_mask: Tensor,
    weights: Tensor,
    positive: Tensor,
    token_count: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted token NLL over positives (docs/algorithm.md section 1.5.1).

    ``L = sum_i sum_t w_i * (-logp_i,t) * m_i,t / (completion tokens of positive sequences here)``.
    token_logprobs, completion_mask: (N, T); weights: (N,), treated as constants; positive: (N,) bool.
    `token_count` replaces the divisor (None: this micro-batch's positive tokens, the reference; the
    step-level normalisation passes the step's positive tokens over its micro-batch count).
    A micro-batch without positive tokens gives a zero loss still connected to the graph.
    """
    positive_mask = completion_mask.bool() & positive.bool()[:, None]  # (N, T)
    positive_tokens = int(positive_mask.sum())
    metrics = {"num_positive": float(positive.sum()), "positive_tokens": float(positive_tokens)}
    if positive_tokens == 0:
        return _connected_zero(token_logprobs), {**metrics, "nll": 0.0}
    token_nll = -token_logprobs.float() * weights.detach().float()[:, None]  # (N, T)
    loss = _masked_sum(token_nll, positive_mask) / (positive_tokens if token_count is None else token_count)
    return loss, {**metrics, "nll": loss.item()}


def similarity_penalty(
    predicted: Tensor, target: Tensor, weights: Tensor, noise: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Bounded similarity penalty against the EMA branch (docs/algorithm.md section 1.5.2), in [-1, 1].

    ``L = - sum_i w_i * cos(predicted_i, stopgrad(target_i + noise_i)) / sum_i w_i``.
    predicted: (N, H) = h_phi(f_theta(y)), with gradient; target: (N, H) = f_xi(y); noise: (N, H) or None
    (the caller samples N(0, sigma^2) in training). Zero weights give a zero loss still connected to the
    graph, and a "cosine" metric of 0.0.
    """
    if noise is not None:
        target = target + noise
    cosine = F.cosine_similarity(predicted.float(), target.detach().float(), dim=-1)  # (N,)
    weights = weights.detach().float()  # (N,)
    total = float(weights.sum())
    if total <= 0:
        return _connected_zero(predicted), {"sim": 0.0, "cosine": 0.0}
    mean_cosine = (weights * cosine).sum() / total
    return -mean_cosine, {"sim": -mean_cosine.item(), "cosine": mean_cosine.item()}


def entropy_bonus(token_entropy: Tensor, completion_mask: Tensor) -> tuple[Tensor, dict[str, float]]:
    """``L_ent = -(sum entropy * mask) / (sum mask)``: minus the mean entropy of the given tokens.

    token_entropy, completion_mask: (N, T). An empty mask gives a zero loss still connected to the graph.
    Metric "entropy" is the mean entropy itself (a positive number).
    """
    count = int(completion_mask.bool().sum())
    if count == 0:
        return _connected_zero(token_entropy), {"entropy": 0.0}
    mean_entropy = _masked_sum(token_entropy.float(), completion_mask) / count
    return -mean_entropy, {"entropy": mean_entropy.item()}


def popo_loss(
    token_logprobs: Tensor,
    token_entropy: Tensor | None,
    completion_mask: Tensor,
    weights: Tensor,
    positive: Tensor,
    predicted: Tensor | None,
    target: Tensor | None,
    noise: Tensor | None = None,
    alpha: float = 0.1,
    beta_entropy: float = 0.01,
    entropy_over: str = "all",
    nll_token_count: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """POPO micro-batch loss ``L = L_nll + alpha * L_sim + beta_entropy * L_ent`` (docs/algorithm.md 1.5.4).

    token_logprobs, token_entropy, completion_mask: (N, T); weights (N,) from ``popo_weights``;
    positive (N,) bool; predicted, target, noise (N, H), may be None when alpha == 0; token_entropy may be
    None when beta_entropy == 0. ``entropy_over="all"`` (reference) averages entropy over every completion
    token, negatives included; ``"positives"`` over positive sequences' tokens only. A micro-batch with no
    positive gives a zero loss still connected to the graph, entropy skipped too (section 1.9).
    Gradient-accumulation scaling is the caller's. `nll_token_count` is the NLL's divisor
    (`weighted_nll`'s token_count; None = this micro-batch's positive tokens, the reference).
    """
    if entropy_over not in ENTROPY_OVER:
        raise ValueError(f"unknown entropy_over {entropy_over!r}; expected one of {ENTROPY_OVER}")
    if alpha != 0 and (predicted is None or target is None):
        raise ValueError("popo_loss needs predicted and target when alpha != 0")
    if beta_entropy != 0 and token_entropy is None:
        raise ValueError("popo_loss needs token_entropy when beta_entropy != 0")
    positive = positive.bool()  # (N,)
    entropy_mask = completion_mask.bool()  # (N, T)
    if entropy_over == "positives":
        entropy_mask = entropy_mask & positive[:, None]

    nll, metrics = weighted_nll(token_logprobs, completion_mask, weights, positive, nll_token_count)
    if metrics["positive_tokens"] == 0:
        loss = _connected_zero(token_logprobs, token_entropy, predicted)
        metrics.update(sim=0.0, cosine=0.0, entropy=0.0, loss=0.0)
        if token_entropy is not None:  # still worth logging, never in the loss here
            metrics["entropy"] = entropy_bonus(token_entropy.detach(), entropy_mask)[1]["entropy"]
        return loss, metrics

    loss = nll
    metrics.update(sim=0.0, cosine=0.0, entropy=0.0)
    if predicted is not None and target is not None:
        sim, sim_metrics = similarity_penalty(predicted, target, weights, noise)
        loss = loss + alpha * sim
        metrics.update(sim_metrics)
    if token_entropy is not None:
        ent, ent_metrics = entropy_bonus(token_entropy, entropy_mask)
        loss = loss + beta_entropy * ent
        metrics.update(ent_metrics)
    metrics["loss"] = loss.item()
    return loss, metrics


def _k3_per_token(token_logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    # k3 = exp(ref - logp) - (ref - logp) - 1 >= 0: unbiased for KL(pi || ref) under samples from pi,
    # and low-variance (Schulman, "Approximating KL divergence", 2020).
    delta = ref_logprobs.float() - token_logprobs.float()  # (N, T)
    return torch.exp(delta) - delta - 1


def kl_k3(token_logprobs: Tensor, ref_logprobs: Tensor, completion_mask: Tensor) -> Tensor:
    """Token-mean k3 estimate of KL(policy || ref) over masked tokens; a scalar tensor.

    (N, T) inputs. Used in GRPO's loss (ref = base model) and to monitor KL(policy || EMA) in POPO.
    """
    per_token = _k3_per_token(token_logprobs, ref_logprobs)  # (N, T)
    return _masked_sum(per_token, completion_mask) / completion_mask.bool().sum().clamp(min=1)


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages (docs/algorithm.md section 4.1): (B, G) -> (B, G).

    ``A = (r - mean_group) / (std_group + eps)`` with the UNBIASED std (divides by G - 1), as TRL does
    via ``torch.std``'s default. Groups whose rewards are all equal give exactly 0 (no float residue).
    """
    rewards = rewards.float()  # (B, G)
    if rewards.shape[-1] == 1:  # one rollout per prompt: no group, no baseline, and std is undefined
        return torch.zeros_like(rewards)
    mean = rewards.mean(dim=-1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=-1, keepdim=True)  # (B, 1)
    flat = rewards.amax(dim=-1, keepdim=True) == rewards.amin(dim=-1, keepdim=True)  # (B, 1)
    return torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / (std + eps))


def grpo_loss(
    token_logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    ref_logprobs: Tensor | None = None,
    clip_eps: float = 0.2,
    beta: float = 0.01,
    normalization: str = "sequence",
) -> tuple[Tensor, dict[str, float]]:
    """Clipped-ratio GRPO loss (docs/algorithm.md sections 4.2-4.4).

    token_logprobs, old_logprobs, completion_mask, ref_logprobs: (N, T); advantages: (N,).
    Per token: ``-min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)`` with ``rho = exp(logp - old)`` (= 1
    on-policy), plus ``beta * k3`` when ref_logprobs is given.
    ``normalization="sequence"``: mean over each sequence's tokens, then mean over sequences (original GRPO;
    every sequence counts the same, so long sequences' tokens count less). ``"token"``: sum over all
    tokens / total tokens (DAPO; every token counts the same).
    Metrics: "loss", "pg" (the ratio term alone, same normalisation), "kl" (token-mean k3, only with ref),
    "clip_frac" (fraction of tokens where the clipped term wins, so their gradient is zero).
    """
    if normalization not in GRPO_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {GRPO_NORMALIZATIONS}")
    mask = completion_mask.bool()  # (N, T)

    def normalize(per_token: Tensor) -> Tensor:
        if normalization == "token":
            return _masked_sum(per_token, mask) / mask.sum().clamp(min=1)
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        return (per_token.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()

    ratio = torch.exp(token_logprobs.float() - old_logprobs.detach().float())  # (N, T)
    adv = advantages.detach().float()[:, None]  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    pg_per_token = -torch.min(unclipped, clipped)  # (N, T)
    clip_frac = _masked_sum((clipped < unclipped).float(), mask) / mask.sum().clamp(min=1)
    metrics = {"pg": normalize(pg_per_token).item(), "clip_frac": clip_frac.item()}
    per_token = pg_per_token
    if ref_logprobs is not None:
        per_token = per_token + beta * _k3_per_token(token_logprobs, ref_logprobs.detach())
        metrics["kl"] = kl_k3(token_logprobs.detach(), ref_logprobs, mask).item()
    loss = normalize(per_token)
    metrics["loss"] = loss.item()
    return loss, metrics
