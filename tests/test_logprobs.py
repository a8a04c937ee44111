"""Chunked log-probs / entropy / features equal the straightforward full computation; completion masks."""

from __future__ import annotations

import torch

from popo_lite.core.logprobs import completion_stats, position_ids_for
from popo_lite.engine.choose import load_policy
from popo_lite.engine.rollouts import completion_mask_from, generate_rollouts


def _reference(model, input_ids, attention_mask, prompt_length, completion_mask, temperature):
    """The obvious way: full logits (N, L, V) in fp32 at once, hidden_states[-1] from the model output."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        output_hidden_states=True,
    )
    logits = out.logits[:, prompt_length - 1 : -1].float() / temperature
    log_probs = torch.log_softmax(logits, -1)
    token_logprobs = log_probs.gather(-1, input_ids[:, prompt_length:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    mask = completion_mask[..., None].float()
    features = (out.hidden_states[-1][:, prompt_length:] * mask).sum(1) / mask.sum(1)
    return token_logprobs, entropy, features


def test_chunked_stats_equal_full_computation_values_and_gradients(tiny_config):
    model, _, _ = load_policy(tiny_config())
    torch.manual_seed(0)
    input_ids = torch.randint(3, 13, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding in the prompt
    prompt_length = 4
    completion_mask = torch.ones(3, 7, dtype=torch.long)
    completion_mask[1, 5:] = 0
    attention_mask[:, prompt_length:] = completion_mask

    stats = completion_stats(
        model,
        input_ids,
        attention_mask,
        prompt_length,
        completion_mask,
        temperature=0.7,
        with_entropy=True,
        with_features=True,
        chunk_size=3,
    )
    ref_logprobs, ref_entropy, ref_features = _reference(
        model, input_ids, attention_mask, prompt_length, completion_mask, 0.7
    )
    torch.testing.assert_close(stats.logprobs, ref_logprobs)
    torch.testing.assert_close(stats.entropy, ref_entropy)
    torch.testing.assert_close(stats.features, ref_features)

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((stats.logprobs * completion_mask).sum() + stats.entropy.sum(), params)
    ref_grads = torch.autograd.grad((ref_logprobs * completion_mask).sum() + ref_entropy.sum(), params)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_completion_mask_keeps_tokens_through_the_first_eos_only():
    ids = torch.tensor([[5, 6, 1, 7, 1], [1, 0, 0, 0, 0], [4, 4, 4, 4, 4]])
    mask = completion_mask_from(ids, eos_token_ids=[1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_rollouts_group_prompts_and_mask_after_eos(tiny_config):
    config = tiny_config(max_new_tokens=6)
    model, tokenizer, _ = load_policy(config)
    torch.manual_seed(0)
    rollouts = generate_rollouts(model, tokenizer, ["12", "345"], group_size=3, max_new_tokens=6)
    assert rollouts.prompt_ids.shape[0] == rollouts.completion_ids.shape[0] == len(rollouts.texts) == 6
    assert torch.equal(rollouts.prompt_ids[0], rollouts.prompt_ids[2])  # rows 0..2 share prompt 0
    assert rollouts.prompt_mask[0].tolist()[:1] == [0]  # left-padded shorter prompt
    for row, mask in zip(rollouts.completion_ids, rollouts.completion_mask, strict=True):
        length = int(mask.sum())
        assert torch.all(row[length:] == tokenizer.pad_token_id)
        if length < row.numel() and length > 0:
            assert row[length - 1] == tokenizer.eos_token_id
    assert rollouts.completion_ids.shape[1] <= 6
